"""Load a public foundation model from local files only: a Hugging Face snapshot folder, a ``.safetensors``
file, or a ``.pth`` / ``.bin`` / ``.pt`` file read with ``torch.load(weights_only=True)`` (never plain pickle).

The registry entry gives the architecture and the key layout; the file's keys are mapped to timm's, checked
against the network (every missing, unexpected or wrongly shaped tensor is an error naming the file) and the
result is a medfoundry :class:`~medfoundry.models.backbones.Encoder` with the model's own normalisation and
token, usable wherever encoders are (embed, adapt, suites, WSI, LoRA).

Named as ``public:NAME:PATH`` (``public:NAME@test:PATH`` for the small test variant; models/names.py), which
``load_encoder_or_build`` and so ``medfoundry embed -m``, suites and ``medfoundry wsi embed`` accept.
"""

from __future__ import annotations

import json
import logging
import math
import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from medfoundry.errors import ModelError, one_line
from medfoundry.models.backbones import Encoder, create_timm_backbone, is_vit
from medfoundry.models.public import KEY_MAPPERS, PublicModel, get_public_model
from medfoundry.models.public.keymaps import StateDict

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
# Weight files a snapshot folder may hold, in the order they are preferred (safetensors first).
SNAPSHOT_WEIGHTS = (
    "model.safetensors",
    "pytorch_model.bin",
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.bin",
)
# Sub-dicts training scripts wrap weights in; the first one present wins (an entry may prefer another).
SUBDICT_KEYS = ("teacher", "model", "state_dict", "model_state_dict", "module")


def load_public_encoder(name: str, path: str | Path, variant: str = "full", pool: str | None = None) -> Encoder:
    """Build public model ``name`` and load its weights from ``path`` (folder or file), mapped to timm's names."""
    entry = get_public_model(name)
    kwargs = entry.build_kwargs(variant)
    path = Path(path).expanduser()
    with one_line(path, f"public model {name}", ModelError):
        return _load_public(entry, kwargs, path, variant, pool)


def _load_public(entry: PublicModel, kwargs: dict[str, Any], path: Path, variant: str, pool: str | None) -> Encoder:
    state, source, hf_config = read_state_dict(path, prefer=_preferred_subdicts(entry))
    state = KEY_MAPPERS[entry.key_format](state)
    backbone = create_timm_backbone(entry.timm_name, kwargs)
    if hf_config is not None:
        _check_hf_config(entry, backbone, hf_config, path / "config.json")
    state = _fit_pos_embed(state, backbone, source)
    _load_exactly(backbone, state, entry, variant, source)
    return Encoder(backbone, entry.timm_name, kwargs, entry.mean, entry.std, pool or entry.pool)


def _preferred_subdicts(entry: PublicModel) -> tuple[str, ...]:
    # MAE files keep the encoder under 'model'; DINOv2 training files' 'teacher' already comes first.
    return ("model",) if entry.key_format == "mae" else ()


def read_state_dict(path: Path, prefer: tuple[str, ...] = ()) -> tuple[StateDict, Path, dict[str, Any] | None]:
    """Tensors from a snapshot folder or weights file, the file they came from, and the folder's config.json."""
    if path.is_dir():
        files = _snapshot_files(path)
        state: StateDict = {}
        for file in files:
            state.update(_read_file(file, prefer))
        return state, files[0], _read_hf_config(path / "config.json")
    if not path.exists():
        raise ModelError("weights file or folder does not exist", path)
    return _read_file(path, prefer), path, None


def _snapshot_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as error:
            raise ModelError(f"cannot read the shard index ({error})", index) from None
        return [folder / shard for shard in shards]
    for name in SNAPSHOT_WEIGHTS:
        if (folder / name).is_file():
            return [folder / name]
    candidates = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", *PICKLE_SUFFIXES))
    if len(candidates) == 1:
        return candidates
    found = ", ".join(p.name for p in candidates) or "none"
    raise ModelError(
        f"no weights file to load in this folder (looked for {', '.join(SNAPSHOT_WEIGHTS)}; weight files "
        f"found: {found}); pass the file itself",
        folder,
    )


