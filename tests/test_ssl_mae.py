"""MAE on the shared trainer: the loss goes down, resume is exact, the exported ViT loads and embeds, and
non-ViT backbones are refused. Small real data: BreastMNIST training images, 28 px ViT with 4 px patches."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from medfoundry.config import PretrainConfig, ViewsConfig
from medfoundry.data.medmnist import load_medmnist_npz
from medfoundry.errors import ModelError
from medfoundry.models.backbones import create_encoder
from medfoundry.models.checkpoint import load_encoder
from medfoundry.models.features import extract_features
from medfoundry.ssl.base import SSL_METHODS, StepValues
from medfoundry.ssl.trainer import pretrain
from medfoundry.ssl.views import to_pil

COMMON = dict(
    method="mae",
    batch_size=16,
    lr=1e-3,
    warmup_epochs=1,
    checkpoint_every_steps=2,
    log_every_steps=1,
    monitor_every_steps=8,
    tensorboard=False,
)


@pytest.fixture(scope="module")
def train_images(breastmnist_npz: Path):
    return load_medmnist_npz(breastmnist_npz)["train"]


def _values(step: int) -> StepValues:
    return StepValues(step=step, epoch=0, lr=1e-3, weight_decay=0.05, momentum=0.99, teacher_temp=0.04)


def test_mae_is_registered() -> None:
    assert "mae" in SSL_METHODS


def test_loss_goes_down(train_images, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    images = train_images.subset(np.arange(64), name="breast64")
    config = PretrainConfig(epochs=8, bf16=True, **COMMON)
    result = pretrain(images, create_encoder("vit_tiny_28", in_chans=1, seed=0), config, tmp_path, show_progress=False)
    assert result.finished and result.steps == 32
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    losses = [record["loss"] for record in records]
    assert len(losses) == 32 and all(np.isfinite(losses))
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < first, (first, last, losses)
    # Against per-patch normalised targets of 16 pixels, predicting each patch's mean (zeros) scores 15/16: the
    # decoder must do better than that (here about 0.87 after 32 steps).
    assert last < 15 / 16, (last, losses)
    assert any("feature_std" in record for record in records)


def test_resume_is_exact_and_export_embeds(train_images, tmp_path: Path) -> None:
    """Stop after 3 of 4 steps (mid-epoch), resume, and match an uninterrupted run bit for bit."""
    torch.set_num_threads(1)
    images = train_images.subset(np.arange(32), name="breast32")
    config = PretrainConfig(epochs=2, **COMMON)

    def run(folder: str, stop: int | None = None):
        encoder = create_encoder("vit_tiny_28", in_chans=1, img_size=28, seed=0)
        return pretrain(images, encoder, config, tmp_path / folder, stop_after_steps=stop, show_progress=False)

    full = run("full")
    part = run("split", stop=3)
    assert full.finished and full.steps == 4 and not part.finished
    # Draws from the global generator between the runs must not change the masks of the resumed steps.
    torch.rand(100)
    resumed = run("split")
    assert resumed.resumed_from_step == 3 and resumed.finished

    a = load_file(str(full.encoder_dir / "model.safetensors"))
    b = load_file(str(resumed.encoder_dir / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    init = create_encoder("vit_tiny_28", in_chans=1, img_size=28, seed=0).backbone.state_dict()
    # The exported encoder is the plain ViT (no wrapper or decoder keys), and it trained.
    assert a.keys() == init.keys()
    assert any(not torch.equal(init[key], a[key]) for key in a), "the exported encoder did not train"

    encoder = load_encoder(full.encoder_dir)
    assert json.loads((full.encoder_dir / "config.json").read_text())["ssl_method"] == "mae"
    features = extract_features(encoder, images.subset(np.arange(8)))
    assert features.shape == (8, 192) and np.isfinite(features).all()


def test_non_vit_backbone_is_refused() -> None:
    encoder = create_encoder("resnet18", in_chans=1, seed=0)
    with pytest.raises(ModelError, match="MAE needs a ViT backbone; got resnet18"):
        SSL_METHODS["mae"](encoder, PretrainConfig(method="mae"))


def test_one_view_and_masking() -> None:
    torch.set_num_threads(1)
    encoder = create_encoder("vit_tiny_28", in_chans=1, seed=0)
    method = SSL_METHODS["mae"](encoder, PretrainConfig(method="mae"))
    image = np.random.default_rng(0).integers(0, 256, (1, 28, 28), dtype=np.uint8)
    views = method.build_views(encoder, PretrainConfig(method="mae"))(to_pil(image))
    assert len(views) == 1 and views[0].shape == (1, 28, 28)
    # 49 patches plus the CLS token: the CLS token and 12 patches kept, 37 patches masked, per sample.
    keep, mask = method._mask(4, step=5, device=torch.device("cpu"))
    assert keep.shape == (4, 13) and mask.shape == (4, 37)
    assert (keep[:, 0] == 0).all() and (mask > 0).all()
    assert all(sorted(torch.cat([keep[i], mask[i]]).tolist()) == list(range(50)) for i in range(4))
    assert not torch.equal(keep[0], keep[1]), "each sample gets its own mask"
    again, _ = method._mask(4, step=5, device=torch.device("cpu"))
    other, _ = method._mask(4, step=6, device=torch.device("cpu"))
    assert torch.equal(keep, again) and not torch.equal(keep, other)


@pytest.mark.parametrize("in_chans, crop", [(3, 28), (1, 24)])
def test_channels_and_dynamic_crop_size(in_chans: int, crop: int) -> None:
    """3-channel input, and crops smaller than the ViT's 28 px (dynamic_img_size resamples its positions)."""
    torch.set_num_threads(1)
    config = PretrainConfig(method="mae", views=ViewsConfig(global_crop_size=crop))
    method = SSL_METHODS["mae"](create_encoder("vit_tiny_28", in_chans=in_chans, seed=0), config)
    output = method.training_step([torch.randn(2, in_chans, crop, crop)], _values(0))
    assert torch.isfinite(output.loss) and output.monitor_features.shape == (2, 192)
    output.loss.backward()
