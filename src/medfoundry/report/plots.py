"""Matplotlib figures of the report: label-efficiency curves and the adaptation ladder.

Figures are built on ``matplotlib.figure.Figure`` directly, never through pyplot, so rendering holds no global
state and works without a display. ``png_bytes``/``png_base64`` turn any of them into what the HTML embeds.
"""

from __future__ import annotations

import base64
import io
import math
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullLocator

from medfoundry.report.summary import LadderPoint, Row, adapter_key, axis_label, better, format_fraction

# Okabe-Ito colours stay distinguishable for colour-blind readers; yellow is dropped as unreadable on
# white, and Tableau colours extend the palette for many models.
_MODEL_COLOURS: tuple[str, ...] = (
    "#0072B2",
    "#D55E00",
    "#009E73",
    "#CC79A7",
    "#E69F00",
    "#56B4E9",
    "#000000",
    "#8c564b",
    "#7f7f7f",
    "#bcbd22",
)
_ADAPTER_STYLES: tuple[tuple[Any, str], ...] = (
    ("-", "o"),
    ("--", "s"),
    (":", "^"),
    ("-.", "D"),
    ((0, (5, 1, 1, 1)), "v"),
    ((0, (1, 3)), "P"),
    ((0, (8, 2)), "X"),
    ((0, (3, 1, 1, 1, 1, 1)), "*"),
)
# More series than this get a legend factored into models (colour) and adapters (style): one entry per
# (model, adapter) pair stops being readable with, say, 3 models x 6 adapters.
_MAX_PAIR_LEGEND = 6


def series_styles(rows: list[Row]) -> tuple[dict[str, str], dict[str, tuple[Any, str]]]:
    """Colour per model and (line style, marker) per adapter, fixed across all plots of the report."""
    models = sorted({r["model"] for r in rows})
    adapters = sorted({r["adapter"] for r in rows}, key=adapter_key)
    colours = {m: _MODEL_COLOURS[i % len(_MODEL_COLOURS)] for i, m in enumerate(models)}
    styles = {a: _ADAPTER_STYLES[i % len(_ADAPTER_STYLES)] for i, a in enumerate(adapters)}
    return colours, styles


def png_bytes(fig: Figure) -> bytes:
    """``fig`` as a 150 dpi PNG."""
    buf = io.BytesIO()
    # No Software metadata: it carries a URL and the report should hold no external addresses at all.
    fig.savefig(buf, format="png", dpi=150, metadata={"Software": None})
    return buf.getvalue()


def png_base64(fig: Figure) -> str:
    """``png_bytes`` as base64 text, for a data: URI."""
    return base64.b64encode(png_bytes(fig)).decode("ascii")


def _style_axes(ax: Any) -> None:
    ax.grid(True, which="major", color="#e3e6ea", linewidth=0.8, zorder=0)
    ax.tick_params(labelsize=9, colors="#333")
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    for side in ("left", "bottom"):
        ax.spines[side].set_color("#9aa1a9")


def _factored_legend(
    fig: Figure,
    models: list[str],
    adapters: list[str],
    colours: Mapping[str, str],
    styles: Mapping[str, tuple[Any, str]],
    with_lines: bool,
    horizontal: bool = False,
) -> None:
    """Models (colour) and adapters (style) as two legend columns under the axes, or two rows if ``horizontal``."""
    blank = Line2D([], [], linestyle="none", marker="")
    model_handles = [Line2D([], [], color=colours[m], linewidth=3.0) for m in models]
    adapter_handles = [
        Line2D(
            [],
            [],
            color="#555",
            linestyle=styles[a][0] if with_lines else "none",
            marker=styles[a][1],
            markersize=6,
            linewidth=1.6,
        )
        for a in adapters
    ]
    n = max(len(models), len(adapters))
    # Legends fill column by column: pad both columns to the same length so each holds one kind.
    col_models = [(blank, "Model"), *zip(model_handles, models, strict=True)]
    col_adapters = [(blank, "Adapter"), *zip(adapter_handles, adapters, strict=True)]
    col_models += [(blank, "")] * (n + 1 - len(col_models))
    col_adapters += [(blank, "")] * (n + 1 - len(col_adapters))
    # Legends fill column by column, so two rows means interleaving the two lists.
    entries = (
        [e for pair in zip(col_models, col_adapters, strict=True) for e in pair]
        if horizontal
        else col_models + col_adapters
    )
    legend = fig.legend(
        [h for h, _ in entries],
        [label for _, label in entries],
        loc="outside lower center",
        ncol=n + 1 if horizontal else 2,
        fontsize=9,
        frameon=False,
        handlelength=3.0,
        columnspacing=2.5,
    )
    for text in legend.get_texts()[:2] if horizontal else (legend.get_texts()[0], legend.get_texts()[n + 1]):
        text.set_fontweight("bold")


