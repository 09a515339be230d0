"""Adapters on frozen features by name; all share ``fit(X, y, X_val, y_val)`` / ``predict_proba(X)``.

An adapter is one file: a class with scikit-learn's ``fit`` / ``predict_proba`` and a ``from_settings(config,
seed, n_classes)`` classmethod that reads its fields of :class:`AdaptConfig`, decorated with
``@ADAPTERS.register("name")``; its module goes in ``ADAPTERS``'s modules, imported on the first lookup.

Registration metadata: ``deterministic=True`` declares that the fitted adapter depends only on its training data
(features and labels), never on the seed, so the engine runs it once where the seeds would all see the same
labelled cases (100% labels) instead of reporting identical runs as several.
"""

from __future__ import annotations

from typing import Any, Literal, Protocol

from pydantic import Field, field_validator

from medfoundry.registry import Registry
from medfoundry.settings import StrictModel


class AdapterClass(Protocol):
    """What the registry holds: a class that builds an adapter from the suite's settings."""

    def from_settings(self, config: AdaptConfig, seed: int, n_classes: int) -> Any: ...


ADAPTERS: Registry[AdapterClass] = Registry(
    "adapter", modules=tuple(f"medfoundry.adapt.{name}" for name in ("linear", "knn", "fewshot", "mlp"))
)


class AdaptConfig(StrictModel):
    """Settings of the adapters on frozen features, and of the label budgets they are fitted on.

    Protocol (issue 14): with ``selection="cv"`` (default) every hyper-parameter and decision threshold is chosen
    inside the labelled subset, never on more labels than the budget: the linear probe's C and the MLP's alpha by
    stratified ``selection_folds``-fold cross-validation (folds = min(selection_folds, smallest class count);
    with a class of fewer than 2 cases the middle of the grid, C = 1 / alpha = 1 by default); binary adapters
    (linear, MLP, kNN, few-shot) pick ``threshold_`` by Youden's J on the out-of-fold probabilities (None when a
    class has fewer than 2 cases or no cut beats chance; then the arg-max decides). ``selection="val"`` is the
    earlier protocol: grid values and thresholds are chosen on the whole validation split whatever the label
    fraction. ``knn_k=None`` lets k follow the training
    set: round(sqrt(n)) clipped to [1, 20].
    """

    adapters: list[str] = Field(["linear", "knn"], description="registered adapters (medfoundry.adapt.registry)")
    label_fractions: list[float] = [0.01, 0.1, 1.0]
    seeds: list[int] = [0, 1, 2]
    min_per_class: int = 2
    selection: Literal["cv", "val"] = Field(
        "cv", description="cv: choose hyper-parameters and thresholds inside the labelled subset; val: on val split"
    )
    selection_folds: int = Field(5, ge=2, description="most cross-validation folds for selection='cv'")
    knn_k: int | None = Field(None, ge=1, description="neighbours; None: round(sqrt(n_train)) clipped to [1, 20]")
    knn_temperature: float = 0.07
    linear_c_grid: list[float] = Field(default_factory=lambda: [10.0**e for e in range(-4, 5)])
    fewshot_temperature: float = Field(0.1, gt=0, description="softmax temperature on squared CL2N distances")
    mlp_hidden_dim: int = Field(256, ge=1)
    mlp_alpha_grid: list[float] = Field(default_factory=lambda: [1e-4, 1e-2, 1.0, 10.0], description="L2 strengths")
    mlp_max_iter: int = Field(200, ge=1, description="L-BFGS iterations per fit")

    @field_validator("adapters")
    @classmethod
    def _registered(cls, names: list[str]) -> list[str]:
        for name in names:
            ADAPTERS.get(name)  # an UnknownNameError is a ValueError: reported as this field's error
        return names


def create_adapter(name: str, config: AdaptConfig, seed: int, n_classes: int) -> Any:
    """A new, unfitted adapter ``name`` with its settings from ``config``."""
    return ADAPTERS.get(name).from_settings(config, seed, n_classes)
