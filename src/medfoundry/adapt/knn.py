"""kNN on cosine similarity with temperature-weighted votes (the DINO evaluation protocol)."""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.neighbors import KNeighborsClassifier

from medfoundry.adapt.selection import expand_proba


class KNNProbe(ClassifierMixin, BaseEstimator):
    """scikit-learn's KNeighborsClassifier with cosine distance and weights exp(similarity / T)."""

    def __init__(self, k: int = 20, temperature: float = 0.07, n_classes: int | None = None) -> None:
        self.k = k
        self.n_classes = n_classes
        self.temperature = temperature

    def _weights(self, distances: np.ndarray) -> np.ndarray:
        # Cosine distance is 1 - similarity; subtracting the row maximum keeps exp() finite.
        logits = (1.0 - distances) / self.temperature
        return np.exp(logits - logits.max(axis=1, keepdims=True))

    def fit(
        self, X: np.ndarray, y: np.ndarray, X_val: np.ndarray | None = None, y_val: np.ndarray | None = None
    ) -> KNNProbe:
        y = np.asarray(y)
        self.multilabel_ = y.ndim == 2
        self.classes_ = np.arange(y.shape[1]) if self.multilabel_ else np.unique(y)
        self.n_classes_ = y.shape[1] if self.multilabel_ else self.n_classes or int(self.classes_.max() + 1)
        self.model_ = KNeighborsClassifier(
            n_neighbors=min(self.k, len(y)), metric="cosine", algorithm="brute", weights=self._weights
        ).fit(X, y)
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
        return self.predict_proba(X).argmax(axis=1)
