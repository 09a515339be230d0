"""Few-shot prototypes (SimpleShot, Wang et al. 2019) and seeded k-shot support sets."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin

from medfoundry.adapt.registry import ADAPTERS
from medfoundry.adapt.selection import Selection, choose_threshold, expand_proba
from medfoundry.errors import DataError

if TYPE_CHECKING:
    from medfoundry.adapt.registry import AdaptConfig

# Norms below this are treated as zero: a feature equal to the support mean has no direction.
_EPS = 1e-12


def sample_shots(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Sorted indices of a support set with exactly ``k`` examples of every class present in ``labels``.

    Each class is shuffled once per seed and its first ``k`` members are taken, so for one seed the 1-shot
    set is inside the 5-shot set (as ``label_fraction_indices`` nests label fractions), while different
    seeds give different episodes. DataError naming the class when one has fewer than ``k`` examples.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise DataError(f"k-shot sampling needs one label per sample, got labels of shape {labels.shape}")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    classes, counts = np.unique(labels, return_counts=True)
    short = [(c, n) for c, n in zip(classes.tolist(), counts.tolist(), strict=True) if n < k]
    if short:
        per_class = ", ".join(f"{c}: {n}" for c, n in zip(classes.tolist(), counts.tolist(), strict=True))
        missing = ", ".join(f"class {c} has {n}" for c, n in short)
        raise DataError(f"{k}-shot support set needs {k} examples per class, but {missing} (per class: {per_class})")
    rng = np.random.default_rng(seed)
    chosen = [rng.permutation(np.flatnonzero(labels == c))[:k] for c in classes]
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def _l2_normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), _EPS)


# Class means of the given cases: no seed enters the fit.
@ADAPTERS.register("fewshot", deterministic=True)
class PrototypeClassifier(ClassifierMixin, BaseEstimator):
    """Nearest class mean on CL2N features: centred on the support mean, then L2-normalised.

    Probabilities are ``softmax(-||z - p_c||^2 / temperature)`` over the class prototypes ``p_c`` (the means of
    the normalised support features, not re-normalised). Negative squared distance rather than cosine
    similarity because its arg-max is exactly SimpleShot's nearest-centroid rule, and it is the prototypical
    networks' probability model; cosine to a re-normalised prototype would drop the prototype's norm, which
    is smaller for a spread-out class. SimpleShot centres on the mean of its base-class training set; there
    are no base classes here, so the mean of the support (training) features takes its place.

    The temperature only changes calibration and the multi-class AUROC ranking, never the predicted class;
    squared distances between unit vectors lie in [0, 4], so 0.1 gives clearly peaked but finite softmaxes.
    There is nothing to tune but, for a binary task, the decision threshold ``threshold_`` on the positive class's
    probability: Youden's J on out-of-fold probabilities inside the support set (``selection="cv"``) or on the
    validation split (``"val"``); None when it cannot be chosen (see ``medfoundry.adapt.selection``).
    """

    def __init__(
        self, temperature: float = 0.1, n_classes: int | None = None, selection: Selection = "cv", folds: int = 5
    ) -> None:
        self.temperature = temperature
        self.n_classes = n_classes
        self.selection = selection
        self.folds = folds

    @classmethod
    def from_settings(cls, config: AdaptConfig, seed: int, n_classes: int) -> PrototypeClassifier:
        # Every labelled example of a label fraction is handed over as the few-shot support set.
        return cls(
            temperature=config.fewshot_temperature,
            n_classes=n_classes,
            selection=config.selection,
            folds=config.selection_folds,
        )

    def fit(
        self, X: np.ndarray, y: np.ndarray, X_val: np.ndarray | None = None, y_val: np.ndarray | None = None
    ) -> PrototypeClassifier:
        X = np.asarray(X, dtype=np.float64)
        y = np.asarray(y)
        if len(X) == 0:
            raise DataError("few-shot prototypes need at least one support example")
        if y.ndim != 1:
            raise DataError(
                "few-shot prototypes need one class per example; multi-label targets have no class means "
                "(use the linear, mlp or knn adapter)"
            )
        self.classes_ = np.unique(y)
        self.n_classes_ = self.n_classes or int(self.classes_.max() + 1)
        self.mean_ = X.mean(axis=0)
        support = self.transform(X)
        self.prototypes_ = np.stack([support[y == c].mean(axis=0) for c in self.classes_])
        self.threshold_: float | None = None
        if self.n_classes_ == 2:

            def fit_predict(X_fit: np.ndarray, y_fit: np.ndarray, X_held: np.ndarray) -> np.ndarray:
                fold = PrototypeClassifier(self.temperature, self.n_classes_, selection="val")
                return fold.fit(X_fit, y_fit).predict_proba(X_held)

            self.threshold_ = choose_threshold(fit_predict, X, y, X_val, y_val, self.selection, self.folds)
        return self

    def transform(self, X: np.ndarray) -> np.ndarray:
        """CL2N features: centred on the support mean, then scaled to unit length."""
        return _l2_normalise(np.asarray(X, dtype=np.float64) - self.mean_)

    # The adaptation ladder's cost axis: this adapter averages features into class means; nothing is optimised.
    trainable_parameters_: int = 0

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        z = self.transform(X)
        # ||z - p||^2 = ||z||^2 - 2 z.p + ||p||^2; computed expanded to avoid an (N, C, D) array.
        sq_dist = (z**2).sum(axis=1, keepdims=True) - 2.0 * z @ self.prototypes_.T + (self.prototypes_**2).sum(axis=1)
        logits = -np.maximum(sq_dist, 0.0) / self.temperature
        logits -= logits.max(axis=1, keepdims=True)
        proba = np.exp(logits)
        proba /= proba.sum(axis=1, keepdims=True)
        return expand_proba(proba, self.classes_, self.n_classes_)

    def predict(self, X: np.ndarray) -> np.ndarray:
        # The arg-max; ``threshold_`` is applied where metrics are computed.
        return self.predict_proba(X).argmax(axis=1)
