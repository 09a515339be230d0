"""The checkpoint folder: ``model.safetensors`` + ``config.json`` + ``model_card.md``.

``config.json`` holds the timm architecture name and keyword arguments, so
``timm.create_model(cfg["architecture"], **cfg["model_kwargs"])`` rebuilds the network without
medfoundry, and the safetensors keys are timm's own names. The one non-timm architecture, ``medfoundry.vit3d``
(3D ViT from MONAI blocks), is rebuilt by medfoundry from the same two fields, with MONAI's parameter names.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from medfoundry import __version__
from medfoundry.errors import ModelError
from medfoundry.io_utils import atomic_dir
from medfoundry.models.backbones import (
    NON_TIMM_ARCHITECTURES,
    SLICES_PREFIXES,
    Encoder,
    create_encoder,
    create_timm_backbone,
    slice_encoder_from,
)
from medfoundry.models.vit3d import VIT3D_ARCHITECTURE

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CARD_FILE = "model_card.md"


def weights_hash(module: torch.nn.Module) -> str:
    """A content hash of the parameters and buffers, used as an embedding-cache key."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        # reshape(-1): 0-dim tensors (BatchNorm's num_batches_tracked) cannot be viewed as bytes directly.
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def encoder_config(encoder: Encoder, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "format": "medfoundry-encoder/1",
        "architecture": encoder.timm_name,
        "model_kwargs": {**encoder.timm_kwargs, "num_classes": 0},
        "in_chans": encoder.in_chans,
        "img_size": encoder.img_size,
        "normalization": {
            "mean": encoder.mean.flatten().tolist(),
            "std": encoder.std.flatten().tolist(),
            "input_range": "0-1 (uint8 images are divided by 255 first)",
        },
        "pool": encoder.pool,
        "embed_dim": encoder.embed_dim,
        "medfoundry_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        **(extra or {}),
    }


def save_encoder(encoder: Encoder, folder: Path, extra: dict[str, Any] | None = None, card: str = "") -> Path:
    """Write the encoder as a checkpoint folder, atomically."""
    config = encoder_config(encoder, extra)
    config["weights_sha256_16"] = weights_hash(encoder.backbone)
    state = {k: v.detach().contiguous() for k, v in encoder.backbone.state_dict().items()}
    with atomic_dir(Path(folder)) as tmp:
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        (tmp / CARD_FILE).write_text(card or default_model_card(config))
    return Path(folder)


def default_model_card(config: dict[str, Any]) -> str:
    lines = [
        f"# {config.get('name', config['architecture'])}",
        "",
        f"- Architecture: {_library(config['architecture'])} `{config['architecture']}` with {config['model_kwargs']}",
        f"- Input: {config['in_chans']} channel(s), {_input_size(config)}, "
        f"normalised with mean {config['normalization']['mean']} and std {config['normalization']['std']}",
        f"- Feature: {config['pool']} pooling, {config['embed_dim']} dimensions",
        f"- Training: {config.get('ssl_method', 'none (random initialisation)')}",
        f"- Data seen: {config.get('data', 'none')}",
        "- Intended use: research on representation learning for medical images; not for clinical use.",
        "- Licence: Apache-2.0 for the weights produced by medfoundry; the training data keeps its own licence.",
        "",
    ]
    return "\n".join(lines)


def _library(architecture: str) -> str:
    return "medfoundry (MONAI blocks)" if architecture in NON_TIMM_ARCHITECTURES else "timm"


def _input_size(config: dict[str, Any]) -> str:
    size = config.get("img_size")
    return f"{size}^3 voxels" if config["architecture"] == VIT3D_ARCHITECTURE else f"{size} px"


def load_encoder(folder: Path | str, pool: str | None = None) -> Encoder:
    """Load a checkpoint folder (never pickle: safetensors only)."""
    folder = Path(folder)
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not folder.is_dir():
        raise ModelError("checkpoint folder does not exist", folder)
    for needed in (config_path, weights_path):
        if not needed.is_file():
            raise ModelError(f"checkpoint folder lacks {needed.name}", folder)
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise ModelError(f"config.json is not valid JSON ({error.msg}, line {error.lineno})", config_path) from None
    kwargs = {k: v for k, v in config["model_kwargs"].items() if k != "num_classes"}
    backbone = create_timm_backbone(config["architecture"], kwargs)
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError) as error:
        raise ModelError(f"cannot read weights ({error})", weights_path) from None
    try:
        result = backbone.load_state_dict(state, strict=False)
    except RuntimeError as error:  # same names, different shapes (strict=False still raises on those)
        first = " ".join(str(error).split())[:300]
        raise ModelError(f"weights do not match {config['architecture']} ({first})", weights_path) from None
    if result.missing_keys or result.unexpected_keys:
        raise ModelError(
            f"weights do not match {config['architecture']}: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}",
            weights_path,
        )
    norm = config["normalization"]
    return Encoder(
        backbone,
        config["architecture"],
        kwargs,
        tuple(norm["mean"]),
        tuple(norm["std"]),
        pool or config["pool"],
    )


def load_encoder_or_build(spec: str, in_chans: int, img_size: int | None, seed: int = 0) -> Encoder:
    """A checkpoint folder path, a public model from local weights (``public:NAME:PATH``, see
    medfoundry.models.loading), or a preset / timm name built with random weights."""
    if spec.startswith("public:"):
        from medfoundry.models.loading import load_public_spec  # lazy: the registry imports MONAI and timm builders

        return load_public_spec(spec)
    prefix, _, inner = spec.partition(":")
    if prefix in SLICES_PREFIXES and (inner.startswith("public:") or Path(inner).is_dir()):
        # "2.5d:FOLDER" / "2.5d:public:NAME:PATH": a loaded 2D encoder over a volume's slices.
        return slice_encoder_from(load_encoder_or_build(inner, 3, None), SLICES_PREFIXES[prefix])
    path = Path(spec)
    if path.is_dir():
        return load_encoder(path)
    return create_encoder(spec, in_chans=in_chans, img_size=img_size, seed=seed)
