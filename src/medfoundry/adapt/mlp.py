"""MLP probe: a one-hidden-layer scikit-learn MLP on standardised frozen features, L2 strength chosen by CV."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from medfoundry.adapt.registry import ADAPTERS
from medfoundry.adapt.selection import GridSelectedProbe, Selection

if TYPE_CHECKING:
    from medfoundry.adapt.registry import AdaptConfig

DEFAULT_ALPHA_GRID = (1e-4, 1e-2, 1.0, 10.0)


# The seed draws the initial weights, so two seeds give two different networks on the same cases.
@ADAPTERS.register("mlp", deterministic=False)
class MLPProbe(GridSelectedProbe):
    """One hidden ReLU layer trained full-batch with L-BFGS; the L2 penalty alpha is picked by selection AUROC.

    scikit-learn's ``early_stopping`` holds out its own random share of the training labels; with label fractions
    of a few examples per class that leaves too little to train on (or a held-out share missing a class). So,
    like LinearProbe, the model is regularised instead of stopped early, and the strength is chosen by
    stratified cross-validation inside the labelled subset (``selection="cv"``) or on the validation split
    (``"val"``; see ``medfoundry.adapt.selection``). L-BFGS rather than Adam: the label subsets are at most a few
    thousand samples, where full-batch L-BFGS needs no learning rate or batch size, and for a fixed seed it is
    deterministic. Without selection data the middle of the grid is used.
    """

    def __init__(
        self,
        hidden_dim: int = 256,
        alpha_grid: tuple[float, ...] = DEFAULT_ALPHA_GRID,
        max_iter: int = 200,
        seed: int = 0,
        n_classes: int | None = None,
        selection: Selection = "cv",
        folds: int = 5,
    ) -> None:
        self.selection = selection
        self.folds = folds
        self.hidden_dim = hidden_dim
        self.alpha_grid = alpha_grid
        self.max_iter = max_iter
        self.seed = seed
        self.n_classes = n_classes

    @classmethod
    def from_settings(cls, config: AdaptConfig, seed: int, n_classes: int) -> MLPProbe:
        return cls(
            hidden_dim=config.mlp_hidden_dim,
            alpha_grid=tuple(config.mlp_alpha_grid),
            max_iter=config.mlp_max_iter,
            seed=seed,
            n_classes=n_classes,
            selection=config.selection,
            folds=config.selection_folds,
        )

    def _grid(self) -> list[float]:
        return list(self.alpha_grid)

    def _pipeline(self, value: float) -> Pipeline:
        mlp = MLPClassifier(
            hidden_layer_sizes=(self.hidden_dim,),
            alpha=value,
            solver="lbfgs",
            max_iter=self.max_iter,
            random_state=self.seed,
        )
        return make_pipeline(StandardScaler(), mlp)

    def _fit_one(self, value: float, X: np.ndarray, y: np.ndarray) -> Pipeline:
        # One BLAS thread: these matrices are small, and on a 2-core machine OpenBLAS threads made each L-BFGS fit
        # 3.5x slower (BreastMNIST, 546 x 384 features: 23 s for the grid with 2 threads, 6.6 s with 1).
        with threadpool_limits(limits=1, user_api="blas"):
            return super()._fit_one(value, X, y)

    def _simplicity(self, value: float) -> float:
        return value  # larger alpha: stronger regularisation

    @property
    def alpha_(self) -> float:
        return self.selected_
