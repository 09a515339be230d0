"""``medfoundry robustness``: how far an encoder's features move when the same images are shifted (stain, JPEG,
blur, resolution, window, noise, brightness), and whether a probe's decisions move with them.

PLISM's and THUNDER's invariance question for any encoder a user has. For each encoder, each shift and each
severity (:mod:`medfoundry.transforms.shifts`), the test images are shifted deterministically, embedded through the
one feature extractor (the shifted set has its own cache key) and compared with their own clean embeddings:

* ``cosine``: mean cosine similarity of each image's shifted feature to its clean feature;
* ``top{k}_agreement``: share of an image's k nearest clean neighbours (cosine, itself excluded) that its shifted
  feature still finds among the clean test set;
* ``flip_rate``: share of test images whose linear-probe class (fitted on clean train features, C chosen as the
  engine's linear adapter chooses it) changes under the shift;
* ``delta_<metric>``: the probe's headline metric on shifted minus clean features (paired bootstrap).

Every value has a patient-bootstrap CI (the test set's patients resampled, as everywhere in medfoundry). Each
(encoder, shift, severity) is one cell JSON under ``robustness/cells/``, reused while its fingerprint (weights,
data, shift, settings) holds, so a killed run resumes; ``results.json`` and ``report.html`` are rebuilt from the
cells at the end. ``results.json`` has the schema of every run (docs/results-schema.md): one record per encoder for
the probe's clean headline metric, and the robustness analysis under ``metadata.tasks.<task>.robustness``, which
the report's Robustness section draws. Layout of ``output_dir``::

    embeddings/<encoder>/<task>/{train,val,test}.h5     clean features (the engine's layout, shared with probe)
    embeddings/<encoder>/<task>/shift-<shift>-<severity>.h5
    robustness/cells/<encoder>/<shift>-<severity>.json
    results.json, report.html
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field
from sklearn.neighbors import NearestNeighbors

from medfoundry.adapt.linear import LinearProbe
from medfoundry.adapt.registry import AdaptConfig
from medfoundry.bench.tasks import Task
from medfoundry.config import EmbedConfig, EncoderConfig, SuiteConfig, TaskConfig
from medfoundry.data.sample import ImageSet
from medfoundry.errors import DataError, MedfoundryError
from medfoundry.evaluate.compare import paired_difference
from medfoundry.evaluate.metrics import MetricValue, compute_metrics, percentile_interval, resample_weights
from medfoundry.evaluate.results import ResultRecord, ResultsFile, records_from_metrics, run_metadata, write_results
from medfoundry.io_utils import hash_json, output_folder, write_json_atomic
from medfoundry.models.backbones import Encoder
from medfoundry.models.checkpoint import weights_hash
from medfoundry.models.features import Embeddings, embed
from medfoundry.settings import StrictModel
from medfoundry.transforms.shifts import SHIFTS, apply_shift
from medfoundry.transforms.stain import MacenkoNormalizer

Echo = Callable[[str], None]
# Bumped when a cell's metrics are computed differently, so older cells are recomputed rather than mixed in.
_CELL_VERSION = 1


class RobustnessConfig(StrictModel):
    """One robustness run: a task's splits, encoders, shifts with severities, and how the metrics are computed."""

    name: str = "robustness"
    output_dir: Path = Path("runs/robustness")
    task: TaskConfig
    encoders: list[EncoderConfig] = Field(min_length=1)
    shifts: dict[str, list[float]] = Field(min_length=1, description="shift name -> severities, mildest first")
    stain_reference: Path | None = Field(
        None, description="reference tile (image file) or Macenko JSON for stain_norm; default: a train tile"
    )
    seed: int = Field(0, description="seeds the random shifts (HED jitter, noise) and the bootstrap")
    top_k: list[int] = Field(default_factory=lambda: [1, 5])
    n_bootstrap: int = Field(1000, ge=0)
    confidence: float = Field(0.95, gt=0, lt=1)
    embed: EmbedConfig = EmbedConfig()
    adapt: AdaptConfig = AdaptConfig()


