"""Classification metrics with percentile bootstrap confidence intervals that resample patients.

Samples from one patient are correlated (several slides, views or visits), so resampling samples would
understate the uncertainty; the bootstrap here draws whole patients with replacement instead.

Each bootstrap resample is represented as a vector of integer sample weights (how often each sample was
drawn), which lets every built-in metric be evaluated for all resamples at once with array operations.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score

from medfoundry.errors import DataError, MedfoundryError

MetricFn = Callable[[np.ndarray, np.ndarray], float]
# (y_true (N,), proba (N,K), weights (B,N)) -> (B,) values, NaN where the metric is undefined.
WeightedMetricFn = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]

DEFAULT_METRICS: tuple[str, ...] = ("auroc", "accuracy", "balanced_accuracy")

# Bounds the (chunk, N) float64 work arrays to ~32 MB each, so large test sets do not exhaust memory.
_MAX_CHUNK_ELEMENTS = 4_000_000


@dataclass
class MetricValue:
    """A point estimate with its bootstrap confidence interval (NaN when the CI is undefined).

    ``n_skipped`` counts bootstrap resamples on which the metric was undefined (e.g. one class only).
    """

    value: float
    ci_low: float
    ci_high: float
    n_skipped: int = 0


def auroc(y_true: np.ndarray, proba: np.ndarray) -> float:
    """Area under the ROC curve; macro one-vs-rest over all K classes when K > 2. NaN if undefined."""
    n_classes = proba.shape[1]
    with warnings.catch_warnings():
        # A single-class y_true is reported through the NaN return value instead.
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        try:
            if n_classes == 2:
                return float(roc_auc_score(y_true, proba[:, 1]))
            return float(
                roc_auc_score(y_true, proba, multi_class="ovr", average="macro", labels=list(range(n_classes)))
            )
        except ValueError:
            return float("nan")


def accuracy(y_true: np.ndarray, proba: np.ndarray) -> float:
    """Fraction of samples whose arg-max class equals the label."""
    return float(accuracy_score(y_true, proba.argmax(axis=1)))


def balanced_accuracy(y_true: np.ndarray, proba: np.ndarray) -> float:
    """Mean per-class recall over the classes present in ``y_true``."""
    with warnings.catch_warnings():
        # Predicting a class absent from y_true is normal on small test sets and does not change the value.
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        return float(balanced_accuracy_score(y_true, proba.argmax(axis=1)))


METRICS: dict[str, MetricFn] = {
    "auroc": auroc,
    "accuracy": accuracy,
    "balanced_accuracy": balanced_accuracy,
}


def weighted_binary_auroc(scores: np.ndarray, positive: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Mann-Whitney AUROC for each row of integer sample ``weights`` (B,N); ties count one half.

    With unit weights this equals ``roc_auc_score(positive, scores)``; with weight w a sample counts as w
    copies, which is exactly what a bootstrap resample is.
    """
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    n = sorted_scores.shape[0]
    starts = np.ones(n, dtype=bool)
    starts[1:] = sorted_scores[1:] != sorted_scores[:-1]
    group = np.cumsum(starts) - 1
    group_first = np.flatnonzero(starts)
    group_end = np.append(group_first[1:], n)  # one past the last index of each tie group
    first = group_first[group]
    end = group_end[group]

    pos = positive[order].astype(np.float64)
    w = weights[:, order]
    w_pos = w * pos
    w_neg = w - w_pos
    cum_neg = np.zeros((w.shape[0], n + 1))
    np.cumsum(w_neg, axis=1, out=cum_neg[:, 1:])
    # Negatives strictly below a positive's score count fully, negatives tied with it count one half.
    below_plus_half_tied = 0.5 * (cum_neg[:, first] + cum_neg[:, end])
    numerator = (w_pos * below_plus_half_tied).sum(axis=1)
    denominator = w_pos.sum(axis=1) * w_neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1.0), np.nan)


def _weighted_auroc(y_true: np.ndarray, proba: np.ndarray, weights: np.ndarray) -> np.ndarray:
    n_classes = proba.shape[1]
    if n_classes == 2:
        return weighted_binary_auroc(proba[:, 1], y_true == 1, weights)
    # Macro one-vs-rest; NaN propagates when any class is absent, as sklearn cannot score that case either.
    per_class = [weighted_binary_auroc(proba[:, k], y_true == k, weights) for k in range(n_classes)]
    return np.mean(per_class, axis=0)


