"""Paired bootstrap comparison of two models (or adapters) evaluated on the same test cases.

Two models scored on the same cases make correlated errors; resampling the same patients for both and
taking the difference per resample keeps that correlation, so the CI of the difference is much narrower
(and honest) compared with combining two independent CIs.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np

from medfoundry.errors import DataError, MedfoundryError
from medfoundry.evaluate.metrics import (
    METRICS,
    MetricValue,
    _bootstrap_values,
    _validate,
    can_resample,
    resample_weights,
)


@dataclass
class PairedDifference(MetricValue):
    """``value`` = metric(A) - metric(B) with its paired percentile bootstrap CI.

    ``share_opposite`` is the share of valid resamples whose difference is zero or of the sign opposite
    to the observed one (1.0 when the observed difference is 0). It is a bootstrap estimate of how often
    the ranking would flip, comparable to a one-sided p-value, not a calibrated hypothesis test.
    """

    value_a: float = float("nan")
    value_b: float = float("nan")
    share_opposite: float = float("nan")

    @property
    def excludes_zero(self) -> bool:
        """Whether the CI lies entirely on one side of 0 (False when the CI is NaN)."""
        return bool(self.ci_low > 0 or self.ci_high < 0)


def _as_runs(proba: np.ndarray | Sequence[np.ndarray]) -> list[np.ndarray]:
    # A list holds one prediction array per seed (runs); a single array is one run.
    if isinstance(proba, np.ndarray):
        return [proba]
    return [np.asarray(p) for p in proba]


def paired_difference(
    y_true: Sequence[int] | np.ndarray,
    proba_a: np.ndarray | Sequence[np.ndarray],
    proba_b: np.ndarray | Sequence[np.ndarray],
    patient_ids: Sequence[Hashable] | None = None,
    metric: str = "auroc",
    n_bootstrap: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> PairedDifference:
    """metric(A) - metric(B) on the same cases, resampling the same patients for both models.

    ``proba_a`` and ``proba_b`` must be aligned row by row with ``y_true`` (see
    ``predictions.align_predictions``). Either may be a list of arrays, one per seed of the same model: the
    difference is then between the seed-averaged metrics, and every resample is applied to all seeds, so the CI
    holds the test-set sampling and the seed-to-seed variation together. Resamples on which the metric is undefined
    for either model are skipped and counted in ``n_skipped``; the CI is NaN when more than half are.
    """
    if metric not in METRICS:
        raise MedfoundryError(f"unknown metric {metric}; known: {', '.join(sorted(METRICS))}")
    runs_a, runs_b = _as_runs(proba_a), _as_runs(proba_b)
    if not runs_a or not runs_b:
        raise DataError("need at least one prediction array for each of A and B")
    checked_a, checked_b = [], []
    for runs, checked in ((runs_a, checked_a), (runs_b, checked_b)):
        for proba in runs:
            y, p, patient_index, n_patients = _validate(y_true, proba, patient_ids, (metric,), n_bootstrap, confidence)
            checked.append(p)
    if checked_a[0].shape != checked_b[0].shape or any(p.shape != checked_a[0].shape for p in checked_a + checked_b):
        raise DataError(
            f"proba_a has shape {checked_a[0].shape} but proba_b has shape {checked_b[0].shape}; they must match"
        )
    value_a = float(np.mean([METRICS[metric](y, p) for p in checked_a]))
    value_b = float(np.mean([METRICS[metric](y, p) for p in checked_b]))
    point = value_a - value_b
    nan = float("nan")
    if n_bootstrap == 0 or not can_resample(n_patients):
        return PairedDifference(point, nan, nan, 0, value_a, value_b, nan)

    def mean_over_runs(runs: list[np.ndarray], weights: np.ndarray) -> np.ndarray:
        return np.mean([_bootstrap_values(metric, y, p, weights) for p in runs], axis=0)

    diffs = np.concatenate(
        [
            mean_over_runs(checked_a, w) - mean_over_runs(checked_b, w)
            for w in resample_weights(patient_index, n_patients, n_bootstrap, seed)
        ]
    )
    valid = diffs[np.isfinite(diffs)]
    n_skipped = int(n_bootstrap - valid.shape[0])
    if valid.shape[0] == 0 or n_skipped > n_bootstrap / 2 or not np.isfinite(point):
        return PairedDifference(point, nan, nan, n_skipped, value_a, value_b, nan)
    alpha = 1.0 - confidence
    low, high = np.quantile(valid, [alpha / 2.0, 1.0 - alpha / 2.0])
    return PairedDifference(point, float(low), float(high), n_skipped, value_a, value_b, share_opposite(point, valid))


def share_opposite(point: float, valid: np.ndarray) -> float:
    """Share of the valid resampled differences that are zero or of the sign opposite to ``point`` (1 for a tie,
    NaN when there are none)."""
    if valid.size == 0:
        return float("nan")
    if point > 0:
        return float(np.mean(valid <= 0))
    if point < 0:
        return float(np.mean(valid >= 0))
    return 1.0