class ShiftedImageSet(ImageSet):
    """``parent`` under one shift and severity: image ``i`` is shifted with a generator seeded by (seed, shift, i),
    so the same image is shifted the same way on every run and in every order."""

    def __init__(
        self,
        parent: ImageSet,
        shift: str,
        severity: float,
        seed: int,
        reference: MacenkoNormalizer | None = None,
        reference_key: str = "",
    ) -> None:
        self.parent, self.shift, self.severity, self.seed = parent, shift, float(severity), seed
        self.reference, self.reference_key = reference, reference_key
        self.name = f"{parent.name}~{shift}@{severity:g}"
        self.source = parent.source
        self.ids, self.patient_ids, self.labels = parent.ids, parent.patient_ids, parent.labels

    def load(self, index: int) -> np.ndarray:
        salt = int.from_bytes(hashlib.sha256(self.shift.encode()).digest()[:4], "little")
        rng = np.random.default_rng([self.seed, salt, index])
        return apply_shift(self.shift, self.severity, self.parent.load(index), rng, self.reference)

    def fingerprint(self) -> str:
        # The shift belongs to the data's identity: shifted embeddings get a cache key of their own.
        return hash_json([self.parent.fingerprint(), self.shift, self.severity, self.seed, self.reference_key])


@dataclass
class RobustnessOutput:
    output_dir: Path
    json_path: Path
    report_path: Path
    data: dict[str, Any]
    cells_computed: int
    cells_reused: int
    seconds: float


def _metric(value: MetricValue) -> dict[str, float]:
    return {"value": value.value, "ci_low": value.ci_low, "ci_high": value.ci_high}


def _bootstrap_mean(values: np.ndarray, patients: list[str], config: RobustnessConfig) -> dict[str, float]:
    """Mean of per-image ``values`` with its patient-bootstrap percentile CI."""
    _, index = np.unique(np.asarray(patients), return_inverse=True)
    n_patients = int(index.max()) + 1
    draws = [w @ values / w.sum(axis=1) for w in resample_weights(index, n_patients, config.n_bootstrap, config.seed)]
    point = float(values.mean())
    if not draws:
        return {"value": point, "ci_low": float("nan"), "ci_high": float("nan")}
    return _metric(percentile_interval(point, np.concatenate(draws), config.n_bootstrap, config.confidence))