def plot_label_efficiency(
    rows: list[Row],
    metric: str,
    colours: Mapping[str, str],
    styles: Mapping[str, tuple[Any, str]],
    title: str,
) -> Figure:
    """Metric vs. label fraction (log x) for one task: a line per (model, adapter) with its CI band."""
    series: dict[tuple[str, str], list[Row]] = defaultdict(list)
    for row in rows:
        # Zero-shot rows use no label (fraction 0): they have no place on a log axis of labelled fractions.
        if row["label_fraction"] > 0 and not math.isnan(row.get(metric, float("nan"))):
            series[(row["model"], row["adapter"])].append(row)
    models = sorted({m for m, _ in series})
    adapters = sorted({a for _, a in series}, key=adapter_key)
    factored = len(series) > _MAX_PAIR_LEGEND
    ncol = 2 if len(series) > 3 else max(1, len(series))
    legend_rows = max(len(models), len(adapters)) + 1 if factored else math.ceil(len(series) / ncol)
    # The legend sits below the axes; grow the figure with it so many series do not squash the plot.
    fig = Figure(figsize=(6.4, 4.2 + 0.22 * legend_rows), layout="constrained")
    ax = fig.add_subplot()
    # Overlapping bands turn muddy with many series, so each gets fainter as their number grows.
    band_alpha = 0.12 if len(series) <= 4 else 0.06 if len(series) <= 8 else 0.035
    fractions = sorted({r["label_fraction"] for rs in series.values() for r in rs})

    for (model, adapter), srows in sorted(series.items(), key=lambda kv: (kv[0][0], adapter_key(kv[0][1]))):
        srows.sort(key=lambda r: r["label_fraction"])
        x = np.array([r["label_fraction"] for r in srows])
        y = np.array([r[metric] for r in srows])
        lo = np.array([r[f"{metric}_ci_low"] for r in srows])
        hi = np.array([r[f"{metric}_ci_high"] for r in srows])
        linestyle, marker = styles[adapter]
        colour = colours[model]
        ax.plot(
            x,
            y,
            color=colour,
            linestyle=linestyle,
            marker=marker,
            markersize=6,
            linewidth=2.0 if len(series) <= 8 else 1.5,
            markeredgecolor="white",
            markeredgewidth=0.8,
            label=f"{model} · {adapter}",
            zorder=3,
        )
        band = np.isfinite(lo) & np.isfinite(hi)
        if band.any():
            # NaN bounds leave a gap in the band rather than dragging it to zero.
            ax.fill_between(x, lo, hi, where=band, color=colour, alpha=band_alpha, linewidth=0, zorder=2)

    ax.set_xscale("log")
    if fractions:
        ax.xaxis.set_major_locator(FixedLocator(fractions))
        ax.set_xticklabels([format_fraction(f) for f in fractions])
        ax.xaxis.set_minor_locator(NullLocator())
        # Symmetric padding in log space keeps the end points off the frame.
        pad = 1.25 if len(fractions) > 1 else 2.0
        ax.set_xlim(fractions[0] / pad, fractions[-1] * pad)
    else:
        ax.text(0.5, 0.5, "no values", transform=ax.transAxes, ha="center", va="center", color="#888")
    ax.set_xlabel("Labelled training data (fraction of training set)", fontsize=10)
    ax.set_ylabel(axis_label(metric), fontsize=10)
    ax.set_title(title, fontsize=12, loc="left", fontweight="bold", color="#222")
    _style_axes(ax)
    if factored:
        _factored_legend(fig, models, adapters, colours, styles, with_lines=True)
    elif series:
        fig.legend(
            loc="outside lower center",
            ncol=ncol,
            fontsize=9,
            frameon=False,
            handlelength=3.0,
            columnspacing=1.6,
        )
    return fig


# Log axes cannot show 0: zero parameters (kNN, prototypes) sit at 1 with the tick labelled "0", and fits
# faster than 10 ms at 10 ms labelled "≤0.01".
_PARAMS_FLOOR = 1.0
_SECONDS_FLOOR = 0.01


def _params_tick(x: float, _pos: int) -> str:
    if x <= _PARAMS_FLOOR:
        return "0"
    exponent = round(math.log10(x))
    return f"$10^{{{exponent}}}$" if math.isclose(x, 10.0**exponent) else ""


def _seconds_tick(x: float, _pos: int) -> str:
    if x <= _SECONDS_FLOOR * 1.0001:
        return f"≤{_SECONDS_FLOOR:g}"
    return f"{x:g}" if x < 1 else f"{x:,.0f}"


