"""Metrics and the patient-level bootstrap: agreement with sklearn, CI coverage, and input validation."""

from __future__ import annotations

import math
import time
import warnings

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from medfoundry.errors import DataError, MedfoundryError
from medfoundry.evaluate.metrics import (
    _WEIGHTED,
    METRICS,
    MetricValue,
    compute_metrics,
    weighted_binary_auroc,
)


def _phi(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def _binary_proba(scores: np.ndarray) -> np.ndarray:
    return np.column_stack([1.0 - scores, scores])


@pytest.mark.parametrize("seed", range(5))
def test_vectorised_auroc_matches_sklearn_including_ties_and_weights(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 120
    y = rng.integers(0, 2, n)
    # Rounding creates many tied scores, the case where a naive rank formula goes wrong.
    scores = np.round(rng.random(n), 1 if seed % 2 else 3)
    assert weighted_binary_auroc(scores, y == 1, np.ones((1, n)))[0] == pytest.approx(roc_auc_score(y, scores))

    weights = rng.integers(0, 4, size=(6, n))
    got = weighted_binary_auroc(scores, y == 1, weights.astype(float))
    for row, value in zip(weights, got, strict=True):
        idx = np.repeat(np.arange(n), row)
        assert value == pytest.approx(roc_auc_score(y[idx], scores[idx]), abs=1e-12)


def test_weighted_metrics_match_sklearn_on_resampled_multiclass_data() -> None:
    rng = np.random.default_rng(7)
    n, k = 90, 4
    y = rng.integers(0, k, n)
    proba = rng.dirichlet(np.ones(k), n)
    weights = rng.integers(0, 3, size=(5, n)).astype(float)
    for name in METRICS:
        got = _WEIGHTED[name](y, proba, weights)
        for row, value in zip(weights.astype(int), got, strict=True):
            idx = np.repeat(np.arange(n), row)
            assert value == pytest.approx(METRICS[name](y[idx], proba[idx]), abs=1e-12), name


def test_multiclass_macro_auroc_is_mean_of_one_vs_rest() -> None:
    rng = np.random.default_rng(3)
    n, k = 200, 3
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k)) + 1.5 * np.eye(k)[y]
    proba = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    expected = np.mean([roc_auc_score(y == c, proba[:, c]) for c in range(k)])
    result = compute_metrics(y, proba, n_bootstrap=200)
    assert result["auroc"].value == pytest.approx(expected)
    assert result["auroc"].ci_low < result["auroc"].value < result["auroc"].ci_high
    assert result["balanced_accuracy"].value == pytest.approx(balanced_accuracy_score(y, proba.argmax(1)))


def test_point_estimates_and_determinism() -> None:
    rng = np.random.default_rng(11)
    y = rng.integers(0, 2, 150)
    scores = np.clip(0.5 + 0.3 * (y - 0.5) + rng.normal(0, 0.25, 150), 0, 1)
    proba = _binary_proba(scores)
    a = compute_metrics(y, proba, seed=5)
    b = compute_metrics(y, proba, seed=5)
    assert a == b
    assert a["auroc"].value == pytest.approx(roc_auc_score(y, scores))
    assert a["accuracy"].value == pytest.approx(np.mean((scores > 0.5) == y))
    for mv in a.values():
        assert isinstance(mv, MetricValue)
        assert mv.ci_low <= mv.value <= mv.ci_high
        assert mv.n_skipped == 0


def test_bootstrap_is_fast_enough() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 150)
    proba = _binary_proba(rng.random(150))
    patients = [f"p{i // 3}" for i in range(150)]
    compute_metrics(y, proba, patients, n_bootstrap=50)  # warm-up imports
    start = time.perf_counter()
    compute_metrics(y, proba, patients, n_bootstrap=1000)
    assert time.perf_counter() - start < 0.5


