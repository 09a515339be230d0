"""Linear probe: scikit-learn logistic regression on standardised features, C chosen by cross-validation."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsRestClassifier
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from medfoundry.adapt.registry import ADAPTERS
from medfoundry.adapt.selection import GridSelectedProbe, Selection

if TYPE_CHECKING:
    from medfoundry.adapt.registry import AdaptConfig

DEFAULT_C_GRID = tuple(10.0**e for e in range(-4, 5))


# lbfgs ignores random_state and the selection folds are fixed, so the fit depends on the data alone.
@ADAPTERS.register("linear", deterministic=True)
class LinearProbe(GridSelectedProbe):
    """Logistic regression whose inverse regularisation C is picked by AUROC on the selection data.

    ``selection="cv"``: out-of-fold AUROC inside the labelled subset; ``"val"``: AUROC on the validation split
    (see ``medfoundry.adapt.selection``). The grid reaches C=1e4 because on BreastMNIST the trial's probe always
    chose the top of a grid ending at 100 (shared/reference/cpu-ssl-trial.md). Without selection data the middle
    of the grid is used.
    """

    def __init__(
        self,
        c_grid: tuple[float, ...] = DEFAULT_C_GRID,
        max_iter: int = 3000,
        seed: int = 0,
        n_classes: int | None = None,
        selection: Selection = "cv",
        folds: int = 5,
    ) -> None:
        self.c_grid = c_grid
        self.selection = selection
        self.folds = folds
        self.n_classes = n_classes
        self.max_iter = max_iter
        self.seed = seed

    @classmethod
    def from_settings(cls, config: AdaptConfig, seed: int, n_classes: int) -> LinearProbe:
        return cls(
            c_grid=tuple(config.linear_c_grid),
            seed=seed,
            n_classes=n_classes,
            selection=config.selection,
            folds=config.selection_folds,
        )

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