def _ladder_panel(
    ax: Any,
    points: list[tuple[LadderPoint, float]],
    metric: str,
    colours: Mapping[str, str],
    styles: Mapping[str, tuple[Any, str]],
) -> None:
    """Scatter (x = cost, y = metric) with CI error bars; each adapter named once, at its best point."""
    for point, x in points:
        lo = point.value - point.ci_low if math.isfinite(point.ci_low) else 0.0
        hi = point.ci_high - point.value if math.isfinite(point.ci_high) else 0.0
        ax.errorbar(
            [x],
            [point.value],
            yerr=[[max(lo, 0.0)], [max(hi, 0.0)]],
            color=colours[point.model],
            marker=styles[point.adapter][1],
            markersize=7,
            markeredgecolor="white",
            markeredgewidth=0.8,
            elinewidth=1.2,
            capsize=2.5,
            linestyle="none",
            zorder=3,
        )
    best: dict[str, tuple[LadderPoint, float]] = {}
    for point, x in points:
        if point.adapter not in best or better(metric, point.value, best[point.adapter][0].value):
            best[point.adapter] = (point, x)
    # Adapters at about the same cost (kNN and prototypes both fit nothing) would print their names on top of
    # each other, so they share one label at the highest of their points.
    stacks: dict[int, list[tuple[LadderPoint, float]]] = defaultdict(list)
    for point, x in best.values():
        stacks[round(math.log10(x) * 2)].append((point, x))
    for stack in stacks.values():
        names = ", ".join(sorted({p.adapter for p, _ in stack}, key=adapter_key))
        point, x = max(stack, key=lambda px: px[0].value)
        ax.annotate(names, (x, point.value), xytext=(7, 3), textcoords="offset points", fontsize=8, color="#333")
    xs = [x for _, x in points]
    ax.set_xscale("log")
    ax.set_xlim(min(xs) / 3, max(xs) * 6)  # room on the right for the adapter names
    ax.set_ylabel(axis_label(metric), fontsize=10)
    _style_axes(ax)


def plot_adaptation_ladder(
    points: list[LadderPoint],
    metric: str,
    colours: Mapping[str, str],
    styles: Mapping[str, tuple[Any, str]],
    title: str,
) -> Figure | None:
    """Metric vs. trainable parameters and vs. fit time (both log x); None when no point has either cost."""
    by_params = [(p, max(p.trainable_params, _PARAMS_FLOOR)) for p in points if p.trainable_params is not None]
    by_time = [(p, max(p.fit_seconds, _SECONDS_FLOOR)) for p in points if p.fit_seconds is not None]
    if not by_params and not by_time:
        return None
    models = sorted({p.model for p in points})
    adapters = sorted({p.adapter for p in points}, key=adapter_key)
    fig = Figure(figsize=(12.0, 4.6), layout="constrained")
    ax_params, ax_time = fig.subplots(1, 2, sharey=True)
    panels = (
        (ax_params, by_params, "Trainable parameters (log scale)", _params_tick, _PARAMS_FLOOR),
        (ax_time, by_time, "Fit time in seconds (log scale)", _seconds_tick, _SECONDS_FLOOR),
    )
    for ax, panel_points, xlabel, tick, floor in panels:
        ax.set_xlabel(xlabel, fontsize=10)
        if not panel_points:
            ax.text(0.5, 0.5, "not recorded", transform=ax.transAxes, ha="center", va="center", color="#888")
            _style_axes(ax)
            continue
        _ladder_panel(ax, panel_points, metric, colours, styles)
        ax.xaxis.set_major_locator(LogLocator(base=10.0, numticks=12))
        ax.xaxis.set_major_formatter(FuncFormatter(tick))
        if any(x <= floor for _, x in panel_points):
            # Make sure the floor carries its "0"/"≤" label even when it is not a decade the locator picks.
            ticks = sorted({floor, *(t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1])})
            ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_minor_locator(NullLocator())
    ax_time.tick_params(labelleft=True)
    fig.suptitle(title, fontsize=12, x=0.01, ha="left", fontweight="bold", color="#222")
    _factored_legend(fig, models, adapters, colours, styles, with_lines=False, horizontal=True)
    return fig


# Pre-training health readings, in the order a reader checks them, with their axis labels.
HEALTH_SERIES: dict[str, str] = {
    "loss": "SSL loss",
    "effective_rank": "Effective rank of features",
    "feature_std": "Feature spread (std)",
    "teacher_entropy": "Teacher entropy (relative)",
    "prototype_use": "Prototypes in use (share)",
    "knn_accuracy": "Online kNN accuracy",
}


def plot_health(history: list[dict[str, Any]], thresholds: dict[str, tuple[str, float]]) -> Figure | None:
    """Small multiples of the health readings against the step, each with its trouble threshold dashed.

    ``thresholds`` maps a reading to ("min" or "max", value): below a "min" or above a "max" means trouble.
    """
    keys = [k for k in HEALTH_SERIES if any(isinstance(h.get(k), int | float) for h in history)]
    if not keys:
        return None
    columns = min(3, len(keys))
    rows = math.ceil(len(keys) / columns)
    fig = Figure(figsize=(3.2 * columns, 2.4 * rows), layout="constrained")
    for index, key in enumerate(keys):
        ax = fig.add_subplot(rows, columns, index + 1)
        points = [(h["step"], h[key]) for h in history if isinstance(h.get(key), int | float) and "step" in h]
        ax.plot([p[0] for p in points], [p[1] for p in points], color="#1f5f99", linewidth=1.6, marker=".")
        if key in thresholds:
            side, value = thresholds[key]
            ax.axhline(value, color="#b8312f", linestyle="--", linewidth=1.0)
            ax.set_title(
                f"{HEALTH_SERIES[key]}\n(trouble {'below' if side == 'min' else 'above'} {value:g})", fontsize=9
            )
        else:
            ax.set_title(HEALTH_SERIES[key], fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        _style_axes(ax)
    return fig
