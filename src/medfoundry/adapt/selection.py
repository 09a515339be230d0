"""Choosing a probe's hyper-parameter and decision threshold without more labels than the label budget.

Two protocols (``AdaptConfig.selection``):

- ``"cv"`` (the default): stratified k-fold cross-validation inside the labelled subset, with
  ``k = min(folds, smallest class count)``. Each grid value is scored by the AUROC of its pooled out-of-fold
  probabilities; the winner is refitted on the whole subset. With a class of fewer than two cases there is no
  fold to score on, and the middle of the grid is used. The validation split is not looked at.
- ``"val"``: every grid value is fitted on the labelled subset and scored on the given validation split (the
  behaviour before issue 14). At 1% labels that split can be ten times the labelled budget, which flatters
  low-label results; kept for comparison with earlier numbers.

Binary adapters also choose a decision threshold on the same data (Youden's J on the out-of-fold or validation
probabilities): ``threshold_``, or None when there is none (multi-class, multi-label, no selection data, or no
threshold better than chance).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Literal

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import roc_curve
from sklearn.model_selection import KFold, StratifiedKFold
from sklearn.pipeline import Pipeline

from medfoundry.evaluate.metrics import auroc

Selection = Literal["cv", "val"]
Folds = list[tuple[np.ndarray, np.ndarray]]
# Fixed rather than the adapter's seed: the folds are part of the selection procedure, so an adapter that is
# otherwise deterministic (lbfgs logistic regression, kNN, prototypes) stays deterministic given its data.
_FOLD_SEED = 0


def expand_proba(proba: np.ndarray, classes: np.ndarray, n_classes: int) -> np.ndarray:
    """Probabilities over all ``n_classes`` labels, when a small training subset lacked some classes."""
    if proba.shape[1] == n_classes and np.array_equal(classes, np.arange(n_classes)):
        return proba
    full = np.zeros((proba.shape[0], n_classes), dtype=np.float64)
    full[:, classes.astype(int)] = proba
    return full


def cv_folds(y: np.ndarray, max_folds: int = 5) -> Folds:
    """(train, test) index pairs of k-fold CV inside a labelled subset, k = min(max_folds, smallest class count).

    Stratified for single-label targets, so every test fold holds every class present; multi-label (N, K) targets
    use plain shuffled folds with k bounded by the rarest label value. Empty when k < 2 (a class with one case, a
    single class): the caller then has nothing to select on.
    """
    y = np.asarray(y)
    if y.ndim == 2:
        positives = y.sum(axis=0)
        smallest = int(np.minimum(positives, len(y) - positives).min()) if y.size else 0
        n_folds = min(max_folds, smallest)
        if n_folds < 2:
            return []
        return list(KFold(n_folds, shuffle=True, random_state=_FOLD_SEED).split(y))
    _, counts = np.unique(y, return_counts=True)
    n_folds = min(max_folds, int(counts.min())) if len(counts) >= 2 else 0
    if n_folds < 2:
        return []
    splitter = StratifiedKFold(n_folds, shuffle=True, random_state=_FOLD_SEED)
    return list(splitter.split(np.zeros((len(y), 1)), y))


def out_of_fold_proba(
    fit_predict: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray],
    X: np.ndarray,
    y: np.ndarray,
    folds: Folds,
) -> np.ndarray:
    """Each case's probabilities from the model fitted on the other folds; ``fit_predict(X_fit, y_fit, X_held)``."""
    proba: np.ndarray | None = None
    for train, test in folds:
        held = fit_predict(X[train], y[train], X[test])
        if proba is None:
            proba = np.zeros((len(X), held.shape[1]), dtype=np.float64)
        proba[test] = held
    if proba is None:
        raise ValueError("out-of-fold probabilities need at least one fold")
    return proba


def youden_threshold(y: np.ndarray, positive_proba: np.ndarray) -> float | None:
    """The probability cut maximising Youden's J = sensitivity + specificity - 1; a case is positive if p >= cut.

    The cut lies half-way between the lowest score called positive and the next lower score, not on a case's own
    score, so a slightly different test case is not decided by a hair. Among equal J the highest cut (fewest
    positives) wins. None when ``y`` lacks a class or no cut does better than chance (J <= 0).
    """
    y = np.asarray(y)
    if y.ndim != 1 or len(np.unique(y)) < 2:
        return None
    fpr, tpr, cuts = roc_curve(y == 1, positive_proba, drop_intermediate=False)
    j = tpr - fpr
    best = int(np.argmax(j))
    if j[best] <= 0:
        return None
    scores = np.unique(positive_proba)  # ascending
    position = int(np.searchsorted(scores, cuts[best]))
    lower = scores[position - 1] if position > 0 else 0.0
    return float((cuts[best] + lower) / 2.0)


def choose_threshold(
    fit_predict: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray],
    X: np.ndarray,
    y: np.ndarray,
    X_val: np.ndarray | None,
    y_val: np.ndarray | None,
    selection: Selection,
    max_folds: int = 5,
) -> float | None:
    """A binary adapter's decision threshold by the protocol ``selection``, for adapters with nothing else to tune.

    ``fit_predict(X_fit, y_fit, X_held)`` fits a fresh copy of the adapter and returns (n, 2) probabilities.
    "cv": Youden's J on out-of-fold probabilities inside (X, y); "val": on the validation split. None when that
    data has no two classes to separate.
    """
    y = np.asarray(y)
    if selection == "cv":
        folds = cv_folds(y, max_folds)
        if not folds:
            return None
        return youden_threshold(y, out_of_fold_proba(fit_predict, np.asarray(X), y, folds)[:, 1])
    if selection != "val":
        raise ValueError(f"selection must be 'cv' or 'val', got {selection!r}")
    if X_val is None or y_val is None:
        return None
    return youden_threshold(np.asarray(y_val), fit_predict(np.asarray(X), y, np.asarray(X_val))[:, 1])


