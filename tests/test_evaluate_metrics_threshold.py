"""A binary decision threshold in compute_metrics: thresholded metrics move, AUROC and ECE do not, CIs included."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, balanced_accuracy_score, cohen_kappa_score, f1_score

from medfoundry.errors import MedfoundryError
from medfoundry.evaluate.metrics import THRESHOLDED_METRICS, compute_metrics, decide, resample_weights

ALL_BINARY = ("auroc", "accuracy", "balanced_accuracy", "f1", "kappa", "ece")


@pytest.fixture(scope="module")
def breast_predictions(breastmnist_npz: Path) -> tuple[np.ndarray, np.ndarray]:
    """Test labels and probabilities of a logistic regression on raw BreastMNIST pixels (real data)."""
    data = np.load(breastmnist_npz)
    x_train = data["train_images"].reshape(len(data["train_images"]), -1) / 255.0
    x_test = data["test_images"].reshape(len(data["test_images"]), -1) / 255.0
    model = LogisticRegression(C=0.01, max_iter=300).fit(x_train, data["train_labels"].reshape(-1))
    return data["test_labels"].reshape(-1).astype(np.int64), model.predict_proba(x_test)


def _sklearn(name: str, y: np.ndarray, pred: np.ndarray) -> float:
    if name == "accuracy":
        return float(accuracy_score(y, pred))
    if name == "balanced_accuracy":
        return float(balanced_accuracy_score(y, pred))
    if name == "f1":
        return float(f1_score(y, pred, zero_division=np.nan))
    return float(cohen_kappa_score(y, pred, weights="quadratic", labels=[0, 1]))


def test_decide_is_one_hot_of_positive_probability_at_or_above_threshold() -> None:
    proba = np.array([[0.9, 0.1], [0.7, 0.3], [0.5, 0.5], [0.2, 0.8]])
    np.testing.assert_array_equal(decide(proba, 0.3), [[1, 0], [0, 1], [0, 1], [0, 1]])
    np.testing.assert_array_equal(decide(proba, 0.81), [[1, 0], [1, 0], [1, 0], [1, 0]])


def test_no_threshold_and_half_threshold_keep_the_argmax_results(
    breast_predictions: tuple[np.ndarray, np.ndarray],
) -> None:
    y, proba = breast_predictions
    assert not np.any(proba[:, 1] == 0.5)  # where p = 0.5 the arg-max says 0 and the threshold says 1
    default = compute_metrics(y, proba, metrics=ALL_BINARY, n_bootstrap=200, seed=3)
    assert compute_metrics(y, proba, metrics=ALL_BINARY, n_bootstrap=200, seed=3, threshold=None) == default
    assert compute_metrics(y, proba, metrics=ALL_BINARY, n_bootstrap=200, seed=3, threshold=0.5) == default


def test_threshold_moves_thresholded_metrics_and_their_bootstrap_only(
    breast_predictions: tuple[np.ndarray, np.ndarray],
) -> None:
    y, proba = breast_predictions
    # The positive class is the majority on BreastMNIST; a cut at its prevalence's complement calls fewer positives.
    threshold = float(np.quantile(proba[:, 1], 0.4))
    pred = (proba[:, 1] >= threshold).astype(np.int64)
    assert not np.array_equal(pred, proba.argmax(axis=1))
    n_bootstrap, seed = 300, 7
    default = compute_metrics(y, proba, metrics=ALL_BINARY, n_bootstrap=n_bootstrap, seed=seed)
    moved = compute_metrics(y, proba, metrics=ALL_BINARY, n_bootstrap=n_bootstrap, seed=seed, threshold=threshold)
    assert moved["auroc"] == default["auroc"] and moved["ece"] == default["ece"]
    weights = np.concatenate(list(resample_weights(np.arange(len(y)), len(y), n_bootstrap, seed)))
    for name in THRESHOLDED_METRICS:
        assert moved[name].value == pytest.approx(_sklearn(name, y, pred)), name
        # The CI is the percentile interval of the metric of the thresholded decision on each patient resample.
        draws = []
        for row in weights.astype(np.int64):
            idx = np.repeat(np.arange(len(y)), row)
            draws.append(_sklearn(name, y[idx], pred[idx]))
        valid = np.asarray(draws)[np.isfinite(draws)]
        low, high = np.quantile(valid, [0.025, 0.975])
        assert (moved[name].ci_low, moved[name].ci_high) == pytest.approx((low, high)), name
    assert moved["balanced_accuracy"].value != pytest.approx(default["balanced_accuracy"].value)


@pytest.mark.parametrize(
    ("labels", "proba", "threshold", "message"),
    [
        ([0, 1, 2], np.eye(3), 0.5, r"binary tasks only, got proba of shape \(3, 3\)"),
        ([[0, 1], [1, 0]], np.array([[0.2, 0.9], [0.6, 0.1]]), 0.5, "with multi-label y_true"),
        ([0, 1], np.array([[0.8, 0.2], [0.3, 0.7]]), 1.5, r"threshold must be a probability in \[0, 1\], got 1.5"),
        ([0, 1], np.array([[0.8, 0.2], [0.3, 0.7]]), float("nan"), "threshold must be a probability"),
    ],
)
def test_threshold_outside_binary_tasks_or_probabilities_is_refused(
    labels: list, proba: np.ndarray, threshold: float, message: str
) -> None:
    with pytest.raises(MedfoundryError, match=message):
        compute_metrics(labels, proba, metrics=("auroc",), n_bootstrap=0, threshold=threshold)
