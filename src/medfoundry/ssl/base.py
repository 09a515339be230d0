"""The interface every SSL method implements, and the method registry.

A method is one file: an :class:`SSLMethod` subclass decorated with ``@register_method("name")`` and, beside it,
its settings class (a ``StrictModel``) which ``PretrainConfig`` holds under the same name. Its module is listed in
``SSL_METHODS``'s modules, which the registry imports on the first lookup.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image
from torch import nn

from medfoundry.models.backbones import Encoder
from medfoundry.registry import Registry
from medfoundry.ssl.views import build_two_views
from medfoundry.ssl.views3d import volume_views_for

if TYPE_CHECKING:
    from medfoundry.config import PretrainConfig


@dataclass(frozen=True)
class StepValues:
    """Scheduled values for one optimisation step."""

    step: int
    epoch: int
    lr: float
    weight_decay: float
    momentum: float
    teacher_temp: float
    # DINO and iBOT keep the last layer of their heads fixed at the start (a fraction of the run).
    freeze_last_layer: bool = False


@dataclass
class StepOutput:
    loss: torch.Tensor
    logs: dict[str, float]
    monitor_features: torch.Tensor
    monitor_extra: dict[str, float]


class SSLMethod(nn.Module, ABC):
    """One SSL method: a loss over views, plus what happens around the optimiser step."""

    name: str = ""
    # Whether a low spread of the monitored features means collapse (see ssl/monitor.py); the rank is always checked.
    spread_signals_collapse: bool = True

    def build_views(self, encoder: Encoder, config: PretrainConfig) -> Callable[[Image.Image], list[torch.Tensor]]:
        """The transform that turns one PIL image (or (C,D,H,W) volume) into this method's views (two by default)."""
        if encoder.is_3d:
            return volume_views_for(encoder, config)
        mean, std = encoder.mean.flatten().tolist(), encoder.std.flatten().tolist()
        return build_two_views(config.views, encoder.in_chans, mean, std)

    @abstractmethod
    def training_step(self, views: list[torch.Tensor], values: StepValues) -> StepOutput: ...

    def before_optimizer_step(self, values: StepValues) -> None:
        """Called after backward, before clipping and the optimiser step."""

    def after_optimizer_step(self, values: StepValues) -> None:
        """Called after the optimiser step (EMA teachers update here)."""

    @abstractmethod
    def trainable_modules(self) -> list[nn.Module]: ...

    @abstractmethod
    def export_encoder(self) -> Encoder:
        """The encoder to keep after pre-training."""


# The modules whose SSLMethod subclasses register themselves; imported on the first lookup (no import circle).
SSL_METHODS: Registry[type[SSLMethod]] = Registry(
    "SSL method",
    modules=tuple(f"medfoundry.ssl.{name}" for name in ("dino", "ibot", "simclr", "mocov3", "byol", "mae", "distill")),
)


def register_method(name: str, **metadata: Any) -> Callable[[type[SSLMethod]], type[SSLMethod]]:
    """Register an :class:`SSLMethod` subclass as ``name`` (its ``name`` attribute is set to match)."""

    def decorator(cls: type[SSLMethod]) -> type[SSLMethod]:
        cls.name = name
        return SSL_METHODS.register(name, **metadata)(cls)

    return decorator
