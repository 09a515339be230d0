"""A task's verdict in words: paired comparisons when the file has them, else the best per label fraction."""

from __future__ import annotations

from markupsafe import Markup

from medfoundry.evaluate.metrics import LOWER_IS_BETTER
from medfoundry.report.comparisons import comparison_order
from medfoundry.report.context import TaskContext
from medfoundry.report.summary import leaders
from medfoundry.report.templating import render


def summary(ctx: TaskContext) -> Markup:
    """Paired comparisons (significant ones first), or leaders judged by CI overlap, which is conservative."""
    if ctx.comparisons:
        ordered = sorted(ctx.comparisons, key=comparison_order)
        return render(
            "sections/comparisons.html.j2",
            comparisons=ordered,
            significant=[c for c in ordered if c.significant],
            others=[c for c in ordered if not c.significant],
            colours=ctx.report.colours,
        )
    if ctx.headline is None or not (found := leaders(ctx.rows, ctx.headline)):
        return Markup()
    return render("sections/leaders.html.j2", leaders=found, metric=ctx.headline, lower=ctx.headline in LOWER_IS_BETTER)
