"""3D ResNet and 2.5D (slice) encoders by name: shapes, the 2.5D stacking and pooling against a slice-by-slice
loop, wrapping a 2D checkpoint, checkpoint round trips, and SimCLR in 3D on real CT crops with both.

Data: crops of TotalSegmentator's example CT (3 mm voxels), as in test_ssl_3d.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medfoundry.config import PretrainConfig, ViewsConfig
from medfoundry.data.sample import ImageSet
from medfoundry.errors import ModelError
from medfoundry.models.backbones import create_encoder
from medfoundry.models.checkpoint import load_encoder, save_encoder
from medfoundry.models.features import extract_features
from medfoundry.models.slices import slice_encoder_from, stack_slices
from medfoundry.ssl.trainer import pretrain


def _volumes(crops: ImageSet, n: int) -> torch.Tensor:
    return torch.from_numpy(np.asarray(crops.images[:n])).float()


@pytest.mark.parametrize("name", ["resnet3d_tiny", "resnet3d_10"])
def test_resnet3d_takes_any_volume_size_and_round_trips(name: str, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    encoder = create_encoder(name, in_chans=1, img_size=28, seed=0).eval()
    assert encoder.is_3d and encoder.img_size is None  # fully convolutional: no fixed input size recorded
    with torch.inference_mode():
        cube = encoder(encoder.normalize(torch.rand(2, 1, 28, 28, 28)))
        slab = encoder(encoder.normalize(torch.rand(1, 1, 20, 48, 40)))
    assert cube.shape == (2, encoder.embed_dim) and slab.shape == (1, encoder.embed_dim)
    volumes = torch.rand(2, 1, 24, 24, 24)
    loaded = load_encoder(save_encoder(encoder, tmp_path / "ckpt")).eval()
    with torch.inference_mode():
        torch.testing.assert_close(loaded(loaded.normalize(volumes)), encoder(encoder.normalize(volumes)))
    with pytest.raises(ModelError, match="depth must be one of"):
        create_encoder("resnet3d_10", in_chans=1, depth=11)


def test_stacking_puts_neighbours_in_channels() -> None:
    volume = torch.arange(5.0).view(1, 1, 5, 1, 1).expand(1, 1, 5, 2, 2)
    stacked = stack_slices(volume, context=1)
    assert stacked.shape == (1, 5, 3, 2, 2)
    # Slice d sees d-1, d, d+1, the ends repeated.
    assert stacked[0, :, :, 0, 0].tolist() == [[0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 4]]
    assert stack_slices(volume, context=0, stride=2)[0, :, 0, 0, 0].tolist() == [0, 2, 4]


def test_slice_encoder_matches_a_slice_by_slice_loop(ct_crops: ImageSet) -> None:
    """Mean pooling over the 2D network's features of each slice with its two neighbours, computed by hand."""
    torch.set_num_threads(1)
    encoder = create_encoder("2.5d:vit_tiny_28", in_chans=1, img_size=28, seed=0).eval()
    assert encoder.is_3d and encoder.embed_dim == 192
    volumes = _volumes(ct_crops, 2)
    net = encoder.backbone.backbone2d
    with torch.inference_mode():
        got = encoder(encoder.normalize(volumes))
        padded = F.pad(volumes, (0, 0, 0, 0, 1, 1), mode="replicate")
        slices = [padded[:, 0, d : d + 3] for d in range(volumes.shape[2])]  # (B, 3, H, W) each
        expected = torch.stack([net((s - 0.5) / 0.5) for s in slices], dim=1).mean(dim=1)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_attention_pooling_weights_slices_and_trains(ct_crops: ImageSet) -> None:
    torch.set_num_threads(1)
    encoder = create_encoder("2.5d-attention:resnet18", in_chans=1, seed=0)
    volumes = _volumes(ct_crops, 2)[:, :, :8]  # 8 slices of 28 x 28
    features = encoder.backbone.slice_features(volumes)
    weights = encoder.backbone.pool.weights(features)
    assert weights.shape == (2, 8) and torch.allclose(weights.sum(dim=1), torch.ones(2))
    encoder(encoder.normalize(volumes)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder.backbone.pool.parameters())
    with pytest.raises(ModelError, match="aggregate must be one of"):
        create_encoder("2.5d:resnet18", in_chans=1, aggregate="max")
    with pytest.raises(ModelError, match="wraps a 2D model"):
        create_encoder("2.5d:vit3d_tiny_28", in_chans=1)


