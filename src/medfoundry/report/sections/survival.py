"""Survival tasks: Kaplan-Meier curves of the test patients split at the median predicted risk, one panel per model,
with the log-rank test, so a reader sees whether "high risk" means shorter survival. From
metadata["tasks"][task]["survival"]["risk_groups"] (written by the survival kind, ``bench/survival.py``)."""

from __future__ import annotations

import math
from typing import Any

from markupsafe import Markup
from matplotlib.figure import Figure

from medfoundry.report.context import TaskContext
from medfoundry.report.templating import render

# High risk in the colour the eye reads as warning; Okabe-Ito, as the report's other plots.
_GROUP_COLOURS = {"high": "#D55E00", "low": "#0072B2"}


def _risk_groups(ctx: TaskContext) -> dict[str, dict[str, Any]]:
    task = (ctx.report.results.metadata.get("tasks") or {}).get(ctx.task)
    groups = ((task or {}).get("survival") or {}).get("risk_groups") if isinstance(task, dict) else None
    if not isinstance(groups, dict):
        return {}
    return {model: g for model, g in groups.items() if isinstance(g, dict) and "high" in g and "low" in g}


def format_p(p: float) -> str:
    if not math.isfinite(p):
        return "n/a"
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def plot_risk_groups(groups: dict[str, dict[str, Any]]) -> Figure:
    fig = Figure(figsize=(4.2 * len(groups), 3.4), layout="constrained")
    axes = fig.subplots(1, len(groups), squeeze=False)[0]
    for ax, (model, g) in zip(axes, groups.items(), strict=True):
        for label in ("high", "low"):
            curve = g[label]
            ax.step(curve["time"], curve["survival"], where="post", color=_GROUP_COLOURS[label],
                    label=f"{label} risk (n={curve['n']}, {curve['events']} events)")  # fmt: skip
        ax.set_title(f"{model}\nlog-rank p = {format_p(float(g.get('p_value', math.nan)))}", fontsize=9)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("time")
        ax.set_ylabel("survival probability")
        ax.legend(fontsize=7, frameon=False, loc="lower left")
        ax.spines[["top", "right"]].set_visible(False)
    return fig


def survival_curves(ctx: TaskContext) -> Markup:
    groups = _risk_groups(ctx)
    if not groups:
        return Markup()
    rows = [
        (model, g.get("chi2", math.nan), format_p(float(g.get("p_value", math.nan)))) for model, g in groups.items()
    ]
    split = next(iter(groups.values())).get("split", "median predicted risk")
    return render("sections/survival.html.j2", figure=plot_risk_groups(groups), rows=rows, split=split)
