"""The grid: one cell per (model, adapter, label fraction, seed), on the same label subsets for every model.

This is the only place that loops over adapters x label fractions x seeds; every task kind builds its cells here,
so a new kind or adapter gets label budgets, seeds and resumable cells without writing the loop again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from itertools import product
from typing import Any

import numpy as np

from medfoundry.data.splits import label_fraction_indices
from medfoundry.evaluate.cells import CellKey, CellOutput

# fit(adapter, train_subset, seed) -> test predictions and cost
Fit = Callable[[str, np.ndarray, int], CellOutput]


@dataclass(frozen=True)
class Cell:
    """One unit of work: its key, what its result depends on (besides the task's data), and how to compute it."""

    key: CellKey
    inputs: list[Any]
    compute: Callable[[], CellOutput]


@dataclass(frozen=True)
class LabelBudgets:
    """The label fractions and seeds every model is evaluated at, and the rule that draws each subset."""

    fractions: list[float]
    seeds: list[int]
    min_per_class: int

    def seeds_for(self, fraction: float, deterministic: bool) -> list[int]:
        """The seeds a cell runs at: all of them, except where none could change the result.

        At 100% labels every seed draws the same cases, so an adapter whose fit depends on nothing else (a
        deterministic solver, a nearest-neighbour vote) would give identical runs: it runs once and is reported as
        one run, not as several runs with a spread of zero.
        """
        return self.seeds[:1] if deterministic and fraction >= 1.0 else list(self.seeds)

    def subset(self, labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
        if fraction == 0:  # zero-shot: no label is used
            return np.zeros(0, dtype=np.int64)
        # Nested per seed: a smaller fraction's cases are among a larger one's (learning curves compare like with
        # like), and every model of a task sees exactly the same cases for the same (fraction, seed).
        return label_fraction_indices(labels, fraction, seed, self.min_per_class)


def grid_cells(
    model: str,
    adapters: Iterable[str],
    budgets: LabelBudgets,
    train_labels: np.ndarray,
    inputs: list[Any],
    fit: Fit,
    fractions: list[float] | None = None,
    deterministic: Callable[[str], bool] = lambda adapter: False,
) -> Iterator[Cell]:
    """The cells of ``model``: every adapter at every label fraction (``fractions`` narrows them) and seed
    (one seed at 100% labels for adapters that ``deterministic`` says cannot vary with it)."""
    for adapter, fraction in product(adapters, fractions or budgets.fractions):
        for seed in budgets.seeds_for(fraction, deterministic(adapter)):
            subset = budgets.subset(train_labels, fraction, seed)
            yield Cell(CellKey(model, adapter, fraction, seed), inputs, partial(fit, adapter, subset, seed))
