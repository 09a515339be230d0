"""Linear probe: scikit-learn logistic regression on standardised features, C chosen on validation."""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from medfoundry.evaluate.metrics import auroc

DEFAULT_C_GRID = tuple(10.0**e for e in range(-4, 5))


class LinearProbe(ClassifierMixin, BaseEstimator):
    """Logistic regression whose inverse regularisation C is picked by validation AUROC.

    The grid reaches C=1e4 because on BreastMNIST the trial's probe always chose the top of a grid ending at
    100 (shared/reference/cpu-ssl-trial.md). Without validation data the middle of the grid is used.
    """

    def __init__(
        self,
        c_grid: tuple[float, ...] = DEFAULT_C_GRID,
        max_iter: int = 3000,
        seed: int = 0,
        n_classes: int | None = None,
    ) -> None:
        self.c_grid = c_grid
        self.n_classes = n_classes
        self.max_iter = max_iter
        self.seed = seed

    def _make(self, c: float) -> Pipeline:
        return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=self.max_iter, random_state=self.seed))

    def _fit_quietly(self, c: float, X: np.ndarray, y: np.ndarray) -> Pipeline:
        # At large C on small separable subsets lbfgs stops at max_iter; C is chosen on validation AUROC, so
        # a grid point that did not fully converge is judged by its result, not reported as a warning.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            return self._make(c).fit(X, y)

    def fit(
        self, X: np.ndarray, y: np.ndarray, X_val: np.ndarray | None = None, y_val: np.ndarray | None = None
    ) -> LinearProbe:
        self.classes_ = np.unique(y)
        self.n_classes_ = self.n_classes or int(self.classes_.max() + 1)
        grid = list(self.c_grid)
        if X_val is None or y_val is None or len(np.unique(y_val)) < 2:
            self.C_ = grid[len(grid) // 2]
            self.val_scores_: dict[float, float] = {}
        else:
            scores = {}
            for c in grid:
                model = self._fit_quietly(c, X, y)
                scores[c] = auroc(y_val, self._full_proba(model, X_val))
            self.val_scores_ = scores
            # Ties go to the stronger regularisation (smaller C): the simpler model.
            self.C_ = max(grid, key=lambda c: (np.nan_to_num(scores[c], nan=-1.0), -c))
        self.model_ = self._fit_quietly(self.C_, X, y)
        return self

    def _full_proba(self, model: Pipeline, X: np.ndarray) -> np.ndarray:
        return expand_proba(model.predict_proba(X), model.classes_, self.n_classes_)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return self._full_proba(self.model_, X)

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.predict_proba(X).argmax(axis=1)


def expand_proba(proba: np.ndarray, classes: np.ndarray, n_classes: int) -> np.ndarray:
    """Probabilities over all ``n_classes`` labels, when a small training subset lacked some classes."""
    if proba.shape[1] == n_classes and np.array_equal(classes, np.arange(n_classes)):
        return proba
    full = np.zeros((proba.shape[0], n_classes), dtype=np.float64)
    full[:, classes.astype(int)] = proba
    return full
