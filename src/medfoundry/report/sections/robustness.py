"""Robustness of features (``medfoundry robustness``): one plot per metric (severity on x, one line per shift, a
panel per encoder) and the table behind them. From metadata["tasks"][task]["robustness"] (written by
``bench/robustness.py``)."""

from __future__ import annotations

import math
from typing import Any

from markupsafe import Markup
from matplotlib.figure import Figure

from medfoundry.report.context import TaskContext
from medfoundry.report.plots import _MODEL_COLOURS, _style_axes
from medfoundry.report.sections.calibration import task_analysis
from medfoundry.report.summary import metric_label
from medfoundry.report.templating import render

_STYLES = ("o", "s", "^", "D", "v", "P", "X", "*")


def metric_title(name: str) -> str:
    """'top5_agreement' -> 'Top-5 retrieval agreement', 'delta_auroc' -> 'Change in AUROC'."""
    if name == "cosine":
        return "Cosine similarity to the clean feature"
    if name == "flip_rate":
        return "Probe flip rate"
    if name.startswith("top") and name.endswith("_agreement"):
        return f"Top-{name[3 : -len('_agreement')]} retrieval agreement"
    if name.startswith("delta_"):
        return f"Change in {metric_label(name[len('delta_') :])} (shifted - clean)"
    if name.startswith("shifted_"):
        return f"{metric_label(name[len('shifted_') :])} on shifted images"
    return name


# What a clean image scores, drawn at severity 0 so every line starts from where no shift is.
def _clean_value(name: str) -> float | None:
    return {"cosine": 1.0, "flip_rate": 0.0}.get(
        name, 1.0 if name.endswith("_agreement") else 0.0 if name.startswith("delta_") else None
    )


def plot_metric(data: dict[str, Any], name: str) -> Figure:
    """``name`` against severity level (0 = clean), one line with its CI band per shift, a panel per encoder."""
    encoders = list(data["encoders"])
    shifts = list(data["shifts"])
    fig = Figure(figsize=(4.2 * len(encoders) + 0.6, 3.6), layout="constrained")
    axes = fig.subplots(1, len(encoders), sharey=True, squeeze=False)[0]
    clean = _clean_value(name)
    for ax, encoder in zip(axes, encoders, strict=True):
        for i, shift in enumerate(shifts):
            rows = sorted(
                (r for r in data["records"] if r["encoder"] == encoder and r["shift"] == shift and r["metric"] == name),
                key=lambda r: r["level"],
            )
            if not rows:
                continue
            xs = [0, *(r["level"] for r in rows)] if clean is not None else [r["level"] for r in rows]
            ys = [clean, *(r["value"] for r in rows)] if clean is not None else [r["value"] for r in rows]
            low = [clean, *(r["ci_low"] for r in rows)] if clean is not None else [r["ci_low"] for r in rows]
            high = [clean, *(r["ci_high"] for r in rows)] if clean is not None else [r["ci_high"] for r in rows]
            colour = _MODEL_COLOURS[i % len(_MODEL_COLOURS)]
            ax.plot(xs, ys, color=colour, marker=_STYLES[i % len(_STYLES)], markersize=5, linewidth=1.8, label=shift)
            if not any(v is None or math.isnan(v) for v in low + high):
                ax.fill_between(xs, low, high, color=colour, alpha=0.12, linewidth=0)
        if name.startswith("delta_") or name == "flip_rate":
            ax.axhline(0.0, color="#9aa1a9", linewidth=0.8)
        ax.set_title(encoder, fontsize=10)
        ax.set_xlabel("severity (0 = clean)", fontsize=9)
        levels = max((r["level"] for r in data["records"]), default=1)
        ax.set_xticks(range(0 if clean is not None else 1, levels + 1))
        _style_axes(ax)
    axes[0].set_ylabel(metric_title(name), fontsize=9)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize=9, frameon=False)
    return fig


def _metrics(data: dict[str, Any]) -> list[str]:
    seen: list[str] = []
    for record in data["records"]:
        if record["metric"] not in seen and not record["metric"].startswith("shifted_"):
            seen.append(record["metric"])
    return seen


def robustness(ctx: TaskContext) -> Markup:
    data = task_analysis(ctx, "robustness")
    if not data.get("records"):
        return Markup()
    metrics = _metrics(data)
    table: dict[tuple[str, str, float], dict[str, dict[str, float]]] = {}
    for record in data["records"]:
        table.setdefault((record["encoder"], record["shift"], record["severity"]), {})[record["metric"]] = record
    tasks = ctx.report.results.metadata.get("tasks") or {}
    return render(
        "sections/robustness.html.j2",
        data=data,
        task=tasks.get(ctx.task) or {},
        figures=[(plot_metric(data, name), metric_title(name)) for name in metrics],
        metrics=metrics,
        titles={name: metric_title(name) for name in metrics},
        rows=list(table.items()),
    )
