"""Calibration of a cell's test probabilities: ECE and Brier score with patient-bootstrap CIs, the reliability
diagram's bins, and post-hoc temperature scaling fitted on the validation split (Guo et al., 2017).

Temperature scaling divides the logits by one scalar T > 0 chosen to minimise the negative log-likelihood of the
validation labels; it never changes the arg-max, so AUROC and accuracy stay as they are and only the confidence
moves. Adapters give probabilities, so their logarithms stand for the logits (for a softmax model the two differ
by a per-case constant, which the softmax ignores); zeros (kNN votes) are clipped first.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax

from medfoundry.errors import DataError
from medfoundry.evaluate.metrics import ECE_BINS, MetricValue, compute_metrics

CALIBRATION_METRICS: tuple[str, ...] = ("ece", "brier")
# Probabilities of exactly 0 (a kNN vote, a saturated softmax) would give -inf logits.
_EPS = 1e-7
# T in [e^-4, e^4]: beyond it the fit is chasing a validation split that is perfectly separated or all wrong.
_LOG_T_BOUNDS = (-4.0, 4.0)


def as_logits(proba: np.ndarray) -> np.ndarray:
    """Log-probabilities standing for logits (softmax(log p) == p)."""
    return np.log(np.clip(np.asarray(proba, dtype=np.float64), _EPS, 1.0))


def apply_temperature(proba: np.ndarray, temperature: float) -> np.ndarray:
    """The probabilities after dividing their logits by ``temperature``."""
    return softmax(as_logits(proba) / temperature, axis=1)


def fit_temperature(labels: np.ndarray, proba: np.ndarray) -> float:
    """The temperature minimising the negative log-likelihood of ``labels`` (N,) under ``proba`` (N, K)."""
    y = np.asarray(labels, dtype=np.int64)
    logits = as_logits(proba)
    if y.ndim != 1 or logits.ndim != 2 or y.shape[0] != logits.shape[0] or y.shape[0] == 0:
        raise DataError(
            f"temperature scaling needs labels (N,) and probabilities (N, K), got {y.shape}, {logits.shape}"
        )
    rows = np.arange(y.shape[0])

    def nll(log_t: float) -> float:
        return float(-log_softmax(logits / np.exp(log_t), axis=1)[rows, y].mean())

    found = minimize_scalar(nll, bounds=_LOG_T_BOUNDS, method="bounded")
    return float(np.exp(found.x))


def reliability_bins(labels: np.ndarray, proba: np.ndarray, n_bins: int = ECE_BINS) -> list[dict[str, float]]:
    """The reliability diagram of the top-class confidence, in the ECE's equal-width bins: per non-empty bin its
    range, number of cases, mean confidence and accuracy."""
    confidence = proba.max(axis=1)
    correct = proba.argmax(axis=1) == np.asarray(labels)
    index = np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    out = []
    for b in range(n_bins):
        members = index == b
        if members.any():
            out.append(
                {
                    "low": b / n_bins,
                    "high": (b + 1) / n_bins,
                    "n": int(members.sum()),
                    "confidence": float(confidence[members].mean()),
                    "accuracy": float(correct[members].mean()),
                }
            )
    return out


def _interval(value: MetricValue) -> dict[str, float]:
    return {"value": value.value, "ci_low": value.ci_low, "ci_high": value.ci_high}


@dataclass(frozen=True)
class CalibrationSettings:
    n_bootstrap: int = 1000
    confidence: float = 0.95
    seed: int = 0


def _state(
    labels: np.ndarray, proba: np.ndarray, patient_ids: Sequence[Hashable], settings: CalibrationSettings
) -> dict[str, Any]:
    values = compute_metrics(
        labels,
        proba,
        patient_ids,
        metrics=CALIBRATION_METRICS,
        n_bootstrap=settings.n_bootstrap,
        confidence=settings.confidence,
        seed=settings.seed,
    )
    return {
        **{name: _interval(values[name]) for name in CALIBRATION_METRICS},
        "bins": reliability_bins(labels, proba),
    }


def calibration_analysis(
    labels: np.ndarray,
    proba: np.ndarray,
    patient_ids: Sequence[Hashable],
    settings: CalibrationSettings,
    val_labels: np.ndarray | None = None,
    val_proba: np.ndarray | None = None,
) -> dict[str, Any]:
    """ECE and Brier (with CIs) and reliability bins of the test predictions; with validation predictions also the
    fitted temperature and the same after scaling the test predictions by it. The same bootstrap seed before and
    after, so the two CIs come from the same resampled patients."""
    out: dict[str, Any] = {"before": _state(labels, proba, patient_ids, settings)}
    if val_labels is not None and val_proba is not None:
        temperature = fit_temperature(val_labels, val_proba)
        out["temperature"] = temperature
        out["after"] = _state(labels, apply_temperature(proba, temperature), patient_ids, settings)
    return out