class GridSelectedProbe(ClassifierMixin, BaseEstimator):
    """Fits one pipeline per grid value and keeps the one with the best selection AUROC (see the module docstring).

    Subclasses give the grid (``_grid``), the pipeline for one value (``_pipeline``) and which of two tied values
    is the simpler model (``_simplicity``: larger is simpler), and set ``selection`` and ``folds``. Without
    selection data (or with one class in it) the middle of the grid is used. After ``fit``: ``selected_`` is the
    chosen value; ``selection_`` how it was chosen ("cv", "val" or "default"); ``cv_scores_`` / ``val_scores_``
    the out-of-fold / validation AUROC of each grid value (empty for the protocol not used); ``threshold_`` the
    binary decision threshold on the positive class's probability, or None.
    """

    n_classes: int | None
    selection: Selection
    folds: int

    def _grid(self) -> list[float]:
        raise NotImplementedError

    def _pipeline(self, value: float) -> Pipeline:
        raise NotImplementedError

    def _simplicity(self, value: float) -> float:
        raise NotImplementedError

    def _fit_one(self, value: float, X: np.ndarray, y: np.ndarray) -> Pipeline:
        # Small separable label subsets can stop lbfgs at max_iter; a grid value is judged by its selection
        # score, so an iteration budget reached is not reported as a warning. A multi-label training fold may
        # lack a label's positives: one-vs-rest then predicts a constant for it, which is what we want scored.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            warnings.filterwarnings("ignore", message="Label .* is present in all training examples")
            return self._pipeline(value).fit(X, y)

    def _best(self, scores: dict[float, float]) -> float:
        # Ties go to the simpler (more strongly regularised) model.
        return max(scores, key=lambda v: (np.nan_to_num(scores[v], nan=-1.0), self._simplicity(v)))

    def _threshold(self, y: np.ndarray, proba: np.ndarray) -> float | None:
        if self.multilabel_ or self.n_classes_ != 2:
            return None
        return youden_threshold(y, proba[:, 1])

    def fit(
        self, X: np.ndarray, y: np.ndarray, X_val: np.ndarray | None = None, y_val: np.ndarray | None = None
    ) -> GridSelectedProbe:
        X = np.asarray(X)
        y = np.asarray(y)
        # Multi-label targets are (N, K) 0/1 columns: one probability per label instead of a distribution.
        self.multilabel_ = y.ndim == 2
        self.classes_ = np.arange(y.shape[1]) if self.multilabel_ else np.unique(y)
        self.n_classes_ = y.shape[1] if self.multilabel_ else self.n_classes or int(self.classes_.max() + 1)
        grid = self._grid()
        self.val_scores_: dict[float, float] = {}
        self.cv_scores_: dict[float, float] = {}
        self.threshold_: float | None = None
        if self.selection == "cv":
            return self._fit_cv(grid, X, y)
        if self.selection != "val":
            raise ValueError(f"selection must be 'cv' or 'val', got {self.selection!r}")
        if X_val is None or y_val is None or len(np.unique(y_val)) < 2:
            return self._fit_default(grid, X, y)
        models = {}
        for value in grid:
            models[value] = self._fit_one(value, X, y)
            self.val_scores_[value] = auroc(np.asarray(y_val), self._full_proba(models[value], X_val))
        self.selected_ = self._best(self.val_scores_)
        self.selection_ = "val"
        self.model_ = models[self.selected_]
        self.threshold_ = self._threshold(np.asarray(y_val), self._full_proba(self.model_, X_val))
        return self

    def _fit_default(self, grid: list[float], X: np.ndarray, y: np.ndarray) -> GridSelectedProbe:
        self.selected_ = grid[len(grid) // 2]
        self.selection_ = "default"
        self.model_ = self._fit_one(self.selected_, X, y)
        return self

    def _fit_cv(self, grid: list[float], X: np.ndarray, y: np.ndarray) -> GridSelectedProbe:
        folds = cv_folds(y, self.folds)
        binary = not self.multilabel_ and self.n_classes_ == 2
        # One grid value and no threshold to choose: nothing to cross-validate.
        if not folds or (len(grid) == 1 and not binary):
            return self._fit_default(grid, X, y)
        oof = {}
        for value in grid:
            oof[value] = out_of_fold_proba(
                lambda a, b, c, v=value: self._full_proba(self._fit_one(v, a, b), c), X, y, folds
            )
            self.cv_scores_[value] = auroc(y, oof[value])
        self.selected_ = self._best(self.cv_scores_)
        self.selection_ = "cv"
        self.model_ = self._fit_one(self.selected_, X, y)
        self.threshold_ = self._threshold(y, oof[self.selected_])
        return self

    def _full_proba(self, model: Pipeline, X: np.ndarray) -> np.ndarray:
        if self.multilabel_:
            return np.asarray(model.predict_proba(X), dtype=np.float64)
        return expand_proba(model.predict_proba(X), model.classes_, self.n_classes_)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return self._full_proba(self.model_, X)

    def predict(self, X: np.ndarray) -> np.ndarray:
        # The arg-max, as scikit-learn's classifiers; ``threshold_`` is applied where metrics are computed.
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
