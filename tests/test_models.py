"""Backbones by name, seeded initialisation, and the safetensors checkpoint folder (timm interop, bad files)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file
from threadpoolctl import threadpool_limits

from medfoundry.errors import ModelError
from medfoundry.models.backbones import create_encoder
from medfoundry.models.checkpoint import CONFIG_FILE, WEIGHTS_FILE, load_encoder, save_encoder, weights_hash

# One thread: on a shared 2-core machine OpenMP/BLAS threads fighting another job are many times slower.
torch.set_num_threads(1)
threadpool_limits(1)


def _inputs(in_chans: int, size: int, n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, in_chans, size, size, generator=torch.Generator().manual_seed(seed))


@torch.inference_mode()
def _features(encoder: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return encoder.eval()(x)


@pytest.fixture(scope="module")
def vit() -> torch.nn.Module:
    return create_encoder("vit_tiny_28", in_chans=1, seed=0)


@pytest.fixture(scope="module")
def saved_vit(vit: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_encoder(vit, tmp_path_factory.mktemp("ckpt") / "vit_tiny_28")


def test_vit_tiny_28_one_channel(vit: torch.nn.Module) -> None:
    assert vit.in_chans == 1
    assert vit.img_size == 28
    assert vit.embed_dim == 192
    assert vit.timm_name == "vit_tiny_patch16_224"
    assert vit.timm_kwargs["patch_size"] == 4 and vit.timm_kwargs["depth"] == 6
    assert vit.backbone.patch_embed.proj.weight.shape == (192, 1, 4, 4)
    out = _features(vit, _inputs(1, 28))
    assert out.shape == (4, 192)
    assert torch.isfinite(out).all()


def test_resnet18_three_channels_64px() -> None:
    encoder = create_encoder("resnet18", in_chans=3, img_size=64, seed=0)
    assert encoder.in_chans == 3
    assert encoder.embed_dim == 512
    # CNNs take any input size, so img_size is not passed to timm (it would reject it).
    assert "img_size" not in encoder.timm_kwargs
    assert encoder.backbone.conv1.weight.shape[1] == 3
    assert _features(encoder, _inputs(3, 64, n=2)).shape == (2, 512)


def test_same_seed_same_weights_other_seed_different(vit: torch.nn.Module) -> None:
    again = create_encoder("vit_tiny_28", in_chans=1, seed=0)
    other = create_encoder("vit_tiny_28", in_chans=1, seed=1)
    assert weights_hash(again.backbone) == weights_hash(vit.backbone)
    for name, tensor in vit.backbone.state_dict().items():
        assert torch.equal(tensor, again.backbone.state_dict()[name]), name
    assert weights_hash(other.backbone) != weights_hash(vit.backbone)
    assert not torch.equal(vit.backbone.patch_embed.proj.weight, other.backbone.patch_embed.proj.weight)


def test_unknown_model_name_names_it() -> None:
    with pytest.raises(ModelError, match="not_a_model") as info:
        create_encoder("not_a_model")
    assert "vit_tiny_28" in str(info.value)  # the message lists the presets


def test_save_load_round_trip(vit: torch.nn.Module, saved_vit: Path) -> None:
    assert sorted(p.name for p in saved_vit.iterdir()) == ["config.json", "model.safetensors", "model_card.md"]
    config = json.loads((saved_vit / CONFIG_FILE).read_text())
    assert config["weights_sha256_16"] == weights_hash(vit.backbone)
    assert config["embed_dim"] == 192 and config["in_chans"] == 1 and config["img_size"] == 28
    loaded = load_encoder(saved_vit)
    assert weights_hash(loaded.backbone) == weights_hash(vit.backbone)
    assert loaded.embed_dim == vit.embed_dim and loaded.img_size == 28 and loaded.in_chans == 1
    assert torch.equal(loaded.mean, vit.mean) and torch.equal(loaded.std, vit.std)
    x = _inputs(1, 28)
    assert torch.equal(_features(loaded, x), _features(vit, x))


def test_config_json_rebuilds_with_plain_timm(vit: torch.nn.Module, saved_vit: Path) -> None:
    cfg = json.loads((saved_vit / CONFIG_FILE).read_text())
    model = timm.create_model(cfg["architecture"], pretrained=False, **cfg["model_kwargs"])
    model.load_state_dict(load_file(str(saved_vit / WEIGHTS_FILE)), strict=True)
    x = _inputs(1, 28)
    torch.testing.assert_close(_features(model, x), _features(vit, x), rtol=0, atol=1e-6)


def test_missing_weights_file(saved_vit: Path, tmp_path: Path) -> None:
    folder = shutil.copytree(saved_vit, tmp_path / "ckpt")
    (folder / WEIGHTS_FILE).unlink()
    with pytest.raises(ModelError, match="lacks model.safetensors") as info:
        load_encoder(folder)
    assert str(folder) in str(info.value)


def test_corrupt_weights_file(saved_vit: Path, tmp_path: Path) -> None:
    folder = shutil.copytree(saved_vit, tmp_path / "ckpt")
    weights = folder / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:100])  # a truncated download
    with pytest.raises(ModelError, match="cannot read weights") as info:
        load_encoder(folder)
    assert str(weights) in str(info.value)


@pytest.mark.parametrize(
    ("other", "kwargs", "expected"),
    [
        ("resnet18", {"in_chans": 1}, "missing"),  # other parameter names
        ("vit_tiny_64", {"in_chans": 1}, "size mismatch"),  # same names, other shapes (patch size)
        ("vit_tiny_28", {"in_chans": 3}, "size mismatch"),  # other channel count
    ],
)
def test_weights_of_another_architecture(
    saved_vit: Path, tmp_path: Path, other: str, kwargs: dict[str, int], expected: str
) -> None:
    folder = shutil.copytree(saved_vit, tmp_path / "ckpt")
    foreign = save_encoder(create_encoder(other, seed=0, **kwargs), tmp_path / "foreign")
    shutil.copy(foreign / WEIGHTS_FILE, folder / WEIGHTS_FILE)
    with pytest.raises(ModelError, match="weights do not match vit_tiny_patch16_224") as info:
        load_encoder(folder)
    assert str(folder / WEIGHTS_FILE) in str(info.value)
    assert expected in str(info.value)


def test_token_plus_avg_pool(vit: torch.nn.Module, saved_vit: Path) -> None:
    pooled = create_encoder("vit_tiny_28", in_chans=1, seed=0, pool="token+avg")
    assert pooled.embed_dim == 2 * vit.embed_dim == 384
    x = _inputs(1, 28)
    out = _features(pooled, x)
    assert out.shape == (4, 384)
    # The first half is the CLS token, which is timm's default pooled feature for this ViT.
    torch.testing.assert_close(out[:, :192], _features(vit, x), rtol=0, atol=1e-6)
    # The pool can also be chosen when loading a checkpoint.
    assert load_encoder(saved_vit, pool="token+avg").embed_dim == 384
    with pytest.raises(ModelError, match="needs a ViT"):
        create_encoder("resnet18", in_chans=1, pool="token+avg")


def test_resnet_round_trip_with_batchnorm_buffers(tmp_path: Path) -> None:
    # BatchNorm's 0-dim num_batches_tracked buffer must hash and save like any other tensor.
    encoder = create_encoder("resnet18", in_chans=1, seed=0)
    encoder.backbone.bn1.num_batches_tracked.fill_(7)
    loaded = load_encoder(save_encoder(encoder, tmp_path / "resnet18"))
    assert weights_hash(loaded.backbone) == weights_hash(encoder.backbone)
    assert int(loaded.backbone.bn1.num_batches_tracked) == 7
    x = _inputs(1, 32, n=2)
    assert torch.equal(_features(loaded, x), _features(encoder, x))


# -- crafted configs, permissions, hash cache, loader options ------------------------------------------------


def _edit_config(folder: Path, **changes: object) -> Path:
    config = json.loads((folder / CONFIG_FILE).read_text())
    for key, value in changes.items():
        if key.startswith("kw_"):
            config["model_kwargs"][key[3:]] = value
        elif value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    return folder


def test_crafted_model_kwargs_cannot_make_timm_load_a_file(saved_vit: Path, tmp_path: Path) -> None:
    folder = shutil.copytree(saved_vit, tmp_path / "ckpt")
    # A real weights file timm would happily load through checkpoint_path (what an attacker would point at).
    _edit_config(folder, kw_checkpoint_path=str(saved_vit / WEIGHTS_FILE))
    with pytest.raises(ModelError, match="'checkpoint_path' is not a structural argument") as info:
        load_encoder(folder)
    assert str(folder / CONFIG_FILE) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("architecture", ["local-dir:/tmp/anything", "hf-hub:someone/model", "not_a_model"])
def test_architecture_must_be_a_registered_model(saved_vit: Path, tmp_path: Path, architecture: str) -> None:
    folder = _edit_config(shutil.copytree(saved_vit, tmp_path / "ckpt"), architecture=architecture)
    with pytest.raises(ModelError, match="neither a timm model nor a medfoundry one") as info:
        load_encoder(folder)
    assert str(folder / CONFIG_FILE) in str(info.value)


def test_structural_kwargs_of_every_preset_and_public_model_are_accepted() -> None:
    from medfoundry.models.backbones import BACKBONE_PRESETS, check_model_kwargs
    from medfoundry.models.public import PUBLIC_MODELS, get_public_model

    for _, preset in BACKBONE_PRESETS.items():
        check_model_kwargs(preset.timm_name, {**preset.kwargs, "in_chans": 1})
    for name in PUBLIC_MODELS.names():
        entry = get_public_model(name)
        for variant in ("full", "test"):
            check_model_kwargs(entry.timm_name, entry.build_kwargs(variant))


def test_config_without_model_kwargs_is_one_line(saved_vit: Path, tmp_path: Path) -> None:
    folder = _edit_config(shutil.copytree(saved_vit, tmp_path / "ckpt"), model_kwargs=None)
    with pytest.raises(ModelError, match="missing \\['model_kwargs'\\]") as info:
        load_encoder(folder)
    assert str(folder / CONFIG_FILE) in str(info.value)


def test_checkpoint_folder_follows_the_umask(vit: torch.nn.Module, tmp_path: Path) -> None:
    import os
    import stat

    previous = os.umask(0o022)
    try:
        folder = save_encoder(vit, tmp_path / "shared")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755  # mkdtemp's 0700 would hide it from colleagues
    for file in folder.iterdir():
        assert stat.S_IMODE(file.stat().st_mode) == 0o644, file


def test_weights_hash_is_cached_and_follows_every_change(monkeypatch: pytest.MonkeyPatch) -> None:
    from medfoundry.models import checkpoint

    encoder = create_encoder("vit_tiny_28", in_chans=1, seed=0)
    calls = []
    content_hash = checkpoint._content_hash
    monkeypatch.setattr(checkpoint, "_content_hash", lambda module: calls.append(1) or content_hash(module))
    first = weights_hash(encoder.backbone)
    assert weights_hash(encoder.backbone) == first and len(calls) == 1  # no second pass over the tensors
    # A training step writes the parameters in place.
    optimiser = torch.optim.SGD(encoder.parameters(), lr=0.1)
    encoder(torch.randn(2, 1, 28, 28)).square().mean().backward()
    optimiser.step()
    stepped = weights_hash(encoder.backbone)
    assert stepped != first and len(calls) == 2
    # Loading the original weights back gives the original hash; so does a replaced (not in-place) tensor.
    original = create_encoder("vit_tiny_28", in_chans=1, seed=0)
    encoder.backbone.load_state_dict(original.backbone.state_dict())
    assert weights_hash(encoder.backbone) == first
    with torch.no_grad():
        encoder.backbone.cls_token = torch.nn.Parameter(encoder.backbone.cls_token + 1)
    replaced = weights_hash(encoder.backbone)
    assert replaced not in (first, stepped)
    # Writes through .data bump no version counter (old EMA code does this): the sampled values still see them.
    encoder.backbone.blocks[0].mlp.fc1.weight.data.mul_(0.5)
    assert weights_hash(encoder.backbone) not in (first, stepped, replaced)
    assert weights_hash(encoder.backbone) == content_hash(encoder.backbone)


def test_tile_loader_pins_memory_only_for_a_cuda_device(monkeypatch: pytest.MonkeyPatch) -> None:
    from medfoundry.wsi.embedding import loader_options

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert loader_options(8, 0, device=torch.device("cpu"))["pin_memory"] is False
    assert loader_options(8, 0, device=torch.device("cuda"))["pin_memory"] is True