def _read_file(file: Path, prefer: tuple[str, ...]) -> StateDict:
    if file.suffix == ".safetensors":
        try:
            return load_file(str(file))
        except (SafetensorError, OSError) as error:
            raise ModelError(f"cannot read safetensors weights ({error})", file) from None
    if file.suffix not in PICKLE_SUFFIXES:
        raise ModelError(f"unknown weights format '{file.suffix}': use .safetensors, .pth, .pt, .bin or .ckpt", file)
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError) as error:
        first = " ".join(str(error).split())[:200]
        raise ModelError(
            "refused: torch.load(weights_only=True) cannot read this file, which pickles Python objects besides "
            f"tensors ({first}). medfoundry never unpickles arbitrary code; re-save only the tensors, or use the "
            "safetensors file (docs/models.md)",
            file,
        ) from None
    return _tensors(obj, file, prefer)


def _tensors(obj: Any, file: Path, prefer: tuple[str, ...]) -> StateDict:
    if not isinstance(obj, dict):
        raise ModelError(f"expected a dict of tensors, found {type(obj).__name__}", file)
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj)
    for key in (*prefer, *SUBDICT_KEYS):
        if isinstance(obj.get(key), dict):
            return _tensors(obj[key], file, prefer)
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ModelError(f"no tensors found (top-level keys: {sorted(map(str, obj))[:10]})", file)
    return tensors


def _read_hf_config(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ModelError(f"config.json is not valid JSON ({error.msg}, line {error.lineno})", path) from None
    # Only transformers configs describe the network; timm / open_clip / lighter configs are not checked here.
    return config if isinstance(config, dict) and "hidden_size" in config else None


def _check_hf_config(entry: PublicModel, backbone: torch.nn.Module, config: dict[str, Any], path: Path) -> None:
    """A snapshot's config.json must describe the network the registry builds (catches a wrong folder early)."""
    if not is_vit(backbone):
        return
    built = {
        "hidden_size": int(backbone.embed_dim),
        "num_hidden_layers": len(backbone.blocks),
        "num_attention_heads": int(backbone.blocks[0].attn.num_heads),
        "patch_size": int(backbone.patch_embed.patch_size[0]),
    }
    wrong = [f"{k} {config[k]} (registry builds {v})" for k, v in built.items() if k in config and config[k] != v]
    if wrong:
        raise ModelError(f"this snapshot is not {entry.title} as registered: {'; '.join(wrong)}", path)


def _fit_pos_embed(state: StateDict, backbone: torch.nn.Module, source: Path) -> StateDict:
    """Resample position embeddings trained on another patch grid (DINOv2's 518 px to 224 px, as timm does)."""
    from timm.layers import resample_abs_pos_embed

    weights, target = state.get("pos_embed"), getattr(backbone, "pos_embed", None)
    if weights is None or target is None or weights.shape == target.shape or weights.ndim != 3:
        return state
    prefix = 0 if getattr(backbone, "no_embed_class", False) else int(backbone.num_prefix_tokens)
    side = math.isqrt(weights.shape[1] - prefix)
    if side * side != weights.shape[1] - prefix or weights.shape[2] != target.shape[2]:
        return state  # not a square grid of the same width: the shape check reports it
    grid = tuple(backbone.patch_embed.grid_size)
    log.info("%s: resampling position embeddings from a %dx%d to a %dx%d patch grid", source, side, side, *grid)
    resampled = resample_abs_pos_embed(weights, new_size=list(grid), old_size=[side, side], num_prefix_tokens=prefix)
    return {**state, "pos_embed": resampled}


def _load_exactly(backbone: torch.nn.Module, state: StateDict, entry: PublicModel, variant: str, source: Path) -> None:
    expected = backbone.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    what = f"public model '{entry.name}' ({entry.title}{', test variant' if variant == 'test' else ''})"
    if missing or unexpected:
        raise ModelError(
            f"weights do not match {what} after mapping '{entry.key_format}' keys: {len(missing)} missing "
            f"{missing[:5]}, {len(unexpected)} unexpected {unexpected[:5]}",
            source,
        )
    wrong = [
        f"{k} is {tuple(v.shape)}, expected {tuple(expected[k].shape)}"
        for k, v in state.items()
        if v.shape != expected[k].shape
    ]
    if wrong:
        raise ModelError(f"weights do not match {what}: {len(wrong)} wrong shape(s): {'; '.join(wrong[:3])}", source)
    backbone.load_state_dict(state, strict=True)
