"""What a report section is given: the results file and what is derived from it once for every section.

Deriving rows, colours and comparisons once keeps a model's colour and an adapter's marker the same in every
plot and table, whichever section draws them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from markupsafe import Markup

from medfoundry.evaluate.results import ResultsFile
from medfoundry.report.comparisons import Comparison, comparisons_from_metadata
from medfoundry.report.plots import series_styles
from medfoundry.report.summary import Row, primary_metric, summarise_table, table_metrics


@dataclass(frozen=True)
class ReportContext:
    """The whole report: ``results`` plus its seed-aggregated rows, plot styles and paired comparisons."""

    results: ResultsFile
    title: str
    rows: list[Row]
    colours: dict[str, str]
    styles: dict[str, tuple[Any, str]]
    comparisons: list[Comparison]

    @classmethod
    def build(cls, results: ResultsFile, title: str) -> ReportContext:
        rows = summarise_table(results)
        colours, styles = series_styles(rows)
        return cls(results, title, rows, colours, styles, comparisons_from_metadata(results.metadata))

    @property
    def tasks(self) -> list[str]:
        return sorted({r["task"] for r in self.rows})

    def for_task(self, task: str) -> TaskContext:
        return TaskContext(self, task)


@dataclass(frozen=True)
class TaskContext:
    """One task of the report: its rows, its metrics and its headline metric."""

    report: ReportContext
    task: str

    @cached_property
    def rows(self) -> list[Row]:
        return [r for r in self.report.rows if r["task"] == self.task]

    @cached_property
    def metrics(self) -> list[str]:
        """Metrics this task has records of, in report order (the rows carry a column for every metric of the file)."""
        present = {r.metric for r in self.report.results.records if r.task == self.task}
        return [m for m in table_metrics(self.rows) if m in present]

    @cached_property
    def headline(self) -> str | None:
        return primary_metric(self.task, self.metrics, self.report.results.metadata)

    @cached_property
    def comparisons(self) -> list[Comparison]:
        return [c for c in self.report.comparisons if c.task == self.task]


# A section returns its HTML fragment, or an empty string when it has nothing to show for this file.
Section = Callable[[ReportContext], Markup]
TaskSection = Callable[[TaskContext], Markup]
