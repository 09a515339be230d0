"""Dice per class with percentile bootstrap CIs that resample test units (z slabs or whole volumes).

Voxels next to each other are strongly correlated, so resampling voxels would give absurdly narrow CIs; the
test region is cut into units (non-overlapping slabs of whole slices, or whole volumes) and the bootstrap draws
units with replacement. Dice is pooled over the drawn units: ``2 * sum(|P & L|) / (sum(|P|) + sum(|L|))``, the
Dice of the union of the drawn units, not a mean of per-unit Dice (which a slab without the organ would make
undefined). Own code rather than ``monai.metrics.DiceMetric``, which returns per-image Dice and not the counts
a pooled bootstrap needs; the point estimate equals DiceMetric's on the whole test region (tested).

The bootstrap weights come from :func:`medfoundry.evaluate.metrics.resample_weights`, the same resampling the
classification metrics use (one row of unit counts per resample).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from medfoundry.errors import DataError
from medfoundry.evaluate.metrics import MetricValue, percentile_interval, resample_weights


@dataclass
class DiceCounts:
    """Per unit and class: ``intersection``, ``predicted`` and ``reference`` voxel counts, each ``(U, K)``."""

    intersection: np.ndarray
    predicted: np.ndarray
    reference: np.ndarray
    unit_names: list[str]

    @property
    def n_units(self) -> int:
        return int(self.intersection.shape[0])

    def concat(self, other: DiceCounts) -> DiceCounts:
        return DiceCounts(
            np.concatenate([self.intersection, other.intersection]),
            np.concatenate([self.predicted, other.predicted]),
            np.concatenate([self.reference, other.reference]),
            self.unit_names + other.unit_names,
        )


def slab_units(n_slices: int, unit_slices: int) -> list[tuple[int, int]]:
    """Non-overlapping slabs of ``unit_slices`` whole slices; a remainder thinner than half a slab joins the last."""
    if unit_slices < 1:
        raise DataError(f"unit_slices must be >= 1, got {unit_slices}")
    starts = list(range(0, n_slices, unit_slices))
    slabs = [(a, min(a + unit_slices, n_slices)) for a in starts]
    if len(slabs) > 1 and slabs[-1][1] - slabs[-1][0] < unit_slices / 2:
        last = slabs.pop()
        slabs[-1] = (slabs[-1][0], last[1])
    return slabs


def dice_counts(
    prediction: np.ndarray,
    reference: np.ndarray,
    n_classes: int,
    units: Sequence[tuple[int, int]] | None = None,
    prefix: str = "",
) -> DiceCounts:
    """Counts per z slab (``units`` as ``[start, stop)`` on the last axis; None: the whole array as one unit)."""
    prediction = np.asarray(prediction)
    reference = np.asarray(reference)
    if prediction.shape != reference.shape:
        raise DataError(f"prediction shape {prediction.shape} differs from the reference's {reference.shape}")
    units = list(units) if units is not None else [(0, prediction.shape[-1])]
    inter, pred, ref = (np.zeros((len(units), n_classes), np.int64) for _ in range(3))
    for u, (a, b) in enumerate(units):
        p = prediction[..., a:b].ravel().astype(np.int64)
        r = reference[..., a:b].ravel().astype(np.int64)
        pred[u] = np.bincount(p, minlength=n_classes)[:n_classes]
        ref[u] = np.bincount(r, minlength=n_classes)[:n_classes]
        inter[u] = np.bincount(p[p == r], minlength=n_classes)[:n_classes]
    names = [f"{prefix}z{a}-{b}" for a, b in units]
    return DiceCounts(inter, pred, ref, names)


def _pooled_dice(inter: np.ndarray, pred: np.ndarray, ref: np.ndarray) -> np.ndarray:
    denominator = pred + ref
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, 2.0 * inter / np.where(denominator > 0, denominator, 1), np.nan)


def dice_with_ci(
    counts: DiceCounts,
    class_names: Sequence[str],
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, MetricValue]:
    """``dice_<class>`` for every class (background included) and ``dice_mean`` over the foreground classes.

    Dice is NaN where a class is in neither the prediction nor the reference (of the whole set, or of one
    resample, which is then skipped and counted in ``n_skipped``).
    """
    if len(class_names) != counts.intersection.shape[1]:
        raise DataError(f"{len(class_names)} class names for {counts.intersection.shape[1]} classes")
    if counts.n_units == 0:
        raise DataError("no test unit to compute Dice on")
    point = _pooled_dice(counts.intersection.sum(0), counts.predicted.sum(0), counts.reference.sum(0))
    names = [f"dice_{name}" for name in class_names]
    point_all = np.append(point, np.nanmean(point[1:]) if np.isfinite(point[1:]).any() else np.nan)
    names.append("dice_mean")
    if n_bootstrap == 0:
        return {n: MetricValue(float(v), float("nan"), float("nan")) for n, v in zip(names, point_all, strict=True)}
    draws = []
    unit_index = np.arange(counts.n_units)
    for weights in resample_weights(unit_index, counts.n_units, n_bootstrap, seed):
        per_class = _pooled_dice(weights @ counts.intersection, weights @ counts.predicted, weights @ counts.reference)
        with warnings.catch_warnings():
            # A resample where no foreground class is defined gives an all-NaN row: skipped below.
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nanmean(per_class[:, 1:], axis=1) if per_class.shape[1] > 1 else np.full(len(weights), np.nan)
        draws.append(np.column_stack([per_class, mean]))
    if not draws:  # a single test unit: nothing to resample
        return {n: MetricValue(float(v), float("nan"), float("nan")) for n, v in zip(names, point_all, strict=True)}
    values = np.concatenate(draws)
    return {
        name: percentile_interval(float(point_all[j]), values[:, j], n_bootstrap, confidence)
        for j, name in enumerate(names)
    }
