"""Task kinds: what a task's labels look like, which cells an encoder gets on it, and how a cell is scored.

The engine (``bench/engine.py``) knows nothing of labels or metrics: it asks the task's kind for the cells of each
encoder and of the baselines, and for a :class:`~medfoundry.evaluate.cells.Scorer`. A new kind (survival, say) is one
module with a :class:`TaskKind` subclass registered here by name, plus its adapters and metrics; the grid, the cell
store, resume, results.json and the report come with it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from medfoundry.registry import Registry

if TYPE_CHECKING:
    from medfoundry.bench.grid import Cell
    from medfoundry.bench.tasks import Task
    from medfoundry.config import EncoderConfig, EvaluateConfig, SuiteConfig, TaskConfig
    from medfoundry.evaluate.cells import Scorer
    from medfoundry.models.backbones import Encoder
    from medfoundry.models.features import Embeddings

Echo = Callable[[str], None]


class BenchTask(Protocol):
    """What the engine needs of any kind's task: its name, kind and metrics, and a fingerprint of its data."""

    @property
    def name(self) -> str: ...

    kind: str
    metrics: list[str]
    # Features (or a model) come with the task: no suite encoder runs on it.
    precomputed: bool

    def fingerprint(self) -> str: ...

    def metadata(self) -> dict[str, Any]: ...

    def describe(self) -> str: ...


T = TypeVar("T", bound=BenchTask)


@dataclass
class EngineContext:
    """What a task kind may use from the engine while it builds cells: the settings and the feature cache."""

    config: SuiteConfig
    echo: Echo
    embed: Callable[[str, Encoder, Task], dict[str, Embeddings]]
    durations: dict[str, float] = field(default_factory=dict)


class TaskKind(ABC, Generic[T]):
    """One kind of task, over its own task type ``T``. Registered in :data:`TASK_KINDS` under each name it serves."""

    name: str
    default_metrics: tuple[str, ...]

    @abstractmethod
    def load(self, config: TaskConfig) -> T:
        """Open the task's data and check it (labels, splits)."""

    @abstractmethod
    def encoder_cells(
        self, ctx: EngineContext, task: T, spec: EncoderConfig, encoder: Encoder | None
    ) -> Iterator[Cell]:
        """The cells of one encoder on this task (adapters x label fractions x seeds, via ``grid_cells``)."""

    def baseline_cells(self, ctx: EngineContext, task: T) -> Iterator[Cell]:
        """Cells that need no encoder (a network trained from scratch, say)."""
        return iter(())

    @abstractmethod
    def scorer(self, task: T, evaluate: EvaluateConfig) -> Scorer:
        """How a cell's output on this task's test split becomes metric values and a predictions file."""

    def comparisons(self, ctx: EngineContext, task: T, records: list[Any]) -> list[dict[str, Any]]:
        """Paired comparisons between the task's cells (none unless the kind defines them)."""
        return []

    def skipped_adapters(self, adapters: list[str]) -> list[str]:
        """Adapters of the suite that do not apply to this kind (said once per task)."""
        return []


# The classification kinds live in bench/classification.py; new kinds add their module here.
TASK_KINDS: Registry[TaskKind[Any]] = Registry(
    "task kind",
    modules=(
        "medfoundry.bench.classification",
        "medfoundry.bench.segmentation",
        "medfoundry.bench.mil",
        "medfoundry.bench.zeroshot",
        "medfoundry.bench.survival",
    ),
)


def kind_for(config: TaskConfig) -> TaskKind[Any]:
    """The declared kind, or classification, whose loader infers binary / multiclass / multilabel from the labels."""
    return TASK_KINDS.get(config.kind or "binary")
