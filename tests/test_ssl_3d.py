"""3D pre-training on real CT crops: the MONAI-based 3D ViT as an Encoder and a checkpoint, seeded 3D views, and MAE
and SimCLR on the shared trainer (loss falls, resume is exact, the exported encoder loads and embeds).

Data: 42 crops of 28^3 voxels (stride 14) from TotalSegmentator's example CT (3 mm voxels), for vit3d_tiny_28.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from medfoundry.config import PretrainConfig, ViewsConfig
from medfoundry.data.nifti import load_nifti_crops
from medfoundry.data.sample import ImageSet
from medfoundry.errors import ModelError
from medfoundry.models.backbones import create_encoder
from medfoundry.models.checkpoint import load_encoder, load_encoder_or_build, save_encoder
from medfoundry.models.features import extract_features
from medfoundry.models.vit3d import patchify_3d
from medfoundry.ssl.base import SSL_METHODS, StepValues
from medfoundry.ssl.trainer import pretrain
from medfoundry.ssl.views import SeededViewDataset, seeded_rng

COMMON = dict(
    batch_size=8,
    lr=1e-3,
    warmup_epochs=1,
    checkpoint_every_steps=2,
    log_every_steps=1,
    monitor_every_steps=10,
    tensorboard=False,
)


def test_encoder_normalises_pools_and_round_trips(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    encoder = create_encoder("vit3d_tiny_28", in_chans=1, pool="token+avg", seed=0, mean=(0.2,), std=(0.3,))
    assert encoder.is_3d and encoder.img_size == 28 and encoder.embed_dim == 384
    volumes = torch.rand(2, 1, 28, 28, 28)
    # mean/std broadcast over (B, C, D, H, W), and uint8 volumes are scaled to 0..1 first.
    torch.testing.assert_close(encoder.normalize(volumes), (volumes - 0.2) / 0.3)
    as_bytes = (volumes * 255).round().to(torch.uint8)
    torch.testing.assert_close(encoder.normalize(as_bytes), (as_bytes.float() / 255 - 0.2) / 0.3)
    encoder.eval()
    features = encoder(encoder.normalize(volumes))
    assert features.shape == (2, 384) and torch.isfinite(features).all()

    save_encoder(encoder, tmp_path / "enc")
    config = json.loads((tmp_path / "enc" / "config.json").read_text())
    assert config["architecture"] == "medfoundry.vit3d"
    assert config["model_kwargs"]["patch_size"] == 7 and config["img_size"] == 28
    assert "1 channel(s), 28^3 voxels" in (tmp_path / "enc" / "model_card.md").read_text()
    for loaded in (load_encoder(tmp_path / "enc"), load_encoder_or_build(str(tmp_path / "enc"), 1, 28)):
        loaded.eval()
        assert loaded.is_3d and loaded.pool == "token+avg"
        torch.testing.assert_close(loaded(loaded.normalize(volumes)), features)
    assert load_encoder_or_build("vit3d_tiny_32", 1, None).img_size == 32


def test_patchify_matches_token_order() -> None:
    """Voxel targets line up with the tokens: the conv patch embedding is a linear map of patchify's rows."""
    torch.set_num_threads(1)
    vit = create_encoder("vit3d_tiny_28", in_chans=2, seed=0).backbone
    x = torch.randn(2, 2, 28, 28, 28)
    conv = vit.patch_embed.patch_embeddings
    weight = conv.weight.permute(0, 2, 3, 4, 1).reshape(conv.out_channels, -1)  # (pd, ph, pw, c) as patchify
    tokens = conv(x).flatten(2).transpose(1, 2)
    torch.testing.assert_close(patchify_3d(x, 7) @ weight.T + conv.bias, tokens, atol=1e-4, rtol=1e-4)
    assert patchify_3d(x, 7).shape == (2, 64, 7**3 * 2)


@pytest.mark.parametrize("method, n_views", [("simclr", 2), ("mae", 1)])
def test_views_are_seeded(ct_crops: ImageSet, method: str, n_views: int) -> None:
    torch.set_num_threads(1)
    encoder = create_encoder("vit3d_tiny_28", in_chans=1, seed=0)
    config = PretrainConfig(method=method)
    transform = SSL_METHODS[method](encoder, config).build_views(encoder, config)
    dataset = SeededViewDataset(ct_crops, transform, seed=0)
    views = dataset[(0, 5)]
    assert len(views) == n_views
    assert all(v.shape == (1, 28, 28, 28) and v.dtype == torch.float32 and type(v) is torch.Tensor for v in views)
    # Normalised with the encoder's mean/std (0.5, 0.5): 0..1 becomes -1..1.
    assert all(v.min() >= -1.0 - 1e-5 and v.max() <= 1.0 + 1e-5 for v in views)
    torch.rand(10)  # the global generator's state must not matter
    again = dataset[(0, 5)]
    assert all(torch.equal(a, b) for a, b in zip(views, again, strict=True))
    assert not torch.equal(views[0], dataset[(1, 5)][0]), "another epoch gives another view"
    assert not torch.equal(views[0], SeededViewDataset(ct_crops, transform, seed=1)[(0, 5)][0])
    if n_views == 2:
        assert not torch.equal(views[0], views[1])
    # The same draws under seeded_rng whether the volume comes as float 0..1 or as uint8.
    volume = ct_crops.load(5)
    with seeded_rng(0, 0, 5):
        from_bytes = transform((volume * 255).round().astype(np.uint8))
    with seeded_rng(0, 0, 5):
        from_float = transform(volume)
    torch.testing.assert_close(from_bytes[0], from_float[0], atol=0.02, rtol=0)


