"""The checkpoint folder: ``model.safetensors`` + ``config.json`` + ``model_card.md``.

``config.json`` holds the timm architecture name and keyword arguments, so
``timm.create_model(cfg["architecture"], **cfg["model_kwargs"])`` rebuilds the network without
medfoundry, and the safetensors keys are timm's own names. The one non-timm architecture, ``medfoundry.vit3d``
(3D ViT from MONAI blocks), is rebuilt by medfoundry from the same two fields, with MONAI's parameter names.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from medfoundry import __version__
from medfoundry.errors import ModelError, one_line
from medfoundry.io_utils import atomic_dir
from medfoundry.models.backbones import ARCHITECTURES, Encoder, create_encoder, create_timm_backbone
from medfoundry.models.names import parse_model_name
from medfoundry.models.vit3d import VIT3D_ARCHITECTURE

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CARD_FILE = "model_card.md"


# module -> (version key, hash). Weak keys: a cached entry goes with its module, and a new module that reuses a
# freed module's id() can never hit the old entry.
_HASH_CACHE: weakref.WeakKeyDictionary[torch.nn.Module, tuple[tuple[Any, ...], str]] = weakref.WeakKeyDictionary()


def _version_key(module: torch.nn.Module) -> tuple[Any, ...] | None:
    """What changes whenever a tensor of ``module`` changes, without reading it all.

    Every in-place write through autograd's view (optimiser steps, ``load_state_dict``'s copies, EMA updates under
    ``no_grad``) bumps a tensor's ``_version``; a replaced tensor has another storage address. Writes through
    ``.data`` bump nothing, so a strided sample of every tensor's values (16 each, one device-to-host copy) is part
    of the key too. None when a tensor has no version counter (inference tensors): the hash is then recomputed.
    """
    state = module.state_dict(keep_vars=True)
    try:
        versions = tuple(
            (name, tensor.data_ptr(), tensor._version, tuple(tensor.shape), tensor.dtype)
            for name, tensor in state.items()
        )
    except RuntimeError:
        return None
    with torch.no_grad():
        samples = [
            flat[:: max(1, flat.numel() // 16)][:16].to(torch.float64)
            for flat in (tensor.detach().reshape(-1) for tensor in state.values())
            if flat.numel()
        ]
    probe = torch.cat(samples).cpu().numpy().tobytes() if samples else b""
    return (*versions, probe)


def _content_hash(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        # reshape(-1): 0-dim tensors (BatchNorm's num_batches_tracked) cannot be viewed as bytes directly.
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def weights_hash(module: torch.nn.Module) -> str:
    """A content hash of the parameters and buffers, used as an embedding-cache key.

    Hashing copies every tensor (seconds to minutes for a billion parameters), and embed, suites and slides ask for
    it once per call: it is computed once per module and recomputed only after a tensor was written or replaced.
    """
    key = _version_key(module)
    cached = _HASH_CACHE.get(module)
    if key is not None and cached is not None and cached[0] == key:
        return cached[1]
    value = _content_hash(module)
    if key is not None:
        _HASH_CACHE[module] = (key, value)
    return value


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
        # The data description and the recipe (its data source, output folders) travel with the weights.
        **{key: public_description(value) for key, value in (extra or {}).items()},
    }


def public_description(value: Any) -> Any:
    """``value`` with every file or folder path reduced to its name (``/home/ana/cohort/train.npz`` ->
    ``train.npz``, ``dicom:/srv/pacs/export`` -> ``dicom:export``), for configs and cards that travel with weights:
    the name still says which data it was, the path says who has it where."""
    if isinstance(value, dict):
        return {key: public_description(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [public_description(item) for item in value]
    if not isinstance(value, str):
        return value
    return " ".join(_public_token(token) for token in value.split(" "))


def _public_token(token: str) -> str:
    kind, sep, rest = token.partition(":")
    # A reader prefix (``dicom:``, ``folder:``) stays; a Windows drive letter ("C:") is part of the path.
    if sep and rest.startswith("//"):
        return token  # a URL is public by nature
    if sep and kind.isidentifier() and len(kind) > 1:
        return f"{kind}:{_path_name(rest)}"
    return _path_name(token)


def _path_name(text: str) -> str:
    # Absolute and home paths only: "80/20" or a relative "data/train.npz" say nothing about where anyone keeps data.
    if not text.startswith(("/", "~", "\\")) and not (len(text) > 2 and text[1] == ":" and text[2] in "/\\"):
        return text
    return PureWindowsPath(text).name if "\\" in text else (PurePosixPath(text).name or text)


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
        f"- Data seen: {public_description(config.get('data', 'none'))}",
        "- Intended use: research on representation learning for medical images; not for clinical use.",
        "- Licence: Apache-2.0 for the weights produced by medfoundry; the training data keeps its own licence.",
        "",
    ]
    return "\n".join(lines)


def _library(architecture: str) -> str:
    return "medfoundry (MONAI blocks)" if architecture in ARCHITECTURES else "timm"


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
    # Whatever a library raises on a damaged folder (an encoding, a malformed field) is one line naming it.
    with one_line(folder, "checkpoint", ModelError):
        return _load_checkpoint_files(config_path, weights_path, pool)


def _load_checkpoint_files(config_path: Path, weights_path: Path, pool: str | None) -> Encoder:
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise ModelError(f"config.json is not valid JSON ({error.msg}, line {error.lineno})", config_path) from None
    needed = ("architecture", "model_kwargs", "normalization", "pool")
    missing = [key for key in needed if key not in config] if isinstance(config, dict) else list(needed)
    if missing or not isinstance(config["model_kwargs"], dict):
        raise ModelError(f"config.json is not a medfoundry encoder config (missing {missing or 'a dict'})", config_path)
    kwargs = {k: v for k, v in config["model_kwargs"].items() if k != "num_classes"}
    try:
        backbone = create_timm_backbone(config["architecture"], kwargs, source=config_path)
    except ModelError as error:
        # Nested builders (the 2.5D encoder's 2D model) do not know the file; the user needs it.
        if error.path is None:
            raise ModelError(str(error), config_path) from None
        raise
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
    """The encoder any model name gives (models/names.py): a checkpoint folder, a public model from local weights
    (``public:NAME:PATH``), a 2D one of those over a volume's slices (``2.5d:...``), or a preset / timm name built
    with random weights."""
    parsed = parse_model_name(spec)
    if parsed.kind == "folder":
        assert parsed.path is not None
        return load_encoder(parsed.path)
    if parsed.kind == "public":
        # Here: the public registry and key maps are only needed when a public model is named.
        from medfoundry.models.loading import load_public_encoder

        assert parsed.path is not None
        return load_public_encoder(parsed.name, parsed.path, variant=parsed.variant)
    if parsed.kind == "slices" and parsed.inner is not None and parsed.inner.loads_weights:
        from medfoundry.models.slices import slice_encoder_from

        return slice_encoder_from(load_encoder_or_build(parsed.inner.spec, 3, None), parsed.aggregate)
    return create_encoder(spec, in_chans=in_chans, img_size=img_size, seed=seed)
