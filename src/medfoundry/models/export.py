"""Export a medfoundry checkpoint folder as a timm-loadable, Hugging Face-style model folder.

The output holds ``model.safetensors`` (timm's parameter names, unchanged), a timm ``config.json``
(``architecture``, ``num_features``, ``model_args`` and a ``pretrained_cfg`` with input size, mean and std) and
a ``README.md`` model card with the data, method, intended use, licence and the lines that give the feature
medfoundry evaluated. timm >= 1.0 and transformers >= 4.47 (its built-in ``TimmWrapperModel``, no remote code)
build it offline::

    timm.create_model("local-dir:/path/to/export", pretrained=True)
    transformers.AutoModel.from_pretrained("/path/to/export", trust_remote_code=False)

and, once uploaded to the Hub, as ``hf-hub:ORG/NAME``. The medfoundry config is kept beside it as
``medfoundry_config.json`` so nothing about provenance is lost.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any

import timm

from medfoundry.errors import ModelError, OutputError
from medfoundry.io_utils import atomic_dir
from medfoundry.models.backbones import check_model_kwargs
from medfoundry.models.checkpoint import CONFIG_FILE, WEIGHTS_FILE, public_description, weights_hash

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
    # An export is made to be shared: paths in older checkpoints' configs (data, recipe) keep only their names.
    config = public_description(_read_checkpoint_config(source))
    architecture = config["architecture"]
    if not timm.is_model(architecture):
        raise ModelError(
            f"architecture '{architecture}' is medfoundry's own (timm has no such model), so it cannot be exported "
            "as a timm folder; the checkpoint folder itself stays loadable with medfoundry",
            source,
        )
    # The exported model_args reach timm.create_model on every user's machine: same allow-list as loading.
    check_model_kwargs(architecture, config["model_kwargs"], source / CONFIG_FILE)
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
    # num_classes only at the top level: transformers' TimmWrapper passes both to timm ("given twice" otherwise),
    # and timm takes the top-level one through the pretrained config.
    model_args = {k: v for k, v in config["model_kwargs"].items() if k != "num_classes"}
    if config.get("pool") == "avg":
        # medfoundry's "avg" is the mean of the patch tokens after the final norm: timm's avg pool without fc_norm,
        # so the exported model's own forward gives the evaluated feature (same weights: fc_norm stays empty).
        model_args.update(global_pool="avg", fc_norm=False)
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
        *load_snippets(config, timm_config),
    ]
    return "\n".join(lines)


# The folder's path in the card's snippets; the export test runs the snippets with this replaced.
CARD_PATH = "/path/to/this/folder"


def load_snippets(config: dict[str, Any], timm_config: dict[str, Any]) -> list[str]:
    """The card's "Load" section: code that gives exactly the feature medfoundry evaluated, with timm and with
    transformers (the export test executes both and compares them with medfoundry's encoder)."""
    pool, dim, width = config.get("pool", "default"), config.get("embed_dim"), timm_config["num_features"]
    if pool == "token+avg":
        # No timm global_pool concatenates CLS and mean: the model's own forward gives the CLS token alone.
        timm_feature = [
            "tokens = model.forward_features(images)",
            "feature = torch.cat([tokens[:, 0], tokens[:, model.num_prefix_tokens :].mean(dim=1)], dim=1)",
        ]
        hf_feature = [
            "tokens = model(pixel_values=images).last_hidden_state",
            "prefix = model.timm_model.num_prefix_tokens",
            "feature = torch.cat([tokens[:, 0], tokens[:, prefix:].mean(dim=1)], dim=1)",
        ]
        note = (
            f"medfoundry evaluated pool `token+avg`: the CLS token and the mean of the patch tokens, concatenated "
            f"({dim} dimensions). `model(images)` alone gives only the CLS token ({width} dimensions): use the "
            "lines below."
        )
    else:
        timm_feature = ["feature = model(images)"]
        hf_feature = ["feature = model(pixel_values=images).pooler_output"]
        note = f"The model's own forward gives the feature medfoundry evaluated (pool `{pool}`, {dim} dimensions)."
    return [
        "## Load",
        note + " `images`: a float tensor (B, C, H, W), values in 0..1 normalised with the mean and std above.",
        "",
        "With timm (>= 1.0, offline):",
        "",
        "```python",
        "import timm",
        "import torch",
        f'model = timm.create_model("local-dir:{CARD_PATH}", pretrained=True).eval()',
        "with torch.inference_mode():",
        *(f"    {line}" for line in timm_feature),
        "```",
        "",
        "With transformers (>= 4.47, offline, no remote code: its built-in timm wrapper):",
        "",
        "```python",
        "import torch",
        "from transformers import AutoModel",
        f'model = AutoModel.from_pretrained("{CARD_PATH}", local_files_only=True, trust_remote_code=False).eval()',
        "with torch.inference_mode():",
        *(f"    {line}" for line in hf_feature),
        "```",
        "",
    ]


def _check_with_timm(out: Path, config: dict[str, Any]) -> None:
    """timm itself must rebuild the exported folder with the same weights (what a user will do next)."""
    try:
        model = timm.create_model(f"local-dir:{out.resolve()}", pretrained=True)
    except Exception as error:  # timm raises many types here; any failure means the export is unusable
        raise ModelError(f"timm cannot load the exported folder ({type(error).__name__}: {error})", out) from None
    expected = config.get("weights_sha256_16")
    if expected is not None and weights_hash(model) != expected:
        raise ModelError("timm loaded the exported folder but its weights differ from the checkpoint's", out)
    if (
        importlib.util.find_spec("transformers") is None
        or importlib.util.find_spec("transformers.models.timm_wrapper") is None
    ):
        return  # no transformers, or one before 4.47 (no timm wrapper): nothing here could load the folder anyway
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        wrapped = AutoModel.from_pretrained(str(out), local_files_only=True, trust_remote_code=False)
    except Exception as error:  # transformers raises many types here; any failure means the layout is wrong
        first = " ".join(str(error).split())[:300]
        raise ModelError(
            f"transformers cannot load the exported folder ({type(error).__name__}: {first})", out
        ) from None
    if expected is not None and weights_hash(wrapped.timm_model) != expected:
        raise ModelError("transformers loaded the exported folder but its weights differ from the checkpoint's", out)