def _simulate_clustered(
    rng: np.random.Generator, n_patients: int, per_patient: int, d: float, sd_patient: float, sd_noise: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scores = d * label + patient effect + noise; labels are per patient (a patient is diseased or not)."""
    labels = rng.integers(0, 2, n_patients)
    effect = rng.normal(0, sd_patient, n_patients)
    pid = np.repeat(np.arange(n_patients), per_patient)
    scores = d * labels[pid] + effect[pid] + rng.normal(0, sd_noise, pid.size)
    # A logistic squash keeps the ranks (hence the AUROC) and yields valid probabilities.
    p = 1.0 / (1.0 + np.exp(-scores))
    return labels[pid], _binary_proba(p), pid


def test_independent_samples_ci_covers_analytic_auroc() -> None:
    # Two unit Gaussians separated by d: the population AUROC is Phi(d / sqrt(2)).
    d = 1.0
    truth = _phi(d / math.sqrt(2.0))
    rng = np.random.default_rng(2024)
    hits = 0
    reps = 100
    for rep in range(reps):
        y, proba, _ = _simulate_clustered(rng, 150, 1, d, 0.0, 1.0)
        ci = compute_metrics(y, proba, metrics=("auroc",), n_bootstrap=1000, seed=rep)["auroc"]
        hits += ci.ci_low <= truth <= ci.ci_high
    assert 0.85 <= hits / reps <= 1.0


def test_patient_bootstrap_keeps_coverage_where_sample_bootstrap_loses_it() -> None:
    # Strong patient effect, several samples each: the samples of a patient are far from independent.
    d, sd_patient, sd_noise = 1.2, 1.0, 0.3
    truth = _phi(d / math.sqrt(2.0 * (sd_patient**2 + sd_noise**2)))
    rng = np.random.default_rng(99)
    reps = 100
    grouped_hits = sample_hits = 0
    for rep in range(reps):
        y, proba, pid = _simulate_clustered(rng, 50, 4, d, sd_patient, sd_noise)
        # 400 resamples keep the test quick; percentile CIs are already stable at that count.
        grouped = compute_metrics(y, proba, pid, metrics=("auroc",), n_bootstrap=400, seed=rep)["auroc"]
        naive = compute_metrics(y, proba, None, metrics=("auroc",), n_bootstrap=400, seed=rep)["auroc"]
        grouped_hits += grouped.ci_low <= truth <= grouped.ci_high
        sample_hits += naive.ci_low <= truth <= naive.ci_high
    assert 0.85 <= grouped_hits / reps <= 1.0
    assert sample_hits / reps < grouped_hits / reps - 0.15


def test_grouped_bootstrap_is_wider_when_samples_are_duplicated_within_patients() -> None:
    rng = np.random.default_rng(5)
    n_patients, copies = 80, 4
    y0 = rng.integers(0, 2, n_patients)
    s0 = np.clip(0.5 + 0.2 * (y0 - 0.5) + rng.normal(0, 0.25, n_patients), 0.001, 0.999)
    y, s = np.repeat(y0, copies), np.repeat(s0, copies)
    pid = np.repeat([f"patient-{i}" for i in range(n_patients)], copies)
    grouped = compute_metrics(y, _binary_proba(s), pid)
    naive = compute_metrics(y, _binary_proba(s), None)
    for name in ("auroc", "accuracy", "balanced_accuracy"):
        width_grouped = grouped[name].ci_high - grouped[name].ci_low
        width_naive = naive[name].ci_high - naive[name].ci_low
        # Four identical copies shrink the naive CI by about sqrt(4); demand a clear gap.
        assert width_grouped > 1.5 * width_naive, name
        assert grouped[name].value == pytest.approx(naive[name].value)


def test_undefined_resamples_are_skipped_and_counted() -> None:
    # One positive patient out of 20 drops out of ~(19/20)^20 = 36% of resamples.
    y = np.array([1] * 3 + [0] * 57)
    pid = np.repeat(np.arange(20), 3)
    rng = np.random.default_rng(1)
    proba = _binary_proba(rng.random(60))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mv = compute_metrics(y, proba, pid, metrics=("auroc",))["auroc"]
    assert 250 <= mv.n_skipped <= 480
    assert math.isfinite(mv.ci_low) and math.isfinite(mv.ci_high)


def test_ci_is_nan_with_warning_when_most_resamples_are_undefined() -> None:
    # Three classes with one patient each: a resample of 3 patients misses a class ~78% of the time.
    y = np.array([0, 0, 1, 1, 2, 2])
    pid = ["a", "a", "b", "b", "c", "c"]
    proba = np.array(
        [[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.3, 0.4, 0.3], [0.1, 0.2, 0.7], [0.2, 0.2, 0.6]]
    )
    with pytest.warns(RuntimeWarning, match="auroc: .* resamples were undefined"):
        result = compute_metrics(y, proba, pid)
    assert result["auroc"].value == pytest.approx(1.0)
    assert math.isnan(result["auroc"].ci_low) and math.isnan(result["auroc"].ci_high)
    assert result["auroc"].n_skipped > 500
    assert math.isfinite(result["accuracy"].ci_low)


def test_single_class_test_set_gives_nan_auroc_with_warning() -> None:
    proba = _binary_proba(np.linspace(0.1, 0.9, 10))
    with pytest.warns(RuntimeWarning, match="auroc is undefined"):
        result = compute_metrics(np.zeros(10, dtype=int), proba, n_bootstrap=100)
    assert math.isnan(result["auroc"].value) and math.isnan(result["auroc"].ci_low)
    assert result["accuracy"].value == pytest.approx(0.5)


def test_no_bootstrap_gives_nan_ci() -> None:
    result = compute_metrics([0, 1, 0, 1], _binary_proba(np.array([0.1, 0.8, 0.4, 0.3])), n_bootstrap=0)
    assert result["auroc"].value == pytest.approx(0.75)
    assert math.isnan(result["auroc"].ci_low)


@pytest.mark.parametrize(
    ("y", "proba", "patients", "kwargs", "error", "match"),
    [
        (
            [0, 1, 0],
            np.full((4, 2), 0.5),
            None,
            {},
            DataError,
            "length mismatch: y_true has 3 samples but proba has 4",
        ),
        (
            [0, 1],
            np.array([[0.5, 0.5], [np.nan, 0.5]]),
            None,
            {},
            DataError,
            "NaN or infinite values in 1 of 2 rows",
        ),
        ([0, 1], np.array([0.2, 0.8]), None, {}, DataError, r"shape \(N, K\) with K >= 2.*got shape \(2,\)"),
        ([0, 1], np.ones((2, 2, 1)), None, {}, DataError, r"shape \(N, K\)"),
        ([0, 2], np.full((2, 2), 0.5), None, {}, DataError, "labels must be 0..1"),
        ([0.5, 1], np.full((2, 2), 0.5), None, {}, DataError, "integer class indices"),
        ([0, 1], np.full((2, 2), 0.5), ["a"], {}, DataError, "patient_ids has 1 entries but proba has 2"),
        ([0, 1, 2], np.full((3, 3), 0.5), None, {}, DataError, "rows sum to 1.*apply softmax"),
        (
            [0, 1, 2],
            np.full((3, 3), 0.5),
            None,
            {"metrics": ("brier",)},
            DataError,
            "multi-class brier need.*rows sum to 1",
        ),
        ([0, 1], np.full((2, 2), 0.5), None, {"metrics": ("nometric",)}, MedfoundryError, "unknown metric.*nometric"),
        ([0, 1], np.full((2, 2), 0.5), None, {"confidence": 95}, MedfoundryError, "confidence must be"),
        ([], np.zeros((0, 2)), None, {}, DataError, "empty test set"),
    ],
)
def test_invalid_inputs_raise_clear_one_line_errors(
    y: list[float],
    proba: np.ndarray,
    patients: list[str] | None,
    kwargs: dict[str, object],
    error: type[Exception],
    match: str,
) -> None:
    with pytest.raises(error, match=match) as info:
        compute_metrics(y, proba, patients, **kwargs)  # type: ignore[arg-type]
    assert "\n" not in str(info.value)


def test_float32_softmax_rows_score_brier_and_ece_without_sklearn_warnings() -> None:
    # A probe's float32 softmax is off by ~1e-7 per row: fine as a distribution, but sklearn's float64 check warned
    # on every Brier call (once per bootstrap resample), which filled evaluation logs with "do not sum to one".
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(90, 3)).astype(np.float32)
    proba = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    assert np.abs(proba.astype(np.float64).sum(axis=1) - 1.0).max() > 1e-8
    y = rng.integers(0, 3, 90)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = compute_metrics(y, proba, metrics=("brier", "ece"), n_bootstrap=20)
    assert 0.0 < result["brier"].value < 2.0
