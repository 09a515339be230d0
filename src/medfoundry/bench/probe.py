"""``medfoundry probe``: adapters and metrics on the data a user already has, with no pre-training.

Train, optional val and test cases come as separate datasets (folders, CSVs, npz files, or feature files written
by ``medfoundry embed``); nothing given is carved, a missing val split is carved from train by patient. The probe
is a one-task suite, so its cells, results.json and report are the engine's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medfoundry.config import AdaptConfig, DatasetSpec, EncoderConfig, SuiteConfig, TaskConfig
from medfoundry.models.names import parse_model_name


def encoder_from_text(text: str, in_chans: int = 3, img_size: int | None = None) -> EncoderConfig:
    """An encoder named on the command line (the one model-name grammar, ``models/names.py``): a checkpoint folder,
    ``public:NAME:PATH``, ``2.5d:...``, or a backbone name (random weights, the baseline to beat)."""
    parsed = parse_model_name(text)
    safe = "".join(c if c.isalnum() or c in "_.+-" else "-" for c in parsed.name).lstrip("-_.+") or "encoder"
    if parsed.kind == "backbone":
        return EncoderConfig(name=safe, backbone=text, in_chans=in_chans, img_size=img_size, finetune=False)
    return EncoderConfig(name=safe, checkpoint=Path(text), in_chans=in_chans, img_size=img_size)


def probe_config(
    train: DatasetSpec,
    test: DatasetSpec,
    val: DatasetSpec | None = None,
    encoders: list[EncoderConfig] | None = None,
    output_dir: Path = Path("runs/probe"),
    name: str = "probe",
    adapt: dict[str, Any] | None = None,
    kind: str | None = None,
) -> SuiteConfig:
    """The one-task suite that probes ``encoders`` (none for feature files) on the given train / val / test data."""
    task = TaskConfig(name=name, train=train, val=val, test=test, kind=kind)
    return SuiteConfig(
        name=name,
        output_dir=output_dir,
        tasks=[task],
        encoders=encoders or [],
        adapt=AdaptConfig.model_validate(adapt or {}),
        comparisons={"reference_adapter": "linear"},
    )
