"""Subgroups of classification tasks: a forest plot of the headline metric per group (one panel per subgroup
column, one marker per model and adapter, with its CI), and per metric the worst group and the gap between the best
and worst group with its CI, flagged when the CI excludes 0. From metadata["tasks"][task]["subgroups"] (written by
the classification kinds, ``bench/classification.py``)."""

from __future__ import annotations

import math
from typing import Any

from markupsafe import Markup
from matplotlib.figure import Figure

from medfoundry.evaluate.subgroups import TOO_FEW_EVENTS, TOO_SMALL, UNDEFINED
from medfoundry.report.context import TaskContext
from medfoundry.report.sections.calibration import task_analysis
from medfoundry.report.summary import metric_label
from medfoundry.report.templating import render

_FALLBACK_COLOURS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000")
NOT_SCORED = {TOO_SMALL: "too small", TOO_FEW_EVENTS: "too few events", UNDEFINED: "undefined"}


def _events(group: dict[str, Any]) -> str:
    return f", {group['events']} events" if "events" in group else ""


def _number(x: Any) -> float:
    return float(x) if isinstance(x, int | float) else math.nan


def shown_entries(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The entries of all training labels (the largest fraction) and the first seed of each model and adapter."""
    if not cells:
        return []
    top = max(c["label_fraction"] for c in cells)
    first_seed: dict[tuple[str, str], int] = {}
    for c in cells:
        if c["label_fraction"] == top:
            pair = (c["model"], c["adapter"])
            first_seed[pair] = min(first_seed.get(pair, c["seed"]), c["seed"])
    return [c for c in cells if c["label_fraction"] == top and c["seed"] == first_seed[(c["model"], c["adapter"])]]


def _plot_metric(entries: list[dict[str, Any]], column: str, metrics: list[str]) -> str | None:
    """The first metric (in the task's order) with a value on at least two groups of ``column``."""
    for metric in metrics:
        if any(e["column"] == column and e["metric"] == metric and e["gap"] is not None for e in entries):
            return metric
    return None


def plot_forest(entries: list[dict[str, Any]], panels: list[tuple[str, str]], colours: dict[str, str]) -> Figure:
    pairs = list(dict.fromkeys((e["model"], e["adapter"]) for e in entries))
    height = max(2.4, 0.5 + 0.32 * max(len(next(e for e in entries if e["column"] == c)["groups"]) * len(pairs)
                                        for c, _ in panels))  # fmt: skip
    fig = Figure(figsize=(4.6 * len(panels), height), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (column, metric) in zip(axes, panels, strict=True):
        chosen = [e for e in entries if e["column"] == column and e["metric"] == metric]
        groups = [g["group"] for g in chosen[0]["groups"]]
        step = 0.8 / max(len(pairs), 1)
        for j, pair in enumerate(pairs):
            entry = next((e for e in chosen if (e["model"], e["adapter"]) == pair), None)
            if entry is None:
                continue
            # One model: colour tells its adapters apart; several: the model's colour, as in the other plots.
            single_model = len({p[0] for p in pairs}) == 1
            fallback = _FALLBACK_COLOURS[j % len(_FALLBACK_COLOURS)]
            colour = fallback if single_model else colours.get(pair[0], fallback)
            marker = "os^Dv"[j % 5]
            for i, g in enumerate(entry["groups"]):
                y = i - 0.4 + step * (j + 0.5)
                if g["status"] != "ok":
                    ax.text(0.01, y, NOT_SCORED[g["status"]], fontsize=6,
                            color="#777777", va="center", transform=ax.get_yaxis_transform())  # fmt: skip
                    continue
                low, high, value = _number(g["ci_low"]), _number(g["ci_high"]), _number(g["value"])
                if math.isfinite(low) and math.isfinite(high):
                    ax.plot([low, high], [y, y], color=colour, linewidth=1.4)
                label = f"{pair[0]} · {pair[1]}" if i == 0 else None
                ax.plot([value], [y], marker=marker, color=colour, markersize=5, linestyle="none", label=label)
        ax.set_yticks(range(len(groups)), [f"{g} (n={c['n']})" for g, c in zip(groups, chosen[0]["groups"],
                                                                                strict=True)], fontsize=8)  # fmt: skip
        ax.invert_yaxis()
        ax.set_xlabel(metric_label(metric), fontsize=8)
        ax.set_title(column, fontsize=9)
        ax.spines[["top", "right"]].set_visible(False)
        ax.grid(axis="x", color="#eeeeee")
    axes[0].legend(fontsize=6.5, frameon=False, loc="best")
    return fig


def subgroups(ctx: TaskContext) -> Markup:
    analysis = task_analysis(ctx, "subgroups")
    entries = shown_entries(list(analysis.get("cells") or []))
    if not entries:
        return Markup()
    metrics = list(dict.fromkeys(e["metric"] for e in entries))
    if ctx.headline in metrics:
        metrics.remove(ctx.headline)
        metrics.insert(0, ctx.headline)
    columns = list(dict.fromkeys(e["column"] for e in entries))
    panels = [(c, m) for c in columns if (m := _plot_metric(entries, c, metrics)) is not None]
    figure = plot_forest(entries, panels, ctx.report.colours) if panels else None
    rows = []
    for e in entries:
        skipped = [f"{g['group']} ({NOT_SCORED[g['status']]}, n={g['n']}{_events(g)})"
                   for g in e["groups"] if g["status"] != "ok"]  # fmt: skip
        rows.append({**e, "skipped": ", ".join(skipped)})
    rows.sort(key=lambda r: (r["column"], metrics.index(r["metric"]), r["model"], r["adapter"]))
    flagged = [r for r in rows if r["gap_excludes_zero"]]
    return render(
        "sections/subgroups.html.j2",
        figure=figure,
        rows=rows,
        flagged=flagged,
        fraction=entries[0]["label_fraction"],
        min_group_size=analysis.get("min_group_size"),
        min_group_events=analysis.get("min_group_events"),
        panels=panels,
    )
