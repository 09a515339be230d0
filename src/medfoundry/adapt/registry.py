"""Adapters by name; all share fit(X, y, X_val, y_val) / predict_proba(X)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from medfoundry.adapt.knn import KNNProbe
from medfoundry.adapt.linear import LinearProbe
from medfoundry.config import AdaptConfig
from medfoundry.errors import MedfoundryError

ADAPTERS: dict[str, Callable[[AdaptConfig, int, int], Any]] = {
    "linear": lambda cfg, seed, n: LinearProbe(c_grid=tuple(cfg.linear_c_grid), seed=seed, n_classes=n),
    "knn": lambda cfg, seed, n: KNNProbe(k=cfg.knn_k, temperature=cfg.knn_temperature, n_classes=n),
}


def create_adapter(name: str, config: AdaptConfig, seed: int, n_classes: int) -> Any:
    if name not in ADAPTERS:
        raise MedfoundryError(f"unknown adapter '{name}'; known: {', '.join(sorted(ADAPTERS))}")
    return ADAPTERS[name](config, seed, n_classes)