def test_a_2d_checkpoint_becomes_a_25d_encoder(ct_crops: ImageSet, tmp_path: Path) -> None:
    """An RGB 2D encoder with its own normalisation sees (previous, current, next) slice as (R, G, B)."""
    torch.set_num_threads(1)
    encoder_2d = create_encoder(
        "vit_tiny_28", in_chans=3, img_size=28, seed=3, mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.4)
    )
    wrapped = slice_encoder_from(load_encoder(save_encoder(encoder_2d, tmp_path / "2d")), aggregate="mean").eval()
    volumes = _volumes(ct_crops, 1)
    with torch.inference_mode():
        padded = F.pad(volumes, (0, 0, 0, 0, 1, 1), mode="replicate")
        per_slice = [encoder_2d.eval()(encoder_2d.normalize(padded[:, 0, d : d + 3])) for d in range(28)]
        torch.testing.assert_close(wrapped(wrapped.normalize(volumes)), torch.stack(per_slice, 1).mean(1))
    # Its own checkpoint round-trips (the slice network's normalisation travels in config.json).
    loaded = load_encoder(save_encoder(wrapped, tmp_path / "25d")).eval()
    config = json.loads((tmp_path / "25d" / "config.json").read_text())
    assert config["architecture"] == "medfoundry.slices2d" and np.allclose(
        config["model_kwargs"]["slice_mean"], [0.4, 0.5, 0.6]
    )
    with torch.inference_mode():
        torch.testing.assert_close(loaded(loaded.normalize(volumes)), wrapped(wrapped.normalize(volumes)))
    with pytest.raises(ModelError, match="stacks 2k\\+1 slices"):
        slice_encoder_from(create_encoder("vit_tiny_28", in_chans=2, img_size=28))


@pytest.mark.parametrize("name", ["resnet3d_tiny", "2.5d:vit_tiny_28"])
def test_simclr_pretrains_and_the_export_embeds(ct_crops: ImageSet, name: str, tmp_path: Path) -> None:
    """A few SimCLR steps in 3D: the loss is finite, the weights move, the exported checkpoint embeds volumes."""
    torch.set_num_threads(2)
    images = ct_crops.subset(np.arange(16), name="ct16")
    config = PretrainConfig(
        method="simclr",
        epochs=1,
        batch_size=8,
        warmup_epochs=0,
        checkpoint_every_steps=10,
        log_every_steps=1,
        monitor_every_steps=10,
        tensorboard=False,
        views=ViewsConfig(global_crop_size=28),
    )
    encoder = create_encoder(name, in_chans=1, img_size=28, seed=0)
    before = {k: v.clone() for k, v in encoder.backbone.state_dict().items()}
    result = pretrain(images, encoder, config, tmp_path, show_progress=False)
    assert result.finished and result.steps == 2
    losses = [json.loads(line)["loss"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and np.isfinite(losses).all()
    exported = load_encoder(result.encoder_dir)
    after = exported.backbone.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if k in after), "the encoder did not train"
    features = extract_features(exported, ct_crops.subset(np.arange(6)), batch_size=3)
    assert features.shape == (6, exported.embed_dim) and np.isfinite(features).all()


def test_specs_wrap_checkpoints_as_25d(tmp_path: Path) -> None:
    """``2.5d:FOLDER`` in any --model / suite checkpoint field wraps a saved 2D encoder over slices."""
    from medfoundry.models.checkpoint import load_encoder_or_build

    save_encoder(create_encoder("vit_tiny_28", in_chans=3, img_size=28, seed=1), tmp_path / "2d")
    wrapped = load_encoder_or_build(f"2.5d-attention:{tmp_path / '2d'}", in_chans=1, img_size=None)
    assert wrapped.is_3d and wrapped.backbone.aggregate == "attention" and wrapped.backbone.context == 1
    built = load_encoder_or_build("2.5d:resnet18", in_chans=1, img_size=None)
    assert built.is_3d and built.backbone.slice_model == "resnet18"
