"""Calibration: Brier score with patient-bootstrap CIs, temperature scaling fitted on validation predictions, the
reliability bins. The engine run that writes them to results.json and the report is in tests/test_subgroups.py."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import softmax
from sklearn.metrics import brier_score_loss

from medfoundry.evaluate.calibration import (
    CalibrationSettings,
    apply_temperature,
    calibration_analysis,
    fit_temperature,
    reliability_bins,
)
from medfoundry.evaluate.metrics import METRICS, bootstrap_values, compute_metrics


def _overconfident(n: int, k: int, temperature: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from softmax(z) and probabilities softmax(z * temperature): over-confident by ``temperature``."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2.0, size=(n, k))
    labels = np.array([rng.choice(k, p=p) for p in softmax(logits, axis=1)])
    return labels, softmax(logits * temperature, axis=1)


def test_brier_matches_sklearn_and_its_bootstrap_form() -> None:
    labels, proba = _overconfident(200, 3, 1.0, 0)
    assert METRICS["brier"](labels, proba) == pytest.approx(brier_score_loss(labels, proba, labels=[0, 1, 2]))
    binary = np.column_stack([1 - proba[:, 0], proba[:, 0]])
    positive = (labels == 0).astype(int)
    assert METRICS["brier"](positive, binary) == pytest.approx(brier_score_loss(positive, binary[:, 1]))
    # Unit weights are the full sample: the weighted (bootstrap) form gives the point value.
    ones = np.ones((1, labels.shape[0]))
    assert bootstrap_values("brier", labels, proba, ones)[0] == pytest.approx(METRICS["brier"](labels, proba))
    value = compute_metrics(labels, proba, metrics=("brier",), n_bootstrap=200)["brier"]
    assert value.ci_low < value.value < value.ci_high


def test_temperature_scaling_undoes_overconfidence() -> None:
    val_y, val_p = _overconfident(600, 3, 2.5, 1)
    assert fit_temperature(val_y, val_p) == pytest.approx(2.5, rel=0.15)
    test_y, test_p = _overconfident(400, 3, 2.5, 2)
    patients = [f"p{i // 2}" for i in range(len(test_y))]  # two cases per patient
    result = calibration_analysis(test_y, test_p, patients, CalibrationSettings(n_bootstrap=200), val_y, val_p)
    before, after = result["before"], result["after"]
    assert after["ece"]["value"] < before["ece"]["value"] / 2
    assert after["brier"]["value"] < before["brier"]["value"]
    assert before["ece"]["ci_low"] <= before["ece"]["ci_high"]
    # Scaling never changes the predicted class.
    assert (apply_temperature(test_p, result["temperature"]).argmax(1) == test_p.argmax(1)).all()
    assert sum(b["n"] for b in before["bins"]) == len(test_y)
    assert all(b["low"] < b["confidence"] <= b["high"] for b in reliability_bins(test_y, test_p))


def test_without_validation_predictions_only_before_is_reported() -> None:
    labels, proba = _overconfident(50, 2, 1.0, 3)
    result = calibration_analysis(labels, proba, list(map(str, range(50))), CalibrationSettings(n_bootstrap=50))
    assert set(result) == {"before"}
