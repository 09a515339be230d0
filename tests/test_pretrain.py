"""DINO pre-training: exact resume after an interruption (in-process and after SIGKILL), checkpoint format,
monitors, and the schedule shapes. Small real data: 64 BreastMNIST training images."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from medfoundry.config import DinoConfig, PretrainConfig, ViewsConfig
from medfoundry.data.medmnist import load_medmnist_npz
from medfoundry.models.backbones import create_encoder
from medfoundry.models.checkpoint import load_encoder, save_encoder
from medfoundry.ssl import trainer
from medfoundry.ssl.dino import DINO
from medfoundry.ssl.monitor import (
    CollapseMonitor,
    KNNMonitorSet,
    effective_rank,
    feature_std,
    knn_predict,
    teacher_readings,
)
from medfoundry.ssl.schedules import Schedules
from medfoundry.ssl.trainer import STATE_FILE, init_name, initial_encoder, pretrain

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


def _budget(**budget: float | None) -> PretrainConfig:
    return PretrainConfig(**{**SMALL, "epochs": None, **budget})


def test_one_budget_decides_and_old_warmups_read_as_before() -> None:
    assert PretrainConfig().epochs == 20 and PretrainConfig(max_steps=7).epochs is None
    with pytest.raises(ValueError, match=r"give one budget.*epochs=3 and max_minutes=5.*pretrain.epochs=null"):
        PretrainConfig(epochs=3, max_minutes=5)
    with pytest.raises(ValueError, match="warmup_epochs is now warmup_fraction"):
        PretrainConfig(warmup_epochs=2, warmup_fraction=0.2)
    with pytest.raises(ValueError, match="warmup_teacher_temp_epochs is now warmup_teacher_temp_fraction"):
        DinoConfig(warmup_teacher_temp_epochs=2, warmup_teacher_temp_fraction=0.2)
    # An old recipe's epoch-valued warm-ups keep their meaning: 2 of 10 epochs is a fraction of 0.2.
    old = Schedules(PretrainConfig(epochs=10, warmup_epochs=2), steps_per_epoch=10)
    new = Schedules(PretrainConfig(epochs=10, warmup_fraction=0.2), steps_per_epoch=10)
    assert old.warmup_steps == new.warmup_steps == 20 and np.array_equal(old.lr, new.lr)


@pytest.mark.parametrize("total", [40, 4000])
def test_warmups_are_fractions_of_the_run(total: int) -> None:
    config = PretrainConfig(max_steps=total)  # defaults: lr 10%, teacher temperature 25%, frozen last layer 5%
    schedules = Schedules(config, steps_per_epoch=61)
    assert schedules.total_steps == total and schedules.lr.argmax() == pytest.approx(0.1 * total, abs=1)
    reached = int(np.argmax(schedules.teacher_temp >= config.dino.teacher_temp - 1e-9))
    assert reached == pytest.approx(0.25 * total, abs=1)
    assert schedules.at(0).freeze_last_layer and not schedules.at(round(0.05 * total)).freeze_last_layer
    # The whole-epoch warm-up of before could not end within a 40-step run of 61-step epochs.
    assert schedules.teacher_temp[-1] == pytest.approx(config.dino.teacher_temp)


def test_a_steps_budget_extends_from_its_state(small_images, tmp_path: Path) -> None:
    first = pretrain(
        small_images,
        create_encoder("vit_tiny_28", in_chans=1, seed=0),
        _budget(max_steps=4),
        tmp_path,
        show_progress=False,
    )
    assert first.finished and first.steps == first.total_steps == 4 and first.budget == {"max_steps": 4}
    extended = pretrain(
        small_images,
        create_encoder("vit_tiny_28", in_chans=1, seed=0),
        _budget(max_steps=6, threads=1),
        tmp_path,
        show_progress=False,
    )
    assert extended.resumed_from_step == 4 and extended.steps == extended.total_steps == 6 and extended.finished
    assert torch.get_num_threads() == 1
    assert [int(r["step"]) for r in extended.monitor] == [2, 4, 6]
    with pytest.raises(Exception, match="taken 6 steps, more than the new budget's 3"):
        pretrain(
            small_images,
            create_encoder("vit_tiny_28", in_chans=1, seed=0),
            _budget(max_steps=3),
            tmp_path,
            show_progress=False,
        )


def test_a_minutes_budget_estimates_its_steps_and_stops_in_time(
    small_images, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A clock that ticks one second per reading: the trainer reads it once per step.
    ticks = iter(range(10_000))
    monkeypatch.setattr(trainer, "time", SimpleNamespace(perf_counter=lambda: float(next(ticks))))
    monkeypatch.setattr(trainer, "CALIBRATION_STEPS", 2)
    config = _budget(max_minutes=0.1)  # 6 s
    result = pretrain(
        small_images, create_encoder("vit_tiny_28", in_chans=1, seed=0), config, tmp_path, show_progress=False
    )
    # Steps 2-3 take 1 s each, so after 3 s the remaining 3 s give 3 more steps; then the time is up.
    assert result.time_up and result.finished and result.total_steps == result.steps == 6
    state = torch.load(tmp_path / STATE_FILE, weights_only=True)
    assert state["total_steps"] == 6 and state["seconds_per_step"] == 1.0 and state["trained_seconds"] >= 6
    assert (tmp_path / "encoder" / "model.safetensors").is_file()
    # Three more seconds: the extension continues at the measured speed.
    longer = pretrain(
        small_images,
        create_encoder("vit_tiny_28", in_chans=1, seed=0),
        _budget(max_minutes=0.15),
        tmp_path,
        show_progress=False,
        stop_after_steps=7,
    )
    assert longer.resumed_from_step == 6 and longer.total_steps == 6 + 3 and not longer.finished


def test_continued_pretraining_starts_from_the_checkpoint_with_fresh_heads(small_images, tmp_path: Path) -> None:
    start = create_encoder("vit_tiny_28", in_chans=1, seed=7)
    folder = save_encoder(start, tmp_path / "tiny-start")
    config = _budget(max_steps=2, init_from=str(folder))
    torch.manual_seed(config.seed)
    method = DINO(initial_encoder(config.init_from), config)
    for key, value in start.backbone.state_dict().items():
        assert torch.equal(method.student.state_dict()[key], value), key
        assert torch.equal(method.teacher.state_dict()[key], value), key
    # Fresh heads: exactly those DINO builds over random weights with the same seed.
    torch.manual_seed(config.seed)
    fresh = DINO(create_encoder("vit_tiny_28", in_chans=1, seed=0), config)
    for key, value in fresh.student_head.state_dict().items():
        assert torch.equal(method.student_head.state_dict()[key], value), key

    result = pretrain(
        small_images, create_encoder("vit_tiny_28", in_chans=1), config, tmp_path / "run", show_progress=False
    )
    assert result.finished and result.init_from == "tiny-start"
    written = (result.encoder_dir / "config.json").read_text()
    assert json.loads(written)["init_from"] == "tiny-start" and str(tmp_path) not in written
    assert "Continued from: tiny-start" in (result.encoder_dir / "model_card.md").read_text()
    assert init_name("public:uni@vit:/private/weights/pytorch_model.bin") == "public:uni@vit:pytorch_model.bin"
    with pytest.raises(Exception, match="neither a checkpoint folder nor public"):
        initial_encoder("vit_tiny_28")


def test_health_warning_fires_on_a_uniform_teacher() -> None:
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(128, 192, generator=generator)
    # A teacher near uniform over 1024 prototypes: tiny logits, as a collapsed DINO head gives.
    uniform = teacher_readings(1e-3 * torch.randn(128, 1024, generator=generator), teacher_temp=0.07)
    assert uniform["teacher_entropy"] > 0.99
    peaked = teacher_readings(10 * torch.randn(128, 1024, generator=generator), teacher_temp=0.07)
    assert peaked["teacher_entropy"] < 0.9 and peaked["prototype_use"] > 0.5

    monitor = CollapseMonitor(judge_teacher_from_step=2)
    monitor.update(1, features, uniform)  # still warming up: not judged
    assert monitor.problems(monitor.history[-1]) == {}
    for step in (2, 3, 4):
        monitor.update(step, features, peaked)
    assert not monitor.warnings
    for step in (5, 6, 7):
        monitor.update(step, features, uniform, loss=6.9)
    assert monitor.collapsed and {w["check"] for w in monitor.warnings} == {"teacher_entropy"}
    assert monitor.history[-1]["warnings"] and monitor.history[-1]["loss"] == 6.9

    # The reviewed DINO run: relative entropy 0.968 and 35 of 1024 prototypes over 128 rows; one reading at the end.
    reviewed = CollapseMonitor()
    reviewed.update(240, features, {"teacher_entropy": 0.968, "prototypes_used": 0.034, "prototype_use": 35 / 128})
    assert not reviewed.warnings
    assert reviewed.finish() and "teacher relative entropy 0.968 > 0.9" in reviewed.warnings[0]["message"]
    assert not reviewed.finish(), "a finished run called again does not repeat its verdict"
    few = CollapseMonitor(patience=1)
    few.update(1, features, {"teacher_entropy": 0.5, "prototype_use": 10 / 128})
    assert [w["check"] for w in few.warnings] == ["prototype_use"]


def test_a_check_failing_in_most_recent_readings_is_collapse_even_without_a_streak() -> None:
    features = torch.randn(128, 192, generator=torch.Generator().manual_seed(0))
    low, ok = {"teacher_entropy": 0.4, "prototype_use": 0.06}, {"teacher_entropy": 0.4, "prototype_use": 0.102}
    # The pathology centring run: prototype use under 10% at 45 of 48 readings, 10.2% at the last one.
    hovering = CollapseMonitor()
    for step in range(48):
        hovering.update(step, features, ok if step in (20, 40, 47) else low)
    assert hovering.bad_readings == 0 and hovering.collapsed
    assert hovering.verdict() == [
        "prototype use 6.0% < 10% at its latest failure, and failing in 10 of the last 12 readings"
    ]
    assert "in 10 of the last 12 readings" in hovering.message()
    # Fail twice, pass once, all run long: never a streak of 3, yet two thirds of the readings fail.
    flapping = CollapseMonitor()
    for step in range(30):
        flapping.update(step, features, ok if step % 3 == 2 else low)
    assert flapping.bad_readings < 3 and flapping.collapsed
    said = [(w["step"], w["message"].split(", ")[-1]) for w in flapping.warnings]
    assert said == [(12, "in 3 of the last 4 readings")], "one warning, not one per flap"
    # A run that warned mid-way and recovered for the last quarter ends healthy, its warning kept.
    recovered = CollapseMonitor()
    for step in range(40):
        recovered.update(step, features, low if 10 <= step < 14 else ok)
    assert not recovered.collapsed and not recovered.verdict()
    assert [w["step"] for w in recovered.warnings] == [12]
    # A resumed run rebuilds the same verdict from its history without warning again.
    resumed = CollapseMonitor()
    resumed.restore(hovering.history, hovering.warnings)
    assert resumed.collapsed and resumed.verdict() == hovering.verdict()
    assert resumed.warnings == hovering.warnings


def test_knn_monitor_reads_during_pretraining(small_images, breastmnist_npz: Path, tmp_path: Path) -> None:
    separable = knn_predict(
        torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]]),
        torch.tensor([0, 0, 1, 1]),
        torch.tensor([[1.0, 0.05], [0.05, 1.0]]),
        k=2,
        temperature=0.07,
    )
    assert separable.tolist() == [0, 1]
    labelled = load_medmnist_npz(breastmnist_npz)["val"].subset(np.arange(40), name="val40")
    knn = KNNMonitorSet.split(labelled, held_out_fraction=0.3)
    assert not set(knn.reference.patient_ids) & set(knn.held_out.patient_ids)
    assert knn.neighbours() == round(len(knn.reference) ** 0.5)
    result = pretrain(
        small_images,
        create_encoder("vit_tiny_28", in_chans=1, seed=0),
        _budget(max_steps=2),
        tmp_path,
        show_progress=False,
        knn_monitor=knn,
    )
    reading = result.monitor[-1]
    assert 0.0 <= reading["knn_accuracy"] <= 1.0 and 0.0 <= reading["knn_balanced_accuracy"] <= 1.0
    logged = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert "knn_accuracy" in logged[-1] and "warnings" in logged[-1]
    assert json.loads((tmp_path / "summary.json").read_text())["warnings"] == result.warnings


def test_threads_option_becomes_the_config_field() -> None:
    from medfoundry.cli.pretrain import pretrain_overrides

    values = pretrain_overrides(None, False, ["pretrain.threads=3"], threads=2)
    assert values == ["pretrain.threads=2", "pretrain.threads=3"]  # -s still wins
    assert PretrainConfig(threads=2).threads == 2
    with pytest.raises(ValueError):
        PretrainConfig(threads=0)


def test_fingerprint_holds_only_the_running_methods_section(breastmnist_npz: Path) -> None:
    """A setting of another method (a DINO option, a new distillation field) leaves a SimCLR run resumable; one of
    SimCLR's own does not."""
    from medfoundry.config import SimCLRConfig
    from medfoundry.ssl.trainer import METHOD_SECTIONS, run_fingerprint

    assert set(PretrainConfig.model_fields) >= METHOD_SECTIONS  # a renamed section must be renamed here too
    images = load_medmnist_npz(breastmnist_npz)["train"].subset(np.arange(8))
    encoder = create_encoder("vit_tiny_28", in_chans=1, seed=0)
    base = PretrainConfig(method="simclr")
    same = run_fingerprint(base, images, encoder)
    other_method = base.model_copy(update={"dino": DinoConfig(out_dim=128)})
    assert run_fingerprint(other_method, images, encoder) == same
    own = base.model_copy(update={"simclr": SimCLRConfig(temperature=0.5)})
    assert run_fingerprint(own, images, encoder) != same


