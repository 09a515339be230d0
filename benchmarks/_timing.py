"""Wall and CPU seconds of a benchmark side, and their ratios: the one timer the ratio benchmarks share.

On a shared machine wall-clock ratios swing with whatever else runs (0.50 to 1.18 on a loaded 2-core machine),
while CPU seconds (user + system, of this process and of its children: DataLoader workers, subprocesses) stay
within a few percent, so every ratio benchmark prints both. CPU seconds of children are counted once they have
exited and been waited for (``RUSAGE_CHILDREN``), which DataLoader workers are at the end of each pass; where a side
keeps workers alive across passes, its CPU seconds miss theirs. A CPU ratio is a cost ratio: a side that uses more
cores to finish sooner has a better wall ratio and a worse CPU one.

    from _timing import Timed, ratio_text, timed     # a benchmark script's folder is on sys.path
    with timed() as span:
        work()
    print(span.wall, span.cpu)
"""

from __future__ import annotations

import contextlib
import resource
import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

R = TypeVar("R")


def cpu_seconds() -> float:
    """User + system seconds of this process and of its waited-for children so far."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@dataclass
class Timed:
    """Wall-clock and CPU seconds of one run of a side (filled in when its ``timed`` block ends)."""

    wall: float = 0.0
    cpu: float = 0.0


@contextlib.contextmanager
def timed() -> Iterator[Timed]:
    span = Timed()
    wall, cpu = time.perf_counter(), cpu_seconds()
    try:
        yield span
    finally:
        span.wall, span.cpu = time.perf_counter() - wall, cpu_seconds() - cpu


def run_timed(function: Callable[[], R]) -> tuple[R, Timed]:
    with timed() as span:
        result = function()
    return result, span


def median(spans: Iterable[Timed]) -> Timed:
    """Median wall and median CPU seconds (each taken on its own)."""
    spans = list(spans)
    return Timed(statistics.median(s.wall for s in spans), statistics.median(s.cpu for s in spans))


def ratio(base: Iterable[Timed], side: Iterable[Timed]) -> Timed:
    """Speed ratios of ``side`` to ``base`` from medians, wall and CPU: base seconds / side seconds (above 1: the
    side takes less)."""
    b, s = median(base), median(side)
    return Timed(b.wall / max(s.wall, 1e-12), b.cpu / max(s.cpu, 1e-12))


def ratio_text(value: Timed) -> str:
    return f"wall {value.wall:.3f}, CPU {value.cpu:.3f}"


__all__ = ["Timed", "cpu_seconds", "median", "ratio", "ratio_text", "run_timed", "timed"]
