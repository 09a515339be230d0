"""The results.json schema: one record per (task, model, adapter, label fraction, seed, metric).

The file is the single hand-off between benchmarking and reporting, so it is validated strictly on read
and always written atomically (a crash never leaves a half-written file behind). See
``docs/results-schema.md`` for the field-by-field description.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import platform
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from medfoundry import __version__
from medfoundry.errors import DataError, OutputError
from medfoundry.io_utils import write_text_atomic

SCHEMA_VERSION = 1


@dataclass
class ResultRecord:
    """One metric value for one trained (model, adapter) on one label fraction and seed."""

    task: str
    model: str
    adapter: str
    label_fraction: float
    seed: int
    metric: str
    value: float
    ci_low: float
    ci_high: float
    n_train: int
    n_test: int
    # The cost rung of the adaptation ladder: parameters the adapter fitted (0 for kNN and prototypes, which
    # store or average features) and seconds spent fitting it. Optional: older files and hand-made records lack them.
    trainable_params: int | None = None
    fit_seconds: float | None = None


@dataclass
class ResultsFile:
    """All records of a benchmark run plus free-form run metadata (never patient-level data)."""

    records: list[ResultRecord] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION


def run_metadata(
    config: Mapping[str, Any] | None = None,
    durations: Mapping[str, float] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Metadata for a new run: UTC creation time, library versions, plus ``config``/``durations``/extras."""
    versions: dict[str, str] = {"medfoundry": __version__, "python": platform.python_version()}
    # Distribution metadata, not imports: importing torch just to read its version costs seconds.
    for label, dist in (("numpy", "numpy"), ("sklearn", "scikit-learn"), ("torch", "torch")):
        try:
            versions[label] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    meta: dict[str, Any] = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": versions,
    }
    if config is not None:
        meta["config"] = dict(config)
    if durations is not None:
        meta["durations"] = {k: float(v) for k, v in durations.items()}
    meta.update(extra)
    return meta


def _nan_to_none(obj: Any) -> Any:
    # JSON has no NaN; strict parsers (browsers, jq) reject the non-standard token Python would write.
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Mapping):
        return {str(k): _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_nan_to_none(v) for v in obj]
    return obj


def results_to_dict(results: ResultsFile) -> dict[str, Any]:
    """The JSON-ready form of ``results`` (NaN and infinities become ``None``)."""
    return _nan_to_none(
        {
            "schema_version": results.schema_version,
            "metadata": results.metadata,
            "records": [asdict(r) for r in results.records],
        }
    )


def write_results(path: str | Path, results: ResultsFile) -> Path:
    """Atomically write ``results`` as JSON; raises ``OutputError`` naming ``path`` if it cannot."""
    try:
        text = json.dumps(results_to_dict(results), indent=2, allow_nan=False, default=str) + "\n"
    except (TypeError, ValueError) as exc:
        raise OutputError(f"results cannot be serialised to JSON: {exc}", path) from exc
    return write_text_atomic(Path(path), text)


