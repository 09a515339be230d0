"""What the task kinds' own task and scorer types share (slide-mil, segmentation, survival).

Kept apart from ``bench/tasks.py``, which imports ``medfoundry.config`` at import time: ``config.py`` imports the
survival kind while it builds its own defaults, so the survival kind may only import modules that need the config
for annotations alone, as this one does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

if TYPE_CHECKING:
    from medfoundry.config import EvaluateConfig, TaskConfig


class ConfiguredTask:
    """What the kinds' own task types share (slide-mil, segmentation, survival): named by their ``config``, scored
    by their ``metrics`` (headline first). The dataclasses that inherit this declare both as their own fields."""

    config: TaskConfig
    metrics: list[str]

    @property
    def name(self) -> str:
        return self.config.name


TaskT = TypeVar("TaskT", bound=ConfiguredTask)


@dataclass
class KindScorer(Generic[TaskT]):
    """What the kinds' own scorers share: their task and the evaluation settings; the metrics are the task's.
    A subclass adds ``n_test`` (test cases, or bootstrap units), ``score`` and ``save_predictions``."""

    task: TaskT
    evaluate: EvaluateConfig

    @property
    def metrics(self) -> list[str]:
        return self.task.metrics
