"""A task's full table: every (label fraction, model, adapter) with every metric as mean ± sd and its CI."""

from __future__ import annotations

import math
from dataclasses import dataclass

from markupsafe import Markup

from medfoundry.evaluate.metrics import LOWER_IS_BETTER
from medfoundry.report.context import TaskContext
from medfoundry.report.summary import Row
from medfoundry.report.templating import render


@dataclass(frozen=True)
class MetricCell:
    """One metric of one row; ``shade`` is 1 for the best value of its label fraction and 0 for the worst."""

    value: float
    sd: float
    ci_low: float
    ci_high: float
    best: bool
    shade: float

    @property
    def has_sd(self) -> bool:
        return not math.isnan(self.sd)

    @property
    def has_ci(self) -> bool:
        return not (math.isnan(self.ci_low) or math.isnan(self.ci_high))

    @property
    def background(self) -> str:
        # Light-to-mid green ramp: the best cell of a group is the most saturated, text stays readable.
        return f"hsl(158, 48%, {97 - 19 * self.shade:.0f}%)"


def _cells(row: Row, metrics: list[str], group: list[Row]) -> list[MetricCell | None]:
    cells: list[MetricCell | None] = []
    for metric in metrics:
        value = row[metric]
        values = [r[metric] for r in group if not math.isnan(r[metric])]
        if math.isnan(value):
            cells.append(None)
            continue
        lo, hi = min(values), max(values)
        lower = metric in LOWER_IS_BETTER
        # Shade 1 for the best value whichever direction is better, so darker always means "better".
        shade = abs(value - (hi if lower else lo)) / (hi - lo) if hi > lo else 0.5
        cells.append(
            MetricCell(
                value=value,
                sd=row[f"{metric}_sd"],
                ci_low=row[f"{metric}_ci_low"],
                ci_high=row[f"{metric}_ci_high"],
                # A lone row is not "best" of anything.
                best=len(group) > 1 and value == (lo if lower else hi),
                shade=shade,
            )
        )
    return cells


def results_table(ctx: TaskContext) -> Markup:
    """Rows grouped by label fraction, best mean per fraction in bold, shading ranking rows within a fraction."""
    groups = []
    for fraction in sorted({r["label_fraction"] for r in ctx.rows}):
        group = [r for r in ctx.rows if r["label_fraction"] == fraction]
        groups.append((fraction, [(row, _cells(row, ctx.metrics, group)) for row in group]))
    return render(
        "sections/results_table.html.j2",
        metrics=ctx.metrics,
        lower_is_better=LOWER_IS_BETTER,
        groups=groups,
        colours=ctx.report.colours,
    )
