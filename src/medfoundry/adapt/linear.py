"""Linear probe: scikit-learn logistic regression on standardised features, C chosen on validation."""

from __future__ import annotations

from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsRestClassifier
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from medfoundry.adapt.selection import GridSelectedProbe

DEFAULT_C_GRID = tuple(10.0**e for e in range(-4, 5))


class LinearProbe(GridSelectedProbe):
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

    def _grid(self) -> list[float]:
        return list(self.c_grid)

    def _pipeline(self, value: float) -> Pipeline:
        model = LogisticRegression(C=value, max_iter=self.max_iter, random_state=self.seed)
        if getattr(self, "multilabel_", False):
            # LogisticRegression takes one label column; multi-label fits one binary model per label.
            return make_pipeline(StandardScaler(), OneVsRestClassifier(model))
        return make_pipeline(StandardScaler(), model)

    def _simplicity(self, value: float) -> float:
        return -value  # smaller C: stronger regularisation

    @property
    def C_(self) -> float:  # noqa: N802 - scikit-learn's name for the fitted C
        return self.selected_
