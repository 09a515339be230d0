"""Calibration of classification tasks: reliability diagrams (accuracy against confidence, one panel per model and
adapter, before and after temperature scaling) and ECE / Brier with their CIs. From
metadata["tasks"][task]["calibration"] (written by the classification kinds, ``bench/classification.py``)."""

from __future__ import annotations

from typing import Any

from markupsafe import Markup
from matplotlib.figure import Figure

from medfoundry.report.context import TaskContext
from medfoundry.report.templating import render

# Panels beyond this many make the figure unreadable; the table still lists every model and adapter.
_MAX_PANELS = 8
_BEFORE, _AFTER = "#D55E00", "#0072B2"


def task_analysis(ctx: TaskContext, key: str) -> dict[str, Any]:
    """``metadata["tasks"][task][key]`` or an empty dict."""
    task = (ctx.report.results.metadata.get("tasks") or {}).get(ctx.task)
    found = task.get(key) if isinstance(task, dict) else None
    return found if isinstance(found, dict) else {}


def shown_cells(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One cell per (model, adapter): all training labels (the largest fraction) and the first seed."""
    if not cells:
        return []
    top = max(c["label_fraction"] for c in cells)
    chosen: dict[tuple[str, str], dict[str, Any]] = {}
    for cell in sorted((c for c in cells if c["label_fraction"] == top), key=lambda c: c["seed"]):
        chosen.setdefault((cell["model"], cell["adapter"]), cell)
    return list(chosen.values())


def plot_reliability(cells: list[dict[str, Any]]) -> Figure:
    n = len(cells)
    columns = min(n, 4)
    rows = (n + columns - 1) // columns
    fig = Figure(figsize=(3.0 * columns, 3.0 * rows), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax, cell in zip(axes, cells, strict=False):
        ax.plot([0, 1], [0, 1], color="#999999", linewidth=0.8, linestyle=":", label="perfect calibration")
        states = [("before", _BEFORE, "as fitted")]
        if "after" in cell:
            states.append(("after", _AFTER, f"temperature {cell['temperature']:.2f}"))
        for state, colour, label in states:
            bins = cell[state]["bins"]
            ece = cell[state]["ece"]["value"]
            confidence, accuracy = [b["confidence"] for b in bins], [b["accuracy"] for b in bins]
            largest = max(b["n"] for b in bins)
            ax.plot(confidence, accuracy, color=colour, linewidth=1.2, label=f"{label} (ECE {ece:.3f})")
            ax.scatter(confidence, accuracy, color=colour, zorder=3, s=[8 + 60 * b["n"] / largest for b in bins])
        ax.set_title(f"{cell['model']} · {cell['adapter']}", fontsize=9)
        ax.set_xlim(0, 1.02)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("confidence (top class)", fontsize=8)
        ax.set_ylabel("accuracy", fontsize=8)
        ax.legend(fontsize=6.5, frameon=False, loc="upper left")
        ax.spines[["top", "right"]].set_visible(False)
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig


def calibration(ctx: TaskContext) -> Markup:
    analysis = task_analysis(ctx, "calibration")
    cells = shown_cells(list(analysis.get("cells") or []))
    if not cells:
        return Markup()
    scaled = any("after" in c for c in cells)
    return render(
        "sections/calibration.html.j2",
        figure=plot_reliability(cells[:_MAX_PANELS]),
        cells=cells,
        scaled=scaled,
        fraction=cells[0]["label_fraction"],
        omitted=max(0, len(cells) - _MAX_PANELS),
    )
