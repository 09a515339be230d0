"""Classification metrics with percentile bootstrap confidence intervals that resample patients.

Samples from one patient are correlated (several slides, views or visits), so resampling samples would
understate the uncertainty; the bootstrap here draws whole patients with replacement instead.

Each bootstrap resample is represented as a vector of integer sample weights (how often each sample was
drawn), which lets every built-in metric be evaluated for all resamples at once with array operations.

Single-label tasks pass integer labels (N,) and class probabilities (N, K) whose arg-max is the prediction;
multi-label tasks pass 0/1 labels (N, K) and independent per-label probabilities (N, K), and only support
the metrics in ``MULTILABEL_METRICS``.

The metrics in ``THRESHOLDED_METRICS`` score a hard decision: by default the arg-max class. For a binary task
``compute_metrics(..., threshold=t)`` decides positive when the positive class's probability is >= t instead (a
threshold the adapter chose on its selection data, ``threshold_``), in the point estimate and in every bootstrap
resample alike; AUROC and ECE always see the probabilities.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    brier_score_loss,
    cohen_kappa_score,
    f1_score,
    roc_auc_score,
)

from medfoundry.errors import DataError, MedfoundryError
from medfoundry.registry import Registry

MetricFn = Callable[[np.ndarray, np.ndarray], float]
# (y_true (N,), proba (N,K), weights (B,N)) -> (B,) values, NaN where the metric is undefined.
WeightedMetricFn = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]

DEFAULT_METRICS: tuple[str, ...] = ("auroc", "accuracy", "balanced_accuracy")

# Metrics for which a smaller value is better; every other metric is higher-is-better.
LOWER_IS_BETTER: frozenset[str] = frozenset({"ece", "brier"})
# Metrics defined for multi-label tasks (labels (N, K) of 0/1); the others need one class per sample.
MULTILABEL_METRICS: frozenset[str] = frozenset({"auroc"})
# Metrics of a hard decision, which a binary decision threshold changes.
THRESHOLDED_METRICS: frozenset[str] = frozenset({"accuracy", "balanced_accuracy", "f1", "kappa"})
# Metrics that read the probability values of a single-label task, so each row must be a distribution.
DISTRIBUTION_METRICS: frozenset[str] = frozenset({"auroc", "ece", "brier"})
# Guo et al. (2017), "On calibration of modern neural networks", use 15 equal-width confidence bins.
ECE_BINS = 15

# Every metric is registered in this file (a new one too); ``METRICS[name]`` and ``name in METRICS`` work as on a dict.
METRICS: Registry[MetricFn] = Registry("metric")

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


@METRICS.register("auroc")
def auroc(y_true: np.ndarray, proba: np.ndarray) -> float:
    """Area under the ROC curve; macro one-vs-rest over all K classes when K > 2. NaN if undefined.

    Multi-label (``y_true`` of shape (N, K)): the macro mean of the K per-label AUROCs, NaN when any
    label has only one class, as for an absent class in the multi-class case.
    """
    n_classes = proba.shape[1]
    with warnings.catch_warnings():
        # A single-class y_true is reported through the NaN return value instead.
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        try:
            if y_true.ndim == 2:
                return float(roc_auc_score(y_true, proba, average="macro"))
            if n_classes == 2:
                return float(roc_auc_score(y_true, proba[:, 1]))
            return float(
                roc_auc_score(y_true, proba, multi_class="ovr", average="macro", labels=list(range(n_classes)))
            )
        except ValueError:
            return float("nan")


@METRICS.register("accuracy")
def accuracy(y_true: np.ndarray, proba: np.ndarray) -> float:
    """Fraction of samples whose arg-max class equals the label."""
    return float(accuracy_score(y_true, proba.argmax(axis=1)))


@METRICS.register("balanced_accuracy")
def balanced_accuracy(y_true: np.ndarray, proba: np.ndarray) -> float:
    """Mean per-class recall over the classes present in ``y_true``."""
    with warnings.catch_warnings():
        # Predicting a class absent from y_true is normal on small test sets and does not change the value.
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        return float(balanced_accuracy_score(y_true, proba.argmax(axis=1)))


@METRICS.register("f1")
def f1(y_true: np.ndarray, proba: np.ndarray) -> float:
    """F1 of the arg-max prediction: of the positive class 1 when K == 2, else the macro mean over classes.

    Binary F1 scores class 1, the same class whose probability AUROC ranks. The macro mean runs over the
    classes present in ``y_true`` or in the predictions (sklearn's default). NaN when undefined (binary: no
    positive label and no positive prediction).
    """
    average = "binary" if proba.shape[1] == 2 else "macro"
    return float(f1_score(y_true, proba.argmax(axis=1), average=average, zero_division=np.nan))


@METRICS.register("kappa")
def kappa(y_true: np.ndarray, proba: np.ndarray) -> float:
    """Quadratic weighted Cohen's kappa of the arg-max prediction, for ordinal labels 0 < 1 < ... < K-1.

    NaN when undefined (labels and predictions all of one and the same class).
    """
    pred = proba.argmax(axis=1)
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        # sklearn warns and returns NaN for 0/0; the NaN return value reports it instead.
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(cohen_kappa_score(y_true, pred, weights="quadratic", labels=list(range(proba.shape[1]))))


def _ece_bins(confidence: np.ndarray) -> np.ndarray:
    # Bin m covers ((m-1)/M, m/M], as in Guo et al.; a top-class confidence is never 0.
    return np.clip(np.ceil(confidence * ECE_BINS).astype(np.int64) - 1, 0, ECE_BINS - 1)


@METRICS.register("ece")
def ece(y_true: np.ndarray, proba: np.ndarray) -> float:
    """Expected calibration error of the top-class confidence with 15 equal-width bins; lower is better.

    ECE = sum over bins of |B_m| / N * |accuracy(B_m) - mean confidence(B_m)| (Guo et al., 2017).
    """
    confidence = proba.max(axis=1)
    gap = (proba.argmax(axis=1) == y_true) - confidence
    per_bin = np.bincount(_ece_bins(confidence), weights=gap, minlength=ECE_BINS)
    return float(np.abs(per_bin).sum() / y_true.shape[0])


def _brier_per_sample(y_true: np.ndarray, proba: np.ndarray) -> np.ndarray:
    # Squared distance of the probability vector from the one-hot label; halved for two classes so that it equals
    # the usual positive-class Brier score (sklearn's ``scale_by_half="auto"``).
    onehot = np.zeros_like(proba)
    onehot[np.arange(y_true.shape[0]), y_true.astype(np.int64)] = 1.0
    scale = 0.5 if proba.shape[1] == 2 else 1.0
    return scale * ((proba - onehot) ** 2).sum(axis=1)


@METRICS.register("brier")
def brier(y_true: np.ndarray, proba: np.ndarray) -> float:
    """Brier score (mean squared error of the probabilities against the one-hot label); lower is better.

    Binary: of the positive class, in [0, 1]; multi-class: summed over classes, in [0, 2] (sklearn's convention).
    """
    if proba.shape[1] == 2:
        return float(brier_score_loss(y_true, proba[:, 1], pos_label=1))
    return float(brier_score_loss(y_true, proba, labels=list(range(proba.shape[1]))))


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
    if y_true.ndim == 2:
        return np.mean([weighted_binary_auroc(proba[:, k], y_true[:, k] == 1, weights) for k in range(n_classes)], 0)
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


def _weighted_confusion(y_true: np.ndarray, pred: np.ndarray, n_classes: int, weights: np.ndarray) -> np.ndarray:
    """Confusion matrices (B, K_true, K_pred) of every resample, from one matmul over a one-hot of the cells."""
    cell = y_true * n_classes + pred
    onehot = np.zeros((y_true.shape[0], n_classes * n_classes))
    onehot[np.arange(y_true.shape[0]), cell] = 1.0
    return (weights @ onehot).reshape(-1, n_classes, n_classes)


def _weighted_f1(y_true: np.ndarray, proba: np.ndarray, weights: np.ndarray) -> np.ndarray:
    n_classes = proba.shape[1]
    cm = _weighted_confusion(y_true, proba.argmax(axis=1), n_classes, weights)
    tp = np.diagonal(cm, axis1=1, axis2=2)
    # 2TP / (2TP + FP + FN) equals 2PR / (P + R) and stays defined when only one of P and R is.
    denominator = cm.sum(axis=2) + cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = np.where(denominator > 0, 2.0 * tp / np.where(denominator > 0, denominator, 1.0), np.nan)
    if n_classes == 2:
        return per_class[:, 1]
    present = denominator > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(present, per_class, 0.0).sum(axis=1) / present.sum(axis=1)


def _weighted_kappa(y_true: np.ndarray, proba: np.ndarray, weights: np.ndarray) -> np.ndarray:
    n_classes = proba.shape[1]
    observed = _weighted_confusion(y_true, proba.argmax(axis=1), n_classes, weights)
    total = observed.sum(axis=(1, 2))
    expected = observed.sum(axis=2)[:, :, None] * observed.sum(axis=1)[:, None, :] / total[:, None, None]
    grades = np.arange(n_classes)
    penalty = (grades[:, None] - grades[None, :]) ** 2.0
    disagreement = (observed * penalty).sum(axis=(1, 2))
    chance = (expected * penalty).sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(chance > 0, 1.0 - disagreement / np.where(chance > 0, chance, 1.0), np.nan)


def _weighted_ece(y_true: np.ndarray, proba: np.ndarray, weights: np.ndarray) -> np.ndarray:
    confidence = proba.max(axis=1)
    gap = (proba.argmax(axis=1) == y_true) - confidence
    binned = np.zeros((y_true.shape[0], ECE_BINS))
    binned[np.arange(y_true.shape[0]), _ece_bins(confidence)] = gap
    return np.abs(weights @ binned).sum(axis=1) / weights.sum(axis=1)


def _weighted_brier(y_true: np.ndarray, proba: np.ndarray, weights: np.ndarray) -> np.ndarray:
    return (weights @ _brier_per_sample(y_true, proba)) / weights.sum(axis=1)


_WEIGHTED: dict[str, WeightedMetricFn] = {
    "auroc": _weighted_auroc,
    "accuracy": _weighted_accuracy,
    "balanced_accuracy": _weighted_balanced_accuracy,
    "f1": _weighted_f1,
    "kappa": _weighted_kappa,
    "ece": _weighted_ece,
    "brier": _weighted_brier,
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
    multilabel = y_arr.ndim == 2
    if y_arr.ndim not in (1, 2):
        raise DataError(f"y_true must be one-dimensional (or (N, K) 0/1 for multi-label), got shape {y_arr.shape}")
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
    if multilabel:
        if y_arr.shape != proba_arr.shape:
            raise DataError(
                f"multi-label y_true has shape {y_arr.shape} but proba has shape {proba_arr.shape}; they must match"
            )
        if not np.isin(y_int, (0, 1)).all():
            raise DataError("multi-label y_true must contain only 0 and 1")
        unsupported = [m for m in metrics if m in METRICS and m not in MULTILABEL_METRICS]
        if unsupported:
            raise MedfoundryError(
                f"metric(s) {', '.join(unsupported)} do not apply to multi-label labels; "
                f"multi-label supports: {', '.join(sorted(MULTILABEL_METRICS))}"
            )
    elif y_int.min() < 0 or y_int.max() >= n_classes:
        raise DataError(
            f"y_true has labels in [{y_int.min()}, {y_int.max()}] but proba has {n_classes} columns "
            f"(labels must be 0..{n_classes - 1})"
        )
    for name in metrics:
        METRICS.get(name)  # an unknown name raises, suggesting the closest metrics
    if n_bootstrap < 0:
        raise MedfoundryError(f"n_bootstrap must be >= 0, got {n_bootstrap}")
    if not 0.0 < confidence < 1.0:
        raise MedfoundryError(f"confidence must be between 0 and 1 (exclusive), got {confidence}")
    needs_distribution = [m for m in metrics if m in DISTRIBUTION_METRICS]
    if needs_distribution and n_classes > 2 and not multilabel:
        row_sums = proba_arr.sum(axis=1)
        if not np.allclose(row_sums, 1.0, atol=1e-4):
            raise DataError(
                f"multi-class {', '.join(needs_distribution)} need(s) probabilities whose rows sum to 1 "
                f"(found sums in [{row_sums.min():.4g}, {row_sums.max():.4g}]); apply softmax first"
            )
        # A float32 softmax read as float64 is off by ~1e-7, which trips sklearn's float64 sum check (a warning per
        # call, one per bootstrap of the Brier score); dividing by the row sum removes only that rounding.
        proba_arr = proba_arr / row_sums[:, None]

    if patient_ids is None:
        return y_int, proba_arr, np.arange(n), n
    pids = list(patient_ids)
    if len(pids) != n:
        raise DataError(f"length mismatch: patient_ids has {len(pids)} entries but proba has {n} samples")
    index: dict[Hashable, int] = {}
    patient_index = np.fromiter((index.setdefault(p, len(index)) for p in pids), dtype=np.int64, count=n)
    return y_int, proba_arr, patient_index, len(index)


def decide(proba: np.ndarray, threshold: float) -> np.ndarray:
    """One-hot (N, 2) decisions of a binary task: class 1 where its probability is >= ``threshold``.

    Every thresholded metric reads only the arg-max of its input, so handing it these rows makes it score the
    thresholded decision with its unchanged point and weighted (bootstrap) forms.
    """
    positive = proba[:, 1] >= threshold
    return np.column_stack([~positive, positive]).astype(np.float64)


def _check_threshold(threshold: float, y: np.ndarray, proba: np.ndarray) -> None:
    if y.ndim != 1 or proba.shape[1] != 2:
        raise MedfoundryError(
            f"a decision threshold applies to binary tasks only, got proba of shape {proba.shape}"
            + (" with multi-label y_true" if y.ndim == 2 else "")
        )
    if not (np.isfinite(threshold) and 0.0 <= threshold <= 1.0):
        raise MedfoundryError(f"threshold must be a probability in [0, 1], got {threshold}")


def can_resample(n_patients: int) -> bool:
    """Whether resampling patients can give a confidence interval; warns once per call when it cannot.

    With a single patient every resample is that patient again, so each draw equals the point estimate and the
    "interval" has zero width: it would read as certain (and any paired difference as significant) when the test set
    holds no evidence about patient-to-patient variation at all. Such CIs are reported as NaN ("not judged").
    """
    if n_patients >= 2:
        return True
    warnings.warn(
        "the test set holds a single patient: resampling patients gives no confidence interval (reported as NaN); "
        "hold out more patients to judge differences",
        RuntimeWarning,
        stacklevel=3,
    )
    return False


def resample_weights(patient_index: np.ndarray, n_patients: int, n_bootstrap: int, seed: int) -> Iterator[np.ndarray]:
    """Chunks of bootstrap sample weights (chunk, N): each row is one resample of whole patients.

    Every sample of a patient inherits how often the patient was drawn. A caller that evaluates two
    models on the same chunks gets a paired bootstrap. Nothing is yielded for a single patient (``can_resample``),
    so every interval built on these draws (``percentile_interval``) is NaN there rather than zero-width.
    """
    if not can_resample(n_patients):
        return
    rng = np.random.default_rng(seed)
    chunk = max(1, _MAX_CHUNK_ELEMENTS // max(patient_index.shape[0], n_patients))
    uniform = np.full(n_patients, 1.0 / n_patients)
    for start in range(0, n_bootstrap, chunk):
        size = min(chunk, n_bootstrap - start)
        patient_counts = rng.multinomial(n_patients, uniform, size=size)
        yield patient_counts[:, patient_index].astype(np.float64)


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


def bootstrap_values(name: str, y: np.ndarray, proba: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Metric ``name`` under each row of bootstrap sample ``weights`` (B, N); NaN where undefined. Zero weights
    leave a sample out, so a subgroup is scored by masking the weights of a whole-test-set resample."""
    return _bootstrap_values(name, y, proba, weights)


def percentile_interval(point: float, draws: np.ndarray, n_bootstrap: int, confidence: float) -> MetricValue:
    """``point`` with the percentile CI of its bootstrap ``draws``; undefined draws (NaN) are skipped and counted, and
    the CI is NaN when more than half of the ``n_bootstrap`` resamples were undefined."""
    draws = np.asarray(draws, dtype=np.float64)
    valid = draws[np.isfinite(draws)]
    skipped = int(n_bootstrap - valid.shape[0])
    if valid.shape[0] == 0 or skipped > n_bootstrap / 2:
        return MetricValue(float(point), float("nan"), float("nan"), skipped)
    alpha = 1.0 - confidence
    low, high = np.quantile(valid, [alpha / 2.0, 1.0 - alpha / 2.0])
    return MetricValue(float(point), float(low), float(high), skipped)


def compute_metrics(
    y_true: Sequence[int] | np.ndarray,
    proba: np.ndarray,
    patient_ids: Sequence[Hashable] | None = None,
    metrics: Sequence[str] = DEFAULT_METRICS,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    threshold: float | None = None,
) -> dict[str, MetricValue]:
    """Point estimates on the full set and percentile bootstrap CIs from resampling patients.

    ``patient_ids`` (one per sample) defines the resampling unit; without it every sample is its own
    patient. Resamples on which a metric is undefined are skipped and counted in ``n_skipped``; if more
    than half are skipped the CI is NaN and a ``RuntimeWarning`` is issued. ``threshold`` (binary tasks
    only): the metrics in ``THRESHOLDED_METRICS`` call a case positive when ``proba[:, 1] >= threshold``
    instead of taking the arg-max; None keeps the arg-max.
    """
    metrics = tuple(metrics)
    y, proba_arr, patient_index, n_patients = _validate(y_true, proba, patient_ids, metrics, n_bootstrap, confidence)
    inputs = {name: proba_arr for name in metrics}
    if threshold is not None:
        _check_threshold(threshold, y, proba_arr)
        decisions = decide(proba_arr, threshold)
        inputs.update({name: decisions for name in metrics if name in THRESHOLDED_METRICS})

    results: dict[str, MetricValue] = {}
    point: dict[str, float] = {}
    for name in metrics:
        point[name] = float(METRICS[name](y, inputs[name]))
        if np.isnan(point[name]):
            warnings.warn(
                f"{name} is undefined on this test set (e.g. only one class present); reporting NaN",
                RuntimeWarning,
                stacklevel=2,
            )

    if n_bootstrap == 0 or not can_resample(n_patients):
        return {name: MetricValue(point[name], float("nan"), float("nan")) for name in metrics}

    draws: dict[str, list[np.ndarray]] = {name: [] for name in metrics}
    for weights in resample_weights(patient_index, n_patients, n_bootstrap, seed):
        for name in metrics:
            draws[name].append(_bootstrap_values(name, y, inputs[name], weights))

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
