"""Probes whose regularisation strength is picked from a grid by validation AUROC (linear and MLP probes)."""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.pipeline import Pipeline

from medfoundry.evaluate.metrics import auroc


def expand_proba(proba: np.ndarray, classes: np.ndarray, n_classes: int) -> np.ndarray:
    """Probabilities over all ``n_classes`` labels, when a small training subset lacked some classes."""
    if proba.shape[1] == n_classes and np.array_equal(classes, np.arange(n_classes)):
        return proba
    full = np.zeros((proba.shape[0], n_classes), dtype=np.float64)
    full[:, classes.astype(int)] = proba
    return full


class GridSelectedProbe(ClassifierMixin, BaseEstimator):
    """Fits one pipeline per grid value and keeps the one with the best validation AUROC.

    Subclasses give the grid (``_grid``), the pipeline for one value (``_pipeline``) and which of two tied values
    is the simpler model (``_simplicity``: larger is simpler). Without validation data (or with one class in it)
    the middle of the grid is used. ``selected_`` is the chosen value, ``val_scores_`` the AUROC of each.
    """

    n_classes: int | None

    def _grid(self) -> list[float]:
        raise NotImplementedError

    def _pipeline(self, value: float) -> Pipeline:
        raise NotImplementedError

    def _simplicity(self, value: float) -> float:
        raise NotImplementedError

    def _fit_one(self, value: float, X: np.ndarray, y: np.ndarray) -> Pipeline:
        # Small separable label subsets can stop lbfgs at max_iter; a grid value is judged by its validation
        # result, so an iteration budget reached is not reported as a warning.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            return self._pipeline(value).fit(X, y)

    def fit(
        self, X: np.ndarray, y: np.ndarray, X_val: np.ndarray | None = None, y_val: np.ndarray | None = None
    ) -> GridSelectedProbe:
        y = np.asarray(y)
        # Multi-label targets are (N, K) 0/1 columns: one probability per label instead of a distribution.
        self.multilabel_ = y.ndim == 2
        self.classes_ = np.arange(y.shape[1]) if self.multilabel_ else np.unique(y)
        self.n_classes_ = y.shape[1] if self.multilabel_ else self.n_classes or int(self.classes_.max() + 1)
        grid = self._grid()
        self.val_scores_: dict[float, float] = {}
        if X_val is None or y_val is None or len(np.unique(y_val)) < 2:
            self.selected_ = grid[len(grid) // 2]
            self.model_ = self._fit_one(self.selected_, X, y)
            return self
        models = {}
        for value in grid:
            models[value] = self._fit_one(value, X, y)
            self.val_scores_[value] = auroc(y_val, self._full_proba(models[value], X_val))
        # Ties go to the simpler (more strongly regularised) model.
        self.selected_ = max(grid, key=lambda v: (np.nan_to_num(self.val_scores_[v], nan=-1.0), self._simplicity(v)))
        self.model_ = models[self.selected_]
        return self

    def _full_proba(self, model: Pipeline, X: np.ndarray) -> np.ndarray:
        if self.multilabel_:
            return np.asarray(model.predict_proba(X), dtype=np.float64)
        return expand_proba(model.predict_proba(X), model.classes_, self.n_classes_)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return self._full_proba(self.model_, X)

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.predict_proba(X).argmax(axis=1)

    @property
    def trainable_parameters_(self) -> int:
        """Weights and biases the selected model fitted (the scaler's statistics are not counted)."""
        final = self.model_[-1]
        # A one-vs-rest wrapper (multi-label linear probe) holds one fitted model per label.
        arrays = []
        for model in getattr(final, "estimators_", [final]):
            arrays += [getattr(model, name) for name in ("coef_", "intercept_") if hasattr(model, name)]
            arrays += [array for name in ("coefs_", "intercepts_") for array in getattr(model, name, [])]
        return int(sum(np.size(array) for array in arrays))
