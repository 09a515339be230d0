"""Per-step schedules as arrays (as DINOv2 does), built from lightly's schedule functions."""

from __future__ import annotations

import numpy as np
from lightly.utils.scheduler import cosine_schedule, cosine_warmup_schedule

from medfoundry.config import PretrainConfig
from medfoundry.ssl.base import StepValues


class Schedules:
    def __init__(self, config: PretrainConfig, steps_per_epoch: int) -> None:
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = config.epochs * steps_per_epoch
        total, warmup = (
            self.total_steps,
            min(config.warmup_epochs * steps_per_epoch, max(self.total_steps - 1, 0)),
        )
        peak_lr = config.lr
        self.lr = np.array(
            [cosine_warmup_schedule(s, total, peak_lr, config.min_lr, warmup, 0.0) for s in range(total)]
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
        if hasattr(method, "warmup_teacher_temp"):
            temp_warmup = min(method.warmup_teacher_temp_epochs * steps_per_epoch, total)
            self.teacher_temp[:temp_warmup] = np.linspace(method.warmup_teacher_temp, teacher_temp, temp_warmup)

    def at(self, step: int) -> StepValues:
        return StepValues(
            step=step,
            epoch=step // self.steps_per_epoch,
            lr=float(self.lr[step]),
            weight_decay=float(self.weight_decay[step]),
            momentum=float(self.momentum[step]),
            teacher_temp=float(self.teacher_temp[step]),
        )