def _xray_folder(source: Path, target: Path, per_class: int = 12) -> Path:
    """A class-per-folder copy of the first real Kermany X-rays, written anew (new paths, new modification times)."""
    for label in ("NORMAL", "PNEUMONIA"):
        (target / label).mkdir(parents=True)
        for path in sorted((source / label).iterdir())[:per_class]:
            (target / label / path.name).write_bytes(path.read_bytes())
    return target


def test_resume_survives_a_copied_data_folder_but_not_changed_images(shared_data: Path, tmp_path: Path) -> None:
    """A user copies their data folder (new paths and times, same bytes) between a stopped run and its resume: the
    run resumes. Rewrite one image and the same state is refused."""
    from medfoundry.data.registry import load_dataset

    source = shared_data / "kermany_cxr_224_trainsubset"
    if not source.is_dir():
        pytest.skip(f"{source} is absent")
    first = _xray_folder(source, tmp_path / "first")
    copied = _xray_folder(source, tmp_path / "copied")

    def images(folder: Path):  # noqa: ANN202 - a FileImageSet
        return load_dataset(f"folder:{folder}", image_size=28, channels=1)["train"]

    before, after = images(first), images(copied)
    assert before.fingerprint() != after.fingerprint()  # the quick fingerprint sees paths and times
    assert before.content_fingerprint() == after.content_fingerprint()

    config = PretrainConfig(**{**SMALL, "method": "simclr", "epochs": 4, "batch_size": 8})
    out = tmp_path / "run"
    encoder = create_encoder("vit_tiny_28", in_chans=1, seed=0)
    part = pretrain(before, encoder, config, out, stop_after_steps=2, show_progress=False)
    assert part.steps == 2 and not part.finished
    resumed = pretrain(after, create_encoder("vit_tiny_28", in_chans=1, seed=0), config, out, show_progress=False)
    assert resumed.resumed_from_step == 2 and resumed.finished

    changed = sorted((copied / "NORMAL").iterdir())[0]
    changed.write_bytes((source / "NORMAL" / sorted(p.name for p in (source / "NORMAL").iterdir())[-1]).read_bytes())
    with pytest.raises(Exception, match="another config or data"):
        pretrain(images(copied), create_encoder("vit_tiny_28", in_chans=1, seed=0), config, out, show_progress=False)
