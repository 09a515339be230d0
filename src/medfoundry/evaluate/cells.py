"""One evaluation cell (model, adapter, label fraction, seed): computed once, stored, reused on resume.

A cell writes its records (``cells/<model>__<adapter>__<fraction>__<seed>.json``, with a fingerprint of
everything it depends on) and its per-case test predictions (``predictions/``, for ``medfoundry compare`` and
the paired comparisons). Both are written atomically, so a run killed midway leaves only whole cells behind and
the next run recomputes exactly the cells that are missing or whose inputs changed. How a cell's output is scored
and kept is the task kind's business (:class:`Scorer`), so every kind shares this store.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from medfoundry.evaluate.metrics import MetricValue
from medfoundry.evaluate.predictions import predictions_path
from medfoundry.evaluate.results import ResultRecord, records_from_metrics
from medfoundry.io_utils import hash_json, write_json_atomic

log = logging.getLogger("medfoundry.cells")

# Bumped whenever what a cell file holds changes meaning; files of another layout are recomputed, never misread.
CELL_LAYOUT = 2


@dataclass
class CellOutput:
    """What fitting one adapter gives: test predictions (class probabilities for classification) and its cost."""

    proba: np.ndarray
    n_train: int
    trainable_params: int
    # A binary adapter's decision threshold, chosen on its own selection data (None: arg-max); it is part of the
    # adapter's fit, so thresholded metrics use it instead of 0.5.
    threshold: float | None = None


@dataclass(frozen=True)
class CellKey:
    model: str
    adapter: str
    label_fraction: float
    seed: int

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "adapter": self.adapter, "label_fraction": self.label_fraction, "seed": self.seed}


class Scorer(Protocol):
    """How a task kind scores and keeps one cell's output on its test split."""

    metrics: list[str]
    n_test: int

    def score(self, output: CellOutput, seed: int) -> Mapping[str, MetricValue]: ...

    def save_predictions(self, path: Path, output: CellOutput) -> None: ...


@dataclass(frozen=True)
class CellStore:
    """Where a task's cells and predictions live."""

    root: Path

    def cell_path(self, key: CellKey) -> Path:
        # The file stem is the predictions file's, so a cell and its predictions are named alike.
        return self.root / "cells" / self.predictions_path(key).with_suffix(".json").name

    def predictions_path(self, key: CellKey) -> Path:
        return predictions_path(self.root / "predictions", **key.as_dict())


def _cached(path: Path, fingerprint: str) -> list[ResultRecord] | None:
    if not path.is_file():
        return None
    try:
        stored = json.loads(path.read_text())
    except (json.JSONDecodeError, OSError):
        log.warning("%s: unreadable cell file, recomputing it", path.name)
        return None
    if not isinstance(stored, dict) or stored.get("layout") != CELL_LAYOUT:
        log.warning("%s: cell from an older medfoundry layout, recomputing it", path.name)
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
    scorer: Scorer,
    evaluate_settings: Mapping[str, Any],
) -> tuple[list[ResultRecord], bool]:
    """The cell's records and whether they were reused (True) or computed now (False).

    ``inputs_hash`` must change whenever anything the cell depends on changes (encoder weights, data, adapter
    settings); the evaluation settings, the metrics and the key are added here.
    """
    path = store.cell_path(key)
    predictions_file = store.predictions_path(key)
    fingerprint = hash_json(
        {"key": key.as_dict(), "inputs": inputs_hash, "evaluate": dict(evaluate_settings), "metrics": scorer.metrics}
    )
    cached = _cached(path, fingerprint)
    if cached is not None and predictions_file.is_file():
        return cached, True
    started = time.perf_counter()
    output = compute()
    fit_seconds = time.perf_counter() - started
    scorer.save_predictions(predictions_file, output)
    records = records_from_metrics(
        dict(scorer.score(output, key.seed)),
        task=task,
        n_train=output.n_train,
        n_test=scorer.n_test,
        trainable_params=output.trainable_params,
        fit_seconds=round(fit_seconds, 3),
        **key.as_dict(),
    )
    write_json_atomic(
        path, {"layout": CELL_LAYOUT, "fingerprint": fingerprint, "records": [r.__dict__ for r in records]}
    )
    return records, False