def _unit(features: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.maximum(norms, 1e-12)


def neighbours(clean: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Indices of each query's ``k`` nearest clean features (cosine), the query's own clean row excluded."""
    k = min(k, len(clean) - 1)
    index = NearestNeighbors(n_neighbors=k + 1, metric="cosine").fit(clean)
    found = index.kneighbors(queries, return_distance=False)
    # Drop each row's own image wherever it ranks; without it among the k + 1, drop the farthest instead.
    own = np.arange(len(queries))[:, None]
    keep = np.where((found == own).any(axis=1, keepdims=True), found != own, np.arange(k + 1)[None, :] < k)
    return found[keep].reshape(len(queries), k)


def shift_metrics(
    clean: Embeddings,
    shifted: np.ndarray,
    proba_clean: np.ndarray,
    proba_shifted: np.ndarray,
    metric: str,
    config: RobustnessConfig,
) -> dict[str, dict[str, float]]:
    """Every robustness metric of one (encoder, shift, severity), with patient-bootstrap CIs."""
    patients = list(clean.patient_ids)
    cosine = (_unit(clean.features) * _unit(shifted)).sum(axis=1)
    out = {"cosine": _bootstrap_mean(cosine, patients, config)}
    for k in config.top_k:
        if len(clean.features) <= k:
            continue
        before, after = neighbours(clean.features, clean.features, k), neighbours(clean.features, shifted, k)
        agreement = np.array([len(set(b) & set(a)) / k for b, a in zip(before, after, strict=True)])
        out[f"top{k}_agreement"] = _bootstrap_mean(agreement, patients, config)
    flips = (proba_clean.argmax(axis=1) != proba_shifted.argmax(axis=1)).astype(np.float64)
    out["flip_rate"] = _bootstrap_mean(flips, patients, config)
    assert clean.labels is not None
    difference = paired_difference(
        clean.labels,
        proba_shifted,
        proba_clean,
        patients,
        metric,
        max(config.n_bootstrap, 1),
        config.confidence,
        config.seed,
    )
    out[f"delta_{metric}"] = _metric(difference)
    out[f"shifted_{metric}"] = {"value": difference.value_a, "ci_low": float("nan"), "ci_high": float("nan")}
    return out


def stain_reference(config: RobustnessConfig, train: ImageSet) -> tuple[MacenkoNormalizer, str]:
    """The Macenko normaliser ``stain_norm`` maps test tiles onto, and a key of it for fingerprints.

    Default: the first train tile with enough tissue for a stain estimate, so the test patients are re-stained like
    another patient of the same dataset (train and test never share a patient)."""
    if config.stain_reference is not None:
        path = config.stain_reference
        if not path.is_file():
            raise DataError("stain reference not found", path)
        if path.suffix.lower() == ".json":
            normaliser = MacenkoNormalizer.load(path)
        else:
            from PIL import Image

            with Image.open(path) as image:
                normaliser = MacenkoNormalizer().fit(np.asarray(image.convert("RGB")))
        return normaliser, hash_json(normaliser.to_dict())
    from medfoundry.transforms.shifts import as_uint8_hwc

    for index in range(min(len(train), 200)):
        rgb, _ = as_uint8_hwc(np.asarray(train.load(index)))
        if rgb.shape[-1] != 3:
            break
        try:
            normaliser = MacenkoNormalizer().fit(rgb)
        except DataError:
            continue
        return normaliser, hash_json(normaliser.to_dict())
    raise DataError("stain_norm: no train tile has enough RGB tissue for a stain reference; give --stain-reference")


def _encoders(config: RobustnessConfig) -> SuiteConfig:
    # prepare_encoder reads a suite's output folder (recipe encoders pre-train there); this is that suite.
    return SuiteConfig(name=config.name, output_dir=config.output_dir, tasks=[config.task], encoders=config.encoders)


def _cell_path(config: RobustnessConfig, encoder: str, shift: str, severity: float) -> Path:
    return config.output_dir / "robustness" / "cells" / encoder / f"{shift}-{severity:g}.json"


def _read_cell(path: Path, fingerprint: str) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        cell = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return cell if cell.get("fingerprint") == fingerprint else None


def _probe(task: Task, clean: dict[str, Embeddings], config: RobustnessConfig) -> LinearProbe:
    probe = LinearProbe.from_settings(config.adapt, config.seed, task.n_classes)
    probe.fit(
        clean["train"].features, np.asarray(task.train.labels), clean["val"].features, np.asarray(task.val.labels)
    )
    return probe


def _load_task(config: RobustnessConfig) -> Task:
    from medfoundry.bench.engine import load_task

    task = load_task(config.task)
    if not isinstance(task, Task) or task.precomputed:
        raise MedfoundryError(f"task '{config.task.name}': robustness needs a classification task of images")
    if task.kind not in ("binary", "multiclass", "ordinal"):
        raise MedfoundryError(f"task '{config.task.name}': robustness needs one class per image, not {task.kind}")
    return task


def run_robustness(config: RobustnessConfig, echo: Echo = lambda line: None) -> RobustnessOutput:
    """Embed the task's test images under every shift and severity for every encoder; write the metrics
    (``results.json``) and their plots (``report.html``). Reuses finished cells; see the module docstring."""
    from medfoundry.bench.engine import few_test_patients_warnings, prepare_encoder, task_entry
    from medfoundry.report.html import render_report

    unknown = [name for name in config.shifts if name not in SHIFTS]
    if unknown:
        raise MedfoundryError(f"unknown shift(s) {', '.join(unknown)}; shifts: {', '.join(SHIFTS)}")
    started = time.perf_counter()
    computed = reused = 0
    with output_folder(config.output_dir, "robustness"):
        task = _load_task(config)
        echo(task.describe())
        warnings = few_test_patients_warnings(task)
        for warning in warnings:
            echo(f"  ⚠ {warning}")
        metric = task.metrics[0]
        reference, reference_key = stain_reference(config, task.train) if "stain_norm" in config.shifts else (None, "")
        suite = _encoders(config)
        encoders: dict[str, Any] = {}
        cells: list[dict[str, Any]] = []
        records: list[ResultRecord] = []
        for spec in config.encoders:
            encoder: Encoder = prepare_encoder(suite, spec, {task.name: task}, False, echo)
            folder = config.output_dir / "embeddings" / spec.name / task.name
            clean = {
                role: embed(encoder, task.split(role), folder / f"{role}.h5", config.embed.batch_size)
                for role in ("train", "val", "test")
            }
            probe = _probe(task, clean, config)
            proba_clean = probe.predict_proba(clean["test"].features)
            scores = compute_metrics(
                np.asarray(task.test.labels),
                proba_clean,
                clean["test"].patient_ids,
                (metric,),
                config.n_bootstrap,
                config.confidence,
                config.seed,
            )
            encoders[spec.name] = {"clean": {metric: _metric(scores[metric])}, "embed_dim": int(encoder.embed_dim)}
            records += records_from_metrics(
                {metric: scores[metric]}, task=task.name, model=spec.name, adapter="linear", label_fraction=1.0,
                seed=config.seed, n_train=len(task.train), n_test=len(task.test),
            )  # fmt: skip
            base = {
                "version": _CELL_VERSION,
                "weights": weights_hash(encoder.backbone),
                "task": task.fingerprint(),
                "settings": config.model_dump(mode="json", include={"seed", "top_k", "n_bootstrap", "confidence"}),
                "adapt": config.adapt.model_dump(mode="json"),
                "reference": reference_key,
            }
            for shift, severities in config.shifts.items():
                for level, severity in enumerate(severities, start=1):
                    path = _cell_path(config, spec.name, shift, severity)
                    fingerprint = hash_json({**base, "shift": shift, "severity": float(severity)})
                    cell = _read_cell(path, fingerprint)
                    if cell is None:
                        images = ShiftedImageSet(
                            task.test,
                            shift,
                            severity,
                            config.seed,
                            reference if shift == "stain_norm" else None,
                            reference_key if shift == "stain_norm" else "",
                        )
                        cell_start = time.perf_counter()
                        shifted = embed(
                            encoder, images, folder / f"shift-{shift}-{severity:g}.h5", config.embed.batch_size
                        )
                        proba_shifted = probe.predict_proba(shifted.features)
                        values = shift_metrics(
                            clean["test"], shifted.features, proba_clean, proba_shifted, metric, config
                        )
                        cell = {
                            "fingerprint": fingerprint,
                            "encoder": spec.name,
                            "shift": shift,
                            "severity": float(severity),
                            "level": level,
                            "metrics": values,
                            "seconds": time.perf_counter() - cell_start,
                        }
                        write_json_atomic(path, cell)
                        computed += 1
                        echo(
                            f"  {spec.name} {shift}@{severity:g}: cosine {values['cosine']['value']:.3f}, "
                            f"flip rate {values['flip_rate']['value']:.3f}"
                        )
                    else:
                        reused += 1
                    cells.append(cell)
        seconds = time.perf_counter() - started
        data = _results(config, task, metric, encoders, cells, reference is not None, seconds)
        results = ResultsFile(
            records=records,
            metadata=run_metadata(
                config=config.model_dump(mode="json"),
                durations={"robustness": seconds},
                dataset=config.name,
                primary_metric={task.name: metric},
                tasks={task.name: {**task_entry(task, warnings), "robustness": data}},
            ),
        )
        json_path = write_results(config.output_dir / "results.json", results)
        report_path = render_report(results, config.output_dir / "report.html", f"Feature robustness: {task.name}")
    return RobustnessOutput(config.output_dir, json_path, report_path, data, computed, reused, seconds)


def _results(
    config: RobustnessConfig,
    task: Task,
    metric: str,
    encoders: dict[str, Any],
    cells: list[dict[str, Any]],
    has_reference: bool,
    seconds: float,
) -> dict[str, Any]:
    records = [
        {
            "encoder": cell["encoder"],
            "shift": cell["shift"],
            "severity": cell["severity"],
            "level": cell["level"],
            "metric": name,
            **value,
        }
        for cell in cells
        for name, value in cell["metrics"].items()
    ]
    return {
        "headline_metric": metric,
        "encoders": encoders,
        "shifts": {
            name: {
                "severities": [float(s) for s in severities],
                "unit": SHIFTS[name].unit,
                "description": SHIFTS[name].description,
            }
            for name, severities in config.shifts.items()
        },
        "stain_reference": (
            ("given file" if config.stain_reference is not None else "first usable train tile")
            if has_reference
            else None
        ),
        "settings": {
            "seed": config.seed,
            "top_k": config.top_k,
            "n_bootstrap": config.n_bootstrap,
            "confidence": config.confidence,
            "probe": "linear",
            "bootstrap_unit": "patient",
        },
        "records": records,
        "seconds": seconds,
        "seconds_computed": float(sum(cell.get("seconds", 0.0) for cell in cells)),
    }
