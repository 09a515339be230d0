"""Export a medfoundry checkpoint folder as a timm-loadable, Hugging Face-style model folder.

The output holds ``model.safetensors`` (timm's parameter names, unchanged), a timm ``config.json``
(``architecture``, ``num_features``, ``model_args`` and a ``pretrained_cfg`` with input size, mean and std) and
a ``README.md`` model card with the data, method, intended use and licence. timm >= 1.0 builds it offline::

    timm.create_model("local-dir:/path/to/export", pretrained=True)

and, once uploaded to the Hub, as ``hf-hub:ORG/NAME``. The medfoundry config is kept beside it as
``medfoundry_config.json`` so nothing about provenance is lost.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import timm

from medfoundry.errors import ModelError, OutputError
from medfoundry.io_utils import atomic_dir
from medfoundry.models.checkpoint import CONFIG_FILE, WEIGHTS_FILE, weights_hash

CARD_FILE = "README.md"
SOURCE_CONFIG_FILE = "medfoundry_config.json"


def export_checkpoint(
    checkpoint_dir: Path | str,
    out_dir: Path | str,
    licence: str = "apache-2.0",
    overwrite: bool = False,
    check: bool = True,
) -> Path:
    """Write ``out_dir`` from ``checkpoint_dir``; with ``check``, rebuild it through timm and compare the weights."""
    source, out = Path(checkpoint_dir), Path(out_dir)
    config = _read_checkpoint_config(source)
    architecture = config["architecture"]
    if not timm.is_model(architecture):
        raise ModelError(
            f"architecture '{architecture}' is medfoundry's own (timm has no such model), so it cannot be exported "
            "as a timm folder; the checkpoint folder itself stays loadable with medfoundry",
            source,
        )
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise OutputError("output folder exists and is not empty (pass overwrite to replace it)", out)
    timm_config = timm_config_from(config, licence)
    with atomic_dir(out) as tmp:
        shutil.copyfile(source / WEIGHTS_FILE, tmp / WEIGHTS_FILE)
        (tmp / CONFIG_FILE).write_text(json.dumps(timm_config, indent=2) + "\n")
        (tmp / SOURCE_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        (tmp / CARD_FILE).write_text(model_card(config, timm_config, licence))
    if check:
        _check_with_timm(out, config)
    return out


def _read_checkpoint_config(folder: Path) -> dict[str, Any]:
    if not folder.is_dir():
        raise ModelError("checkpoint folder does not exist", folder)
    for needed in (CONFIG_FILE, WEIGHTS_FILE):
        if not (folder / needed).is_file():
            raise ModelError(f"checkpoint folder lacks {needed}", folder)
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except json.JSONDecodeError as error:
        raise ModelError(
            f"config.json is not valid JSON ({error.msg}, line {error.lineno})", folder / CONFIG_FILE
        ) from None
    if not isinstance(config, dict) or "architecture" not in config or "model_kwargs" not in config:
        raise ModelError("config.json is not a medfoundry encoder config (no architecture/model_kwargs)", folder)
    return config


def timm_config_from(config: dict[str, Any], licence: str) -> dict[str, Any]:
    """timm's hub config layout (as written by ``timm.models.push_to_hf_hub``) for a medfoundry config."""
    architecture = config["architecture"]
    model_args = {**config["model_kwargs"], "num_classes": 0}
    width = int(config["embed_dim"]) // (2 if config.get("pool") == "token+avg" else 1)
    size = config.get("img_size") or 224
    norm = config["normalization"]
    defaults = timm.models.get_pretrained_cfg(architecture)
    pretrained_cfg = {
        "tag": "medfoundry",
        "custom_load": False,
        "input_size": [int(config["in_chans"]), int(size), int(size)],
        "fixed_input_size": not model_args.get("dynamic_img_size", False),
        "interpolation": "bicubic",
        "crop_pct": 1.0,
        "crop_mode": "center",
        "mean": list(norm["mean"]),
        "std": list(norm["std"]),
        "num_classes": 0,
        "pool_size": None,
        "first_conv": getattr(defaults, "first_conv", None),
        "classifier": getattr(defaults, "classifier", None),
        "license": licence,
    }
    return {
        "architecture": architecture,
        "num_classes": 0,
        "num_features": width,
        "model_args": model_args,
        "pretrained_cfg": pretrained_cfg,
        # Not read by timm; tells a reader which feature medfoundry's encoder exposes.
        "medfoundry": {"pool": config.get("pool", "default"), "embed_dim": config.get("embed_dim")},
    }


def model_card(config: dict[str, Any], timm_config: dict[str, Any], licence: str) -> str:
    name = config.get("name") or f"{config.get('ssl_method', 'random-init')}-{config['architecture']}"
    method = config.get("ssl_method")
    steps = config.get("pretrain_steps")
    method_line = (
        f"self-supervised pre-training with **{method}** in medfoundry"
        + (f", {steps} steps" if steps else "")
        + " (recipe in `medfoundry_config.json`, key `pretrain_config`)"
        if method
        else "none: random initialisation (a baseline, not a trained model)"
    )
    cfg = timm_config["pretrained_cfg"]
    lines = [
        "---",
        "library_name: timm",
        f"license: {licence}",
        "tags: [image-feature-extraction, timm, medfoundry, medical-imaging]",
        "---",
        f"# {name}",
        "",
        "## Model",
        f"- Architecture: timm `{config['architecture']}` with `{json.dumps(timm_config['model_args'])}`",
        f"- Input: {cfg['input_size'][0]} channel(s) at {cfg['input_size'][1]} px, values in 0..1 then "
        f"normalised with mean {cfg['mean']} and std {cfg['std']}",
        f"- Feature: medfoundry pool `{config.get('pool', 'default')}`, {config.get('embed_dim')} dimensions",
        f"- Weights: `model.safetensors`, content hash {config.get('weights_sha256_16', 'n/a')}",
        "",
        "## Data",
        f"{config.get('data') or 'none (not trained on data)'}. The data keep their own licences and terms.",
        "",
        "## Method",
        method_line + ".",
        "",
        "## Intended use",
        "Research on representation learning for medical images: feature extraction, linear probing, "
        "fine-tuning. Not a medical device and not for clinical decisions.",
        "",
        "## Licence",
        f"Weights: {licence}. Produced with medfoundry {config.get('medfoundry_version', '')} (Apache-2.0).",
        "",
        "## Load",
        "```python",
        "import timm",
        'model = timm.create_model("local-dir:/path/to/this/folder", pretrained=True)  # offline',
        "features = model(images)  # (B, num_features); images normalised as above",
        "```",
        "",
    ]
    return "\n".join(lines)


def _check_with_timm(out: Path, config: dict[str, Any]) -> None:
    """timm itself must rebuild the exported folder with the same weights (what a user will do next)."""
    try:
        model = timm.create_model(f"local-dir:{out.resolve()}", pretrained=True)
    except Exception as error:  # timm raises many types here; any failure means the export is unusable
        raise ModelError(f"timm cannot load the exported folder ({type(error).__name__}: {error})", out) from None
    expected = config.get("weights_sha256_16")
    if expected is not None and weights_hash(model) != expected:
        raise ModelError("timm loaded the exported folder but its weights differ from the checkpoint's", out)
