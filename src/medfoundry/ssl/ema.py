"""EMA teachers (DINO, iBOT, BYOL, MoCo v3): a frozen copy of the student updated by lightly's update_momentum."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import TypeVar

from lightly.models.utils import deactivate_requires_grad, update_momentum
from torch import nn

M = TypeVar("M", bound=nn.Module)


def frozen_copy(module: M) -> M:
    """A deep copy of ``module`` that the optimiser never updates (its parameters need no gradients)."""
    twin = copy.deepcopy(module)
    deactivate_requires_grad(twin)
    return twin


def update_teachers(pairs: Sequence[tuple[nn.Module, nn.Module]], momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, for each (student, teacher) pair."""
    for student, teacher in pairs:
        update_momentum(student, teacher, m=momentum)