def _weighted_accuracy(y_true: np.ndarray, proba: np.ndarray, weights: np.ndarray) -> np.ndarray:
    correct = (proba.argmax(axis=1) == y_true).astype(np.float64)
    return (weights @ correct) / weights.sum(axis=1)


def _weighted_balanced_accuracy(y_true: np.ndarray, proba: np.ndarray, weights: np.ndarray) -> np.ndarray:
    correct = (proba.argmax(axis=1) == y_true).astype(np.float64)
    recalls = []
    counts = []
    for k in range(proba.shape[1]):
        in_class = (y_true == k).astype(np.float64)
        n_k = weights @ in_class
        with np.errstate(invalid="ignore", divide="ignore"):
            recalls.append(np.where(n_k > 0, (weights @ (in_class * correct)) / np.where(n_k > 0, n_k, 1), 0.0))
        counts.append(n_k > 0)
    present = np.array(counts)
    # Average only over classes drawn into the resample, matching sklearn on the resampled data.
    return np.sum(recalls, axis=0) / present.sum(axis=0)


_WEIGHTED: dict[str, WeightedMetricFn] = {
    "auroc": _weighted_auroc,
    "accuracy": _weighted_accuracy,
    "balanced_accuracy": _weighted_balanced_accuracy,
}


def _validate(
    y_true: Sequence[int] | np.ndarray,
    proba: np.ndarray,
    patient_ids: Sequence[Hashable] | None,
    metrics: Sequence[str],
    n_bootstrap: int,
    confidence: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Return (labels, proba, patient index per sample, number of patients) or raise a one-line error."""
    proba_arr = np.asarray(proba, dtype=np.float64)
    if proba_arr.ndim != 2 or proba_arr.shape[1] < 2:
        raise DataError(
            f"proba must have shape (N, K) with K >= 2 classes, got shape {proba_arr.shape}; "
            "for binary tasks pass both columns [1 - p, p]"
        )
    n, n_classes = proba_arr.shape
    y_arr = np.asarray(y_true)
    if y_arr.ndim != 1:
        raise DataError(f"y_true must be one-dimensional, got shape {y_arr.shape}")
    if y_arr.shape[0] != n:
        raise DataError(f"length mismatch: y_true has {y_arr.shape[0]} samples but proba has {n}")
    if n == 0:
        raise DataError("cannot compute metrics on an empty test set")
    if not np.isfinite(proba_arr).all():
        bad = int((~np.isfinite(proba_arr)).any(axis=1).sum())
        raise DataError(f"proba contains NaN or infinite values in {bad} of {n} rows")
    if y_arr.dtype.kind == "f":
        if not np.isfinite(y_arr).all() or not np.all(y_arr == np.round(y_arr)):
            raise DataError("y_true must contain integer class indices")
    elif y_arr.dtype.kind not in "iub":
        raise DataError(f"y_true must contain integer class indices, got dtype {y_arr.dtype}")
    y_int = y_arr.astype(np.int64)
    if y_int.min() < 0 or y_int.max() >= n_classes:
        raise DataError(
            f"y_true has labels in [{y_int.min()}, {y_int.max()}] but proba has {n_classes} columns "
            f"(labels must be 0..{n_classes - 1})"
        )
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise MedfoundryError(f"unknown metric(s) {', '.join(unknown)}; known: {', '.join(sorted(METRICS))}")
    if n_bootstrap < 0:
        raise MedfoundryError(f"n_bootstrap must be >= 0, got {n_bootstrap}")
    if not 0.0 < confidence < 1.0:
        raise MedfoundryError(f"confidence must be between 0 and 1 (exclusive), got {confidence}")
    if "auroc" in metrics and n_classes > 2:
        row_sums = proba_arr.sum(axis=1)
        if not np.allclose(row_sums, 1.0, atol=1e-4):
            raise DataError(
                "multi-class AUROC needs probabilities whose rows sum to 1 "
                f"(found sums in [{row_sums.min():.4g}, {row_sums.max():.4g}]); apply softmax first"
            )
        # Removes float32 rounding that would otherwise trip sklearn's stricter sum check.
        proba_arr = proba_arr / row_sums[:, None]

    if patient_ids is None:
        return y_int, proba_arr, np.arange(n), n
    pids = list(patient_ids)
    if len(pids) != n:
        raise DataError(f"length mismatch: patient_ids has {len(pids)} entries but proba has {n} samples")
    index: dict[Hashable, int] = {}
    patient_index = np.fromiter((index.setdefault(p, len(index)) for p in pids), dtype=np.int64, count=n)
    return y_int, proba_arr, patient_index, len(index)


def _bootstrap_values(
    name: str,
    y: np.ndarray,
    proba: np.ndarray,
    weights: np.ndarray,
) -> np.ndarray:
    weighted = _WEIGHTED.get(name)
    if weighted is not None:
        return weighted(y, proba, weights)
    # Metrics registered without a weighted form are evaluated resample by resample on repeated indices.
    fn = METRICS[name]
    out = np.empty(weights.shape[0])
    all_idx = np.arange(y.shape[0])
    for b, row in enumerate(weights.astype(np.int64)):
        idx = np.repeat(all_idx, row)
        try:
            out[b] = fn(y[idx], proba[idx])
        except ValueError:
            out[b] = np.nan
    return out


def compute_metrics(
    y_true: Sequence[int] | np.ndarray,
    proba: np.ndarray,
    patient_ids: Sequence[Hashable] | None = None,
    metrics: Sequence[str] = DEFAULT_METRICS,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, MetricValue]:
    """Point estimates on the full set and percentile bootstrap CIs from resampling patients.

    ``patient_ids`` (one per sample) defines the resampling unit; without it every sample is its own
    patient. Resamples on which a metric is undefined are skipped and counted in ``n_skipped``; if more
    than half are skipped the CI is NaN and a ``RuntimeWarning`` is issued.
    """
    metrics = tuple(metrics)
    y, proba_arr, patient_index, n_patients = _validate(y_true, proba, patient_ids, metrics, n_bootstrap, confidence)

    results: dict[str, MetricValue] = {}
    point: dict[str, float] = {}
    for name in metrics:
        point[name] = float(METRICS[name](y, proba_arr))
        if np.isnan(point[name]):
            warnings.warn(
                f"{name} is undefined on this test set (e.g. only one class present); reporting NaN",
                RuntimeWarning,
                stacklevel=2,
            )

    if n_bootstrap == 0:
        return {name: MetricValue(point[name], float("nan"), float("nan")) for name in metrics}

    rng = np.random.default_rng(seed)
    n = y.shape[0]
    chunk = max(1, _MAX_CHUNK_ELEMENTS // max(n, n_patients))
    draws: dict[str, list[np.ndarray]] = {name: [] for name in metrics}
    uniform = np.full(n_patients, 1.0 / n_patients)
    for start in range(0, n_bootstrap, chunk):
        size = min(chunk, n_bootstrap - start)
        # How often each patient is drawn; every sample of a patient inherits that count as its weight.
        patient_counts = rng.multinomial(n_patients, uniform, size=size)
        weights = patient_counts[:, patient_index].astype(np.float64)
        for name in metrics:
            draws[name].append(_bootstrap_values(name, y, proba_arr, weights))

    alpha = 1.0 - confidence
    for name in metrics:
        values = np.concatenate(draws[name])
        valid = values[np.isfinite(values)]
        n_skipped = int(n_bootstrap - valid.shape[0])
        if valid.shape[0] == 0 or n_skipped > n_bootstrap / 2:
            if not np.isnan(point[name]):
                warnings.warn(
                    f"{name}: {n_skipped} of {n_bootstrap} bootstrap resamples were undefined "
                    "(too few patients of some class); confidence interval set to NaN",
                    RuntimeWarning,
                    stacklevel=2,
                )
            results[name] = MetricValue(point[name], float("nan"), float("nan"), n_skipped)
            continue
        low, high = np.quantile(valid, [alpha / 2.0, 1.0 - alpha / 2.0])
        results[name] = MetricValue(point[name], float(low), float(high), n_skipped)
    return results
