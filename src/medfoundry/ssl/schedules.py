"""Per-step schedules as arrays (as DINOv2 does), built from lightly's schedule functions.

Every warm-up is a fraction of the run (``warmup_fraction``, ``dino.warmup_teacher_temp_fraction``,
``dino.freeze_last_layer_fraction``), so a 5-minute and a 5-hour run both warm up for the same share of their
steps and both reach the target teacher temperature. The cosine decays of the learning rate, the weight decay and
the EMA momentum span the whole run. The older epoch-valued fields (``warmup_epochs``, ``warmup_teacher_temp_epochs``,
``freeze_last_layer_epochs``) are still read with their old meaning, N epochs' worth of steps, capped at the run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from lightly.utils.scheduler import cosine_schedule, cosine_warmup_schedule

from medfoundry.errors import MedfoundryError
from medfoundry.ssl.base import StepValues

if TYPE_CHECKING:
    from medfoundry.config import PretrainConfig


def budget_steps(config: PretrainConfig, steps_per_epoch: int) -> int | None:
    """The step count an epochs or steps budget gives; None for a minutes budget (the trainer estimates it)."""
    if config.max_steps is not None:
        return config.max_steps
    if config.epochs is not None:
        return config.epochs * steps_per_epoch
    return None


def span_steps(fraction: float, epochs: int | None, steps_per_epoch: int, total: int) -> int:
    """Steps of a warm-up given as a fraction of ``total``, or (older recipes) as a whole number of epochs."""
    steps = epochs * steps_per_epoch if epochs is not None else round(fraction * total)
    return max(0, min(steps, total))


class Schedules:
    def __init__(self, config: PretrainConfig, steps_per_epoch: int, total_steps: int | None = None) -> None:
        self.steps_per_epoch = steps_per_epoch
        total = total_steps if total_steps is not None else budget_steps(config, steps_per_epoch)
        if total is None:
            raise MedfoundryError(
                "a minutes budget (pretrain.max_minutes) needs the step count the trainer estimates; "
                "this trainer takes pretrain.epochs or pretrain.max_steps"
            )
        self.total_steps = total
        # One step short of the run at most, so the cosine still ends at min_lr.
        warmup = min(
            span_steps(config.warmup_fraction, config.warmup_epochs, steps_per_epoch, total), max(total - 1, 0)
        )
        self.warmup_steps = warmup
        self.lr = np.array(
            [cosine_warmup_schedule(s, total, config.lr, config.min_lr, warmup, 0.0) for s in range(total)]
        )
        self.weight_decay = np.array(
            [cosine_schedule(s, total, config.weight_decay, config.weight_decay_end) for s in range(total)]
        )
        # Each method's own config section may carry an EMA momentum and a teacher temperature schedule.
        method = getattr(config, config.method, None)
        start, end = getattr(method, "momentum_start", 1.0), getattr(method, "momentum_end", 1.0)
        self.momentum = np.array([cosine_schedule(s, total, start, end) for s in range(total)])
        teacher_temp = getattr(method, "teacher_temp", 1.0)
        self.teacher_temp = np.full(total, teacher_temp)
        self.teacher_warmup_steps = 0
        if hasattr(method, "warmup_teacher_temp"):
            temp_warmup = span_steps(
                method.warmup_teacher_temp_fraction, method.warmup_teacher_temp_epochs, steps_per_epoch, total
            )
            self.teacher_temp[:temp_warmup] = np.linspace(method.warmup_teacher_temp, teacher_temp, temp_warmup)
            self.teacher_warmup_steps = temp_warmup
        self.freeze_last_layer_steps = 0
        if hasattr(method, "freeze_last_layer_fraction"):
            self.freeze_last_layer_steps = span_steps(
                method.freeze_last_layer_fraction, method.freeze_last_layer_epochs, steps_per_epoch, total
            )

    def at(self, step: int) -> StepValues:
        return StepValues(
            step=step,
            epoch=step // max(self.steps_per_epoch, 1),
            lr=float(self.lr[step]),
            weight_decay=float(self.weight_decay[step]),
            momentum=float(self.momentum[step]),
            teacher_temp=float(self.teacher_temp[step]),
            freeze_last_layer=step < self.freeze_last_layer_steps,
        )
