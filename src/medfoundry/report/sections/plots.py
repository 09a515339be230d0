"""A task's figures: label-efficiency curves per metric and the adaptation ladder of its headline metric."""

from __future__ import annotations

from markupsafe import Markup

from medfoundry.report.context import TaskContext
from medfoundry.report.plots import plot_adaptation_ladder, plot_label_efficiency
from medfoundry.report.summary import REPORT_METRICS, format_fraction, ladder_points, metric_label
from medfoundry.report.templating import render


def label_efficiency(ctx: TaskContext) -> Markup:
    """One curve plot per plotted metric, the headline metric first when it is not one of REPORT_METRICS."""
    metrics = [m for m in REPORT_METRICS if m in ctx.metrics]
    if ctx.headline is not None and ctx.headline not in metrics:
        metrics.insert(0, ctx.headline)
    if not metrics:
        return Markup()
    colours, styles = ctx.report.colours, ctx.report.styles
    figures = [
        (
            plot_label_efficiency(ctx.rows, m, colours, styles, f"{metric_label(m)} — {ctx.task}"),
            f"{metric_label(m)} versus label fraction for {ctx.task}",
        )
        for m in metrics
    ]
    return render("sections/label_efficiency.html.j2", figures=figures)


def adaptation_ladder(ctx: TaskContext) -> Markup:
    """Headline metric against trainable parameters and fit time; nothing when no cost was recorded."""
    if ctx.headline is None:
        return Markup()
    fraction, points = ladder_points(ctx.report.results.records, ctx.task, ctx.headline)
    if fraction is None:
        return Markup()
    label = metric_label(ctx.headline)
    title = f"Adaptation ladder — {label} at {format_fraction(fraction)} labels — {ctx.task}"
    figure = plot_adaptation_ladder(points, ctx.headline, ctx.report.colours, ctx.report.styles, title)
    if figure is None:
        return Markup()
    alt = f"{label} versus trainable parameters and fit time for {ctx.task}"
    return render("sections/ladder.html.j2", figure=figure, alt=alt)