def test_view_size_must_match_the_3d_encoder() -> None:
    encoder = create_encoder("vit3d_tiny_28", in_chans=1, seed=0)
    config = PretrainConfig(method="simclr", views=ViewsConfig(global_crop_size=24))
    with pytest.raises(ModelError, match=r"global_crop_size \(24\) must equal the 3D encoder's input size \(28\)"):
        SSL_METHODS["simclr"](encoder, config).build_views(encoder, config)


def test_mae_masks_3d_patches() -> None:
    torch.set_num_threads(1)
    method = SSL_METHODS["mae"](create_encoder("vit3d_tiny_28", in_chans=1, seed=0), PretrainConfig(method="mae"))
    # 64 patches plus the CLS token: the CLS token and 16 patches kept, 48 masked, per sample; seeded by step.
    keep, mask = method._mask(3, step=2, device=torch.device("cpu"))
    assert keep.shape == (3, 17) and mask.shape == (3, 48) and (keep[:, 0] == 0).all()
    assert torch.equal(keep, method._mask(3, step=2, device=torch.device("cpu"))[0])
    values = StepValues(step=0, epoch=0, lr=1e-3, weight_decay=0.05, momentum=0.99, teacher_temp=0.04)
    output = method.training_step([torch.randn(3, 1, 28, 28, 28)], values)
    assert torch.isfinite(output.loss) and output.monitor_features.shape == (3, 192)
    with pytest.raises(ModelError, match="MAE was built for 64 patches"):
        method.training_step([torch.randn(3, 1, 14, 14, 14)], values)


@pytest.mark.parametrize("method", ["mae", "simclr", "mocov3", "byol"])
def test_loss_goes_down(ct_crops: ImageSet, method: str, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    config = PretrainConfig(method=method, epochs=6, **COMMON)
    encoder = create_encoder("vit3d_tiny_28", in_chans=1, seed=0)
    result = pretrain(ct_crops, encoder, config, tmp_path, show_progress=False)
    assert result.finished and result.steps == 30  # 42 crops: 5 batches of 8 per epoch
    losses = [json.loads(line)["loss"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 30 and all(np.isfinite(losses))
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    # MAE here: about 1.30 -> 1.00 (predicting each masked patch's mean scores 342/343 against normalised targets;
    # it gets below that, to about 0.99, after some 200 steps). SimCLR: about 4.4 -> 2.1.
    assert last < first, (first, last, losses)


@pytest.mark.parametrize("method", ["mae", "simclr", "mocov3", "byol"])
def test_resume_is_exact_and_export_embeds(ct_crops: ImageSet, method: str, tmp_path: Path) -> None:
    """Stop after 3 of 4 steps, resume, and match an uninterrupted run bit for bit; then embed with the export."""
    torch.set_num_threads(1)
    images = ct_crops.subset(np.arange(16), name="ct16")
    config = PretrainConfig(method=method, epochs=2, **COMMON)

    def run(folder: str, stop: int | None = None):
        encoder = create_encoder("vit3d_tiny_28", in_chans=1, seed=0)
        return pretrain(images, encoder, config, tmp_path / folder, stop_after_steps=stop, show_progress=False)

    full = run("full")
    part = run("split", stop=3)
    assert full.finished and full.steps == 4 and not part.finished
    torch.rand(100)
    resumed = run("split")
    assert resumed.resumed_from_step == 3 and resumed.finished

    a = load_file(str(full.encoder_dir / "model.safetensors"))
    b = load_file(str(resumed.encoder_dir / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    init = create_encoder("vit3d_tiny_28", in_chans=1, seed=0).backbone.state_dict()
    assert a.keys() == init.keys()  # the plain 3D ViT: no wrapper, decoder or projection keys
    assert any(not torch.equal(init[key], a[key]) for key in a), "the exported encoder did not train"

    encoder = load_encoder(full.encoder_dir, pool="token+avg")
    assert json.loads((full.encoder_dir / "config.json").read_text())["ssl_method"] == method
    features = extract_features(encoder, ct_crops.subset(np.arange(10)), batch_size=4)
    assert features.shape == (10, 384) and np.isfinite(features).all()
    # A crop of another size is resized to the encoder's 28^3 (trilinear) before embedding.
    assert extract_features(encoder, load_nifti_crops(ct_crops.source, crop_size=32)["train"]).shape == (9, 384)


@pytest.mark.parametrize("method", ["dino", "ibot"])
def test_2d_only_methods_refuse_3d_encoders(method: str) -> None:
    encoder = create_encoder("vit3d_tiny_28", in_chans=1, seed=0)
    with pytest.raises(ModelError, match="DINO's multi-crop views are 2D|iBOT"):
        SSL_METHODS[method](encoder, PretrainConfig(method=method))
