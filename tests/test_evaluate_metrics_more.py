"""F1, quadratic weighted kappa, ECE and multi-label AUROC: agreement with sklearn on real data and resamples."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import cohen_kappa_score, f1_score, roc_auc_score

from medfoundry.errors import DataError, MedfoundryError
from medfoundry.evaluate.metrics import _WEIGHTED, METRICS, compute_metrics

NEW_METRICS = ("f1", "kappa", "ece")


@pytest.fixture(scope="module")
def breast_predictions(breastmnist_npz: Path) -> tuple[np.ndarray, np.ndarray]:
    """Test labels and probabilities of a logistic regression on raw BreastMNIST pixels (real data)."""
    data = np.load(breastmnist_npz)
    x_train = data["train_images"].reshape(len(data["train_images"]), -1) / 255.0
    x_test = data["test_images"].reshape(len(data["test_images"]), -1) / 255.0
    model = LogisticRegression(C=0.01, max_iter=300).fit(x_train, data["train_labels"].reshape(-1))
    return data["test_labels"].reshape(-1).astype(np.int64), model.predict_proba(x_test)


def _resampled(y: np.ndarray, proba: np.ndarray, row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    idx = np.repeat(np.arange(y.shape[0]), row.astype(np.int64))
    return y[idx], proba[idx]


def test_new_metrics_equal_sklearn_on_breastmnist(breast_predictions: tuple[np.ndarray, np.ndarray]) -> None:
    y, proba = breast_predictions
    pred = proba.argmax(axis=1)
    assert 0.0 < f1_score(y, pred) < 1.0  # a non-trivial classifier, so the comparison means something
    result = compute_metrics(y, proba, metrics=("auroc", *NEW_METRICS), n_bootstrap=500)
    assert result["f1"].value == pytest.approx(f1_score(y, pred, pos_label=1))
    assert result["kappa"].value == pytest.approx(cohen_kappa_score(y, pred, weights="quadratic"))
    assert result["auroc"].value == pytest.approx(roc_auc_score(y, proba[:, 1]))
    for name in NEW_METRICS:
        assert result[name].ci_low <= result[name].value <= result[name].ci_high, name

    weights = np.random.default_rng(0).integers(0, 3, size=(8, y.shape[0])).astype(float)
    for name in NEW_METRICS:
        got = _WEIGHTED[name](y, proba, weights)
        for row, value in zip(weights, got, strict=True):
            assert value == pytest.approx(METRICS[name](*_resampled(y, proba, row)), abs=1e-12), name


@pytest.mark.parametrize("seed", range(4))
def test_weighted_f1_and_kappa_match_sklearn_with_absent_classes(seed: int) -> None:
    # Few samples over 5 classes: resamples regularly lose a class, the case a vectorised form gets wrong.
    rng = np.random.default_rng(seed)
    n, k = 25, 5
    y = rng.integers(0, k, n)
    proba = rng.dirichlet(np.ones(k), n)
    weights = rng.integers(0, 3, size=(10, n)).astype(float)
    for row, f1_value, kappa_value in zip(
        weights, _WEIGHTED["f1"](y, proba, weights), _WEIGHTED["kappa"](y, proba, weights), strict=True
    ):
        y_r, p_r = _resampled(y, proba, row)
        assert f1_value == pytest.approx(f1_score(y_r, p_r.argmax(1), average="macro", zero_division=0), abs=1e-12)
        expected = cohen_kappa_score(y_r, p_r.argmax(1), weights="quadratic", labels=list(range(k)))
        assert kappa_value == pytest.approx(expected, abs=1e-12)


def test_quadratic_kappa_on_ordinal_five_grades() -> None:
    rng = np.random.default_rng(3)
    grades = rng.integers(0, 5, 300)
    # Mostly right, otherwise one grade off: quadratic kappa rewards near misses, so it stays high.
    predicted = np.clip(grades + rng.choice([-1, 0, 0, 0, 1], 300), 0, 4)
    proba = np.full((300, 5), 0.05)
    proba[np.arange(300), predicted] = 0.8
    result = compute_metrics(grades, proba, metrics=("kappa", "f1"), n_bootstrap=300)
    expected = cohen_kappa_score(grades, predicted, weights="quadratic")
    assert result["kappa"].value == pytest.approx(expected)
    assert 0.8 < expected < 1.0
    assert result["kappa"].ci_low < expected < result["kappa"].ci_high
    assert result["f1"].value == pytest.approx(f1_score(grades, predicted, average="macro"))

    # Hand-computed: truth [0, 1, 2], prediction [0, 2, 2]; penalties (i-j)^2, chance from the margins.
    small = compute_metrics([0, 1, 2], np.eye(3)[[0, 2, 2]], metrics=("kappa",), n_bootstrap=0)["kappa"]
    observed = 1.0 / 3.0  # one case one grade off
    chance = sum((i - j) ** 2 * a * b for i, a in enumerate([1, 1, 1]) for j, b in enumerate([1, 0, 2])) / 9.0
    assert small.value == pytest.approx(1.0 - observed / chance)


def test_ece_hand_computed() -> None:
    # Bin (0.8667, 0.9333]: two cases at confidence 0.9, one right -> |0.5 - 0.9| over 2 of 5 cases.
    # Bin (0.5333, 0.6]: confidences 0.58, 0.56, 0.55, two right -> |2/3 - 0.5633| over 3 of 5 cases.
    proba = np.array([[0.9, 0.1], [0.1, 0.9], [0.58, 0.42], [0.44, 0.56], [0.55, 0.45]])
    y = np.array([0, 0, 0, 1, 1])
    expected = 0.4 * 0.4 + 0.6 * abs(2.0 / 3.0 - (0.58 + 0.56 + 0.55) / 3.0)
    result = compute_metrics(y, proba, metrics=("ece",), n_bootstrap=200)["ece"]
    assert result.value == pytest.approx(expected)
    assert expected == pytest.approx(0.222)
    # Confident and always right is perfectly calibrated.
    assert METRICS["ece"](np.array([0, 1]), np.array([[1.0, 0.0], [0.0, 1.0]])) == 0.0


def test_multilabel_auroc_is_macro_over_labels_and_other_metrics_refuse() -> None:
    rng = np.random.default_rng(4)
    n, k = 200, 3
    labels = rng.integers(0, 2, size=(n, k))
    proba = 1.0 / (1.0 + np.exp(-(labels * 1.5 + rng.normal(size=(n, k)))))
    result = compute_metrics(labels, proba, metrics=("auroc",), n_bootstrap=300)["auroc"]
    expected = np.mean([roc_auc_score(labels[:, j], proba[:, j]) for j in range(k)])
    assert result.value == pytest.approx(expected)
    assert result.ci_low < expected < result.ci_high

    weights = rng.integers(0, 3, size=(5, n)).astype(float)
    for row, value in zip(weights, _WEIGHTED["auroc"](labels, proba, weights), strict=True):
        assert value == pytest.approx(roc_auc_score(*_resampled(labels, proba, row)), abs=1e-12)

    with pytest.raises(MedfoundryError, match="f1, ece do not apply to multi-label.*supports: auroc"):
        compute_metrics(labels, proba, metrics=("auroc", "f1", "ece"))
    with pytest.raises(DataError, match="only 0 and 1"):
        compute_metrics(labels * 2, proba, metrics=("auroc",))
    with pytest.raises(DataError, match=r"shape \(200, 2\) but proba has shape \(200, 3\)"):
        compute_metrics(labels[:, :2], proba, metrics=("auroc",))


def test_all_metrics_bootstrap_is_fast() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 300)
    proba = rng.dirichlet(np.ones(4), 300)
    patients = [f"p{i // 2}" for i in range(300)]
    compute_metrics(y, proba, patients, metrics=tuple(METRICS), n_bootstrap=20)
    start = time.perf_counter()
    compute_metrics(y, proba, patients, metrics=tuple(METRICS), n_bootstrap=1000)
    assert time.perf_counter() - start < 1.0
