"""One evaluation cell (model, adapter, label fraction, seed): computed once, stored, reused on resume.

A cell writes its records (``cells/<model>__<adapter>__<fraction>__<seed>.json``, with a fingerprint of
everything it depends on) and its per-case test predictions (``predictions/``, for ``medfoundry compare`` and
the paired comparisons). Both are written atomically, so a run killed midway leaves only whole cells behind and
the next run recomputes exactly the cells that are missing or whose inputs changed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medfoundry.config import EvaluateConfig
from medfoundry.data.sample import ImageSet
from medfoundry.evaluate.metrics import compute_metrics
from medfoundry.evaluate.predictions import Predictions, predictions_path, write_predictions
from medfoundry.evaluate.results import ResultRecord, records_from_metrics
from medfoundry.io_utils import hash_json, write_json_atomic


@dataclass
class CellOutput:
    """What fitting one adapter gives: test probabilities and its cost."""

    proba: np.ndarray
    n_train: int
    trainable_params: int


@dataclass(frozen=True)
class CellKey:
    model: str
    adapter: str
    label_fraction: float
    seed: int

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "adapter": self.adapter, "label_fraction": self.label_fraction, "seed": self.seed}


@dataclass(frozen=True)
class CellStore:
    """Where a task's cells and predictions live."""

    root: Path

    def cell_path(self, key: CellKey) -> Path:
        return self.root / "cells" / f"{key.model}__{key.adapter}__{key.label_fraction}__{key.seed}.json"

    def predictions_path(self, key: CellKey) -> Path:
        return predictions_path(self.root / "predictions", **key.as_dict())


def _cached(path: Path, fingerprint: str) -> list[ResultRecord] | None:
    if not path.is_file():
        return None
    try:
        stored = json.loads(path.read_text())
    except (json.JSONDecodeError, OSError):
        return None
    if stored.get("fingerprint") != fingerprint:
        return None
    return [ResultRecord(**record) for record in stored["records"]]


def evaluate_cell(
    store: CellStore,
    key: CellKey,
    task: str,
    inputs_hash: str,
    compute: Callable[[], CellOutput],
    test: ImageSet,
    evaluate: EvaluateConfig,
    metrics: list[str] | None = None,
) -> tuple[list[ResultRecord], bool]:
    """The cell's records and whether they were reused (True) or computed now (False).

    ``inputs_hash`` must change whenever anything the cell depends on changes (encoder weights, data, adapter
    settings); the evaluation settings and the key are added here.
    """
    metrics = list(metrics or evaluate.metrics)
    path = store.cell_path(key)
    predictions_file = store.predictions_path(key)
    fingerprint = hash_json(
        {"key": key.as_dict(), "inputs": inputs_hash, "evaluate": evaluate.model_dump(mode="json"), "metrics": metrics}
    )
    cached = _cached(path, fingerprint)
    if cached is not None and predictions_file.is_file():
        return cached, True
    y_test = np.asarray(test.labels)
    started = time.perf_counter()
    output = compute()
    fit_seconds = time.perf_counter() - started
    write_predictions(predictions_file, Predictions(list(test.ids), list(test.patient_ids), y_test, output.proba))
    values = compute_metrics(
        y_test,
        output.proba,
        test.patient_ids,
        metrics=tuple(metrics),
        n_bootstrap=evaluate.n_bootstrap,
        confidence=evaluate.confidence,
        seed=key.seed,
    )
    records = records_from_metrics(
        values,
        task=task,
        n_train=output.n_train,
        n_test=len(y_test),
        trainable_params=output.trainable_params,
        fit_seconds=round(fit_seconds, 3),
        **key.as_dict(),
    )
    write_json_atomic(path, {"fingerprint": fingerprint, "records": [r.__dict__ for r in records]})
    return records, False