_STR_FIELDS = ("task", "model", "adapter", "metric")
_INT_FIELDS = ("seed", "n_train", "n_test")
_NULLABLE_FLOAT_FIELDS = ("value", "ci_low", "ci_high")
_OPTIONAL_FIELDS = ("trainable_params", "fit_seconds")
_RECORD_FIELDS = tuple(f.name for f in fields(ResultRecord))
_REQUIRED_FIELDS = tuple(name for name in _RECORD_FIELDS if name not in _OPTIONAL_FIELDS)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _parse_record(raw: Any, index: int, path: Path) -> ResultRecord:
    where = f"records[{index}]"
    if not isinstance(raw, dict):
        raise DataError(f"{where} must be an object, got {type(raw).__name__}", path)
    missing = [name for name in _REQUIRED_FIELDS if name not in raw]
    if missing:
        raise DataError(f"{where} is missing field(s) {', '.join(missing)}", path)
    unknown = sorted(set(raw) - set(_RECORD_FIELDS))
    if unknown:
        raise DataError(f"{where} has unknown field(s) {', '.join(unknown)}", path)
    for name in _STR_FIELDS:
        if not isinstance(raw[name], str) or not raw[name]:
            raise DataError(f"{where}.{name} must be a non-empty string, got {raw[name]!r}", path)
    for name in _INT_FIELDS:
        value = raw[name]
        if not _is_number(value) or value != int(value):
            raise DataError(f"{where}.{name} must be an integer, got {value!r}", path)
    for name in ("n_train", "n_test"):
        if raw[name] < 0:
            raise DataError(f"{where}.{name} must be >= 0, got {raw[name]!r}", path)
    fraction = raw["label_fraction"]
    if not _is_number(fraction) or not 0.0 < fraction <= 1.0:
        raise DataError(f"{where}.label_fraction must be a number in (0, 1], got {fraction!r}", path)
    floats: dict[str, float] = {}
    for name in _NULLABLE_FLOAT_FIELDS:
        value = raw[name]
        if value is None:
            floats[name] = float("nan")
        elif _is_number(value):
            floats[name] = float(value)
        else:
            raise DataError(f"{where}.{name} must be a number or null, got {value!r}", path)
    params = raw.get("trainable_params")
    if params is not None and (not _is_number(params) or params != int(params) or params < 0):
        raise DataError(f"{where}.trainable_params must be an integer >= 0 or null, got {params!r}", path)
    seconds = raw.get("fit_seconds")
    if seconds is not None and (not _is_number(seconds) or seconds < 0):
        raise DataError(f"{where}.fit_seconds must be a number >= 0 or null, got {seconds!r}", path)
    return ResultRecord(
        task=raw["task"],
        model=raw["model"],
        adapter=raw["adapter"],
        label_fraction=float(fraction),
        seed=int(raw["seed"]),
        metric=raw["metric"],
        value=floats["value"],
        ci_low=floats["ci_low"],
        ci_high=floats["ci_high"],
        n_train=int(raw["n_train"]),
        n_test=int(raw["n_test"]),
        trainable_params=None if params is None else int(params),
        fit_seconds=None if seconds is None else float(seconds),
    )


def read_results(path: str | Path) -> ResultsFile:
    """Read and validate a results.json; raises ``DataError`` naming the file and the problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise DataError("results file not found", path) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read results file: {exc}", path) from exc
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})", path) from exc
    if not isinstance(raw, dict):
        raise DataError(f"top level must be a JSON object, got {type(raw).__name__}", path)
    version = raw.get("schema_version")
    if version is None:
        raise DataError("missing schema_version", path)
    if not isinstance(version, int) or isinstance(version, bool):
        raise DataError(f"schema_version must be an integer, got {version!r}", path)
    if version != SCHEMA_VERSION:
        hint = " (written by a newer medfoundry; upgrade to read it)" if version > SCHEMA_VERSION else ""
        raise DataError(f"unsupported schema_version {version}, expected {SCHEMA_VERSION}{hint}", path)
    metadata = raw.get("metadata", {})
    if not isinstance(metadata, dict):
        raise DataError(f"metadata must be an object, got {type(metadata).__name__}", path)
    records_raw = raw.get("records")
    if not isinstance(records_raw, list):
        raise DataError("records must be a list" if "records" in raw else "missing records", path)
    records = [_parse_record(item, i, path) for i, item in enumerate(records_raw)]
    return ResultsFile(records=records, metadata=metadata, schema_version=version)


def records_from_metrics(
    metrics: Mapping[str, Any],
    *,
    task: str,
    model: str,
    adapter: str,
    label_fraction: float,
    seed: int,
    n_train: int,
    n_test: int,
    trainable_params: int | None = None,
    fit_seconds: float | None = None,
) -> list[ResultRecord]:
    """One record per entry of ``compute_metrics``' output (anything with value/ci_low/ci_high)."""
    return [
        ResultRecord(
            task=task,
            model=model,
            adapter=adapter,
            label_fraction=float(label_fraction),
            seed=int(seed),
            metric=name,
            value=float(mv.value),
            ci_low=float(mv.ci_low),
            ci_high=float(mv.ci_high),
            n_train=int(n_train),
            n_test=int(n_test),
            trainable_params=trainable_params,
            fit_seconds=fit_seconds,
        )
        for name, mv in metrics.items()
    ]
