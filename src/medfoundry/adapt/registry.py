"""Adapters by name; all share fit(X, y, X_val, y_val) / predict_proba(X)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from medfoundry.adapt.fewshot import PrototypeClassifier
from medfoundry.adapt.knn import KNNProbe
from medfoundry.adapt.linear import LinearProbe
from medfoundry.adapt.mlp import MLPProbe
from medfoundry.config import AdaptConfig
from medfoundry.errors import MedfoundryError

ADAPTERS: dict[str, Callable[[AdaptConfig, int, int], Any]] = {
    "linear": lambda cfg, seed, n: LinearProbe(c_grid=tuple(cfg.linear_c_grid), seed=seed, n_classes=n),
    "knn": lambda cfg, seed, n: KNNProbe(k=cfg.knn_k, temperature=cfg.knn_temperature, n_classes=n),
    # The experiment hands every labelled example of a label fraction over as the few-shot support set.
    "fewshot": lambda cfg, seed, n: PrototypeClassifier(temperature=cfg.fewshot_temperature, n_classes=n),
    "mlp": lambda cfg, seed, n: MLPProbe(
        hidden_dim=cfg.mlp_hidden_dim,
        alpha_grid=tuple(cfg.mlp_alpha_grid),
        max_iter=cfg.mlp_max_iter,
        seed=seed,
        n_classes=n,
    ),
}


def create_adapter(name: str, config: AdaptConfig, seed: int, n_classes: int) -> Any:
    if name not in ADAPTERS:
        raise MedfoundryError(f"unknown adapter '{name}'; known: {', '.join(sorted(ADAPTERS))}")
    return ADAPTERS[name](config, seed, n_classes)
