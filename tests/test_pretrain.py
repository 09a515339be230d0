"""DINO pre-training: exact resume after an interruption (in-process and after SIGKILL), checkpoint format,
monitors, and the schedule shapes. Small real data: 64 BreastMNIST training images."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import medfoundry.ssl.methods  # noqa: F401
from medfoundry.config import DinoConfig, PretrainConfig, ViewsConfig
from medfoundry.data.medmnist import load_medmnist_npz
from medfoundry.models.backbones import create_encoder
from medfoundry.models.checkpoint import load_encoder
from medfoundry.ssl.monitor import CollapseMonitor, effective_rank, feature_std
from medfoundry.ssl.schedules import Schedules
from medfoundry.ssl.trainer import STATE_FILE, pretrain

SMALL = dict(
    epochs=3,
    batch_size=16,
    warmup_epochs=1,
    checkpoint_every_steps=2,
    log_every_steps=1,
    monitor_every_steps=2,
    tensorboard=False,
    views=ViewsConfig(n_local_views=2),
    dino=DinoConfig(out_dim=128, hidden_dim=64, bottleneck_dim=32, warmup_teacher_temp_epochs=1),
)


@pytest.fixture(scope="module")
def small_images(breastmnist_npz: Path):
    train = load_medmnist_npz(breastmnist_npz)["train"]
    return train.subset(np.arange(64), name="breast64")


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_resume_after_interruption_gives_identical_weights(small_images, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    config = PretrainConfig(**SMALL)
    full = pretrain(
        small_images, create_encoder("vit_tiny_28", in_chans=1, seed=0), config, tmp_path / "full", show_progress=False
    )
    assert full.finished and full.steps == 12

    part = pretrain(
        small_images,
        create_encoder("vit_tiny_28", in_chans=1, seed=0),
        config,
        tmp_path / "split",
        stop_after_steps=5,
        show_progress=False,
    )
    assert not part.finished and part.steps == 5
    assert not (tmp_path / "split" / "encoder").exists(), "an unfinished run must not export an encoder"
    resumed = pretrain(
        small_images, create_encoder("vit_tiny_28", in_chans=1, seed=0), config, tmp_path / "split", show_progress=False
    )
    assert resumed.resumed_from_step == 5 and resumed.finished

    a, b = _weights(full.encoder_dir), _weights(resumed.encoder_dir)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # The exported encoder is the teacher and differs from the random initialisation.
    init = create_encoder("vit_tiny_28", in_chans=1, seed=0).backbone.state_dict()
    assert not torch.equal(init["blocks.0.attn.qkv.weight"], a["blocks.0.attn.qkv.weight"])
    encoder = load_encoder(full.encoder_dir)
    assert encoder(torch.zeros(2, 1, 28, 28)).shape == (2, 192)


def test_resume_refuses_a_changed_config(small_images, tmp_path: Path) -> None:
    config = PretrainConfig(**SMALL)
    pretrain(
        small_images,
        create_encoder("vit_tiny_28", in_chans=1, seed=0),
        config,
        tmp_path,
        stop_after_steps=2,
        show_progress=False,
    )
    changed = PretrainConfig(**{**SMALL, "lr": 1e-3})
    with pytest.raises(Exception, match="another config or data"):
        pretrain(
            small_images, create_encoder("vit_tiny_28", in_chans=1, seed=0), changed, tmp_path, show_progress=False
        )


def test_sigkill_midway_then_resume_matches_uninterrupted(breastmnist_npz: Path, tmp_path: Path) -> None:
    """A real kill -9 of the CLI during pre-training; the atomic checkpoint survives and resume is exact."""
    archive = np.load(breastmnist_npz)
    small = tmp_path / "small.npz"
    np.savez(
        small,
        train_images=archive["train_images"][:64],
        train_labels=archive["train_labels"][:64],
        val_images=archive["val_images"][:20],
        val_labels=archive["val_labels"][:20],
        test_images=archive["test_images"][:20],
        test_labels=archive["test_labels"][:20],
    )
    overrides = [
        f"data.source={small}",
        "pretrain.epochs=6",
        "pretrain.batch_size=16",
        "pretrain.warmup_epochs=1",
        "pretrain.checkpoint_every_steps=3",
        "pretrain.tensorboard=false",
        "pretrain.views.n_local_views=2",
        "pretrain.dino.out_dim=128",
        "pretrain.dino.hidden_dim=64",
        "pretrain.dino.bottleneck_dim=32",
    ]
    args = [sys.executable, "-m", "medfoundry.cli", "pretrain"]
    for override in overrides:
        args += ["-s", override]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed_dir, clean_dir = tmp_path / "killed", tmp_path / "clean"
    process = subprocess.Popen(
        [*args, "-o", str(killed_dir)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    state = killed_dir / "pretrain" / STATE_FILE
    deadline = time.time() + 120
    while not state.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    assert state.exists(), "no checkpoint was written"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed_dir / "pretrain" / "encoder").exists()

    resumed = subprocess.run([*args, "-o", str(killed_dir)], env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    clean = subprocess.run([*args, "-o", str(clean_dir)], env=env, capture_output=True, text=True, timeout=300)
    assert clean.returncode == 0, clean.stderr
    a = _weights(killed_dir / "pretrain" / "encoder")
    b = _weights(clean_dir / "pretrain" / "encoder")
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_collapse_monitor_flags_identical_features_only() -> None:
    generator = torch.Generator().manual_seed(0)
    spread = torch.randn(64, 192, generator=generator)
    collapsed = torch.randn(1, 192, generator=generator).repeat(64, 1) + 1e-4 * torch.randn(
        64, 192, generator=generator
    )
    assert feature_std(spread) > 0.8 and effective_rank(spread) > 40
    assert feature_std(collapsed) < 0.05
    monitor = CollapseMonitor(patience=2)
    monitor.update(1, spread)
    assert not monitor.collapsed
    monitor.update(2, collapsed)
    monitor.update(3, collapsed)
    assert monitor.collapsed and "collapse" in monitor.message()


def test_schedules_follow_warmup_and_cosine() -> None:
    config = PretrainConfig(epochs=10, warmup_epochs=2, lr=1e-3, min_lr=1e-6)
    schedules = Schedules(config, steps_per_epoch=10)
    assert schedules.lr[0] <= 0.1 * schedules.lr.max()
    assert schedules.lr.argmax() == pytest.approx(20, abs=1)
    assert schedules.lr[-1] == pytest.approx(1e-6)
    assert schedules.momentum[0] == pytest.approx(config.dino.momentum_start)
    assert schedules.momentum[-1] == pytest.approx(1.0)
    assert schedules.teacher_temp[0] == pytest.approx(config.dino.warmup_teacher_temp)
    assert schedules.teacher_temp[-1] == pytest.approx(config.dino.teacher_temp)
    assert np.all(np.diff(schedules.weight_decay) >= 0)
