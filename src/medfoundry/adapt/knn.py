"""kNN on cosine similarity with temperature-weighted votes (the DINO evaluation protocol)."""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.neighbors import KNeighborsClassifier

from medfoundry.adapt.registry import ADAPTERS
from medfoundry.adapt.selection import Selection, choose_threshold, expand_proba

if TYPE_CHECKING:
    from medfoundry.adapt.registry import AdaptConfig

log = logging.getLogger("medfoundry.adapt")

# The DINO protocol's k; also the ceiling of the adaptive rule, reached from 420 training cases on.
MAX_K = 20
# (requested k, k used) pairs already logged: a suite fits the same budgets for every encoder and seed.
_LOGGED_REDUCTIONS: set[tuple[int | None, int]] = set()


def adaptive_k(n_train: int, k: int | None = None) -> int:
    """Neighbours for ``n_train`` cases: ``k`` when given (at most n_train), else round(sqrt(n)) in [1, MAX_K].

    A fixed k = 20 on a 36-case training set votes with more than half of it, so every test case gets nearly the
    class prior and balanced accuracy falls to chance; sqrt(n) is the classical consistent choice for kNN.
    """
    wanted = k if k is not None else min(MAX_K, max(1, round(math.sqrt(n_train))))
    used = max(1, min(wanted, n_train))
    if used < (k if k is not None else MAX_K) and (k, used) not in _LOGGED_REDUCTIONS:
        _LOGGED_REDUCTIONS.add((k, used))
        rule = f"knn_k={k} is more than the training set" if k is not None else "round(sqrt(n)), at most 20"
        log.info("kNN uses k=%d for %d training cases (%s)", used, n_train, rule)
    return used


# Brute-force neighbours and a fixed fold split: the same cases give the same votes whatever the seed.
@ADAPTERS.register("knn", deterministic=True)
class KNNProbe(ClassifierMixin, BaseEstimator):
    """scikit-learn's KNeighborsClassifier with cosine distance and weights exp(similarity / T).

    ``k=None`` adapts k to the training set (:func:`adaptive_k`); ``k_`` is the value used. A binary probe also
    picks ``threshold_`` on the positive vote share by Youden's J, on out-of-fold votes inside the training set
    (``selection="cv"``) or on the validation split (``"val"``); None when it cannot (see
    ``medfoundry.adapt.selection``).
    """

    def __init__(
        self,
        k: int | None = None,
        temperature: float = 0.07,
        n_classes: int | None = None,
        selection: Selection = "cv",
        folds: int = 5,
    ) -> None:
        self.k = k
        self.n_classes = n_classes
        self.temperature = temperature
        self.selection = selection
        self.folds = folds

    @classmethod
    def from_settings(cls, config: AdaptConfig, seed: int, n_classes: int) -> KNNProbe:
        return cls(
            k=config.knn_k,
            temperature=config.knn_temperature,
            n_classes=n_classes,
            selection=config.selection,
            folds=config.selection_folds,
        )

    def _weights(self, distances: np.ndarray) -> np.ndarray:
        # Cosine distance is 1 - similarity; subtracting the row maximum keeps exp() finite.
        logits = (1.0 - distances) / self.temperature
        return np.exp(logits - logits.max(axis=1, keepdims=True))

    def _neighbours(self, X: np.ndarray, y: np.ndarray, k: int) -> KNeighborsClassifier:
        return KNeighborsClassifier(
            n_neighbors=min(k, len(y)), metric="cosine", algorithm="brute", weights=self._weights
        ).fit(X, y)

    def fit(
        self, X: np.ndarray, y: np.ndarray, X_val: np.ndarray | None = None, y_val: np.ndarray | None = None
    ) -> KNNProbe:
        y = np.asarray(y)
        self.multilabel_ = y.ndim == 2
        self.classes_ = np.arange(y.shape[1]) if self.multilabel_ else np.unique(y)
        self.n_classes_ = y.shape[1] if self.multilabel_ else self.n_classes or int(self.classes_.max() + 1)
        self.k_ = adaptive_k(len(y), self.k)
        self.model_ = self._neighbours(X, y, self.k_)
        self.threshold_: float | None = None
        if not self.multilabel_ and self.n_classes_ == 2:

            def fit_predict(X_fit: np.ndarray, y_fit: np.ndarray, X_held: np.ndarray) -> np.ndarray:
                model = self._neighbours(X_fit, y_fit, self.k_)
                return expand_proba(model.predict_proba(X_held), model.classes_, self.n_classes_)

            self.threshold_ = choose_threshold(fit_predict, X, y, X_val, y_val, self.selection, self.folds)
        return self

    # The adaptation ladder's cost axis: this adapter stores the training features; nothing is fitted.
    trainable_parameters_: int = 0

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        if self.multilabel_:
            # One vote share per label: the weighted share of neighbours carrying it (0 when no training
            # example carried it, 1 when all did; sklearn then returns a single column for that label).
            per_label = self.model_.predict_proba(X)
            columns = [
                proba[:, list(classes).index(1)] if 1 in classes else np.zeros(len(X))
                for proba, classes in zip(per_label, self.model_.classes_, strict=True)
            ]
            return np.column_stack(columns).astype(np.float64)
        return expand_proba(self.model_.predict_proba(X), self.model_.classes_, self.n_classes_)

    def predict(self, X: np.ndarray) -> np.ndarray:
        # The arg-max; ``threshold_`` is applied where metrics are computed.
        return self.predict_proba(X).argmax(axis=1)
