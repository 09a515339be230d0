"""A self-contained HTML report rendered from results.json alone.

The report has to be readable offline and shareable as one file (attached to an email, archived next to
the results), so plots are embedded as base64 PNGs, CSS is inline and nothing is fetched from anywhere.
Only whitelisted metadata keys are shown, so nothing patient-level can leak into it.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullLocator

from medfoundry.evaluate.metrics import LOWER_IS_BETTER
from medfoundry.evaluate.results import ResultRecord, ResultsFile, read_results
from medfoundry.io_utils import write_text_atomic

# Plotted (label-efficiency curves) and tabulated in this order; the first one present is a task's headline
# metric unless metadata["primary_metric"] names another.
REPORT_METRICS: tuple[str, ...] = ("auroc", "kappa", "balanced_accuracy", "accuracy")
# Tabulated after REPORT_METRICS; any other metric in the file is tabulated after these.
_EXTRA_TABLE_METRICS: tuple[str, ...] = ("f1", "ece")
METRIC_LABELS: dict[str, str] = {
    "auroc": "AUROC",
    "kappa": "Quadratic weighted kappa",
    "balanced_accuracy": "Balanced accuracy",
    "accuracy": "Accuracy",
    "f1": "F1",
    "ece": "ECE",
}
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
# Cheapest to most expensive rung of the adaptation ladder: adapters keep this order (and so their line
# style and marker) in every legend, whatever subset a file holds. Unknown adapters follow alphabetically.
ADAPTER_ORDER: tuple[str, ...] = ("knn", "fewshot", "linear", "mlp", "finetune-lora", "finetune-full", "supervised")
# More series than this get a legend factored into models (colour) and adapters (style): one entry per
# (model, adapter) pair stops being readable with, say, 3 models x 6 adapters.
_MAX_PAIR_LEGEND = 6


def _load(results: ResultsFile | Path | str) -> ResultsFile:
    return results if isinstance(results, ResultsFile) else read_results(results)


def _nanmean(values: Iterable[float]) -> float:
    arr = np.asarray([v for v in values if not math.isnan(v)], dtype=np.float64)
    return float(arr.mean()) if arr.size else float("nan")


def _nanstd(values: Iterable[float]) -> float:
    arr = np.asarray([v for v in values if not math.isnan(v)], dtype=np.float64)
    # Sample sd across seeds; one seed gives no estimate of the spread.
    return float(arr.std(ddof=1)) if arr.size >= 2 else float("nan")


def _ordered_metrics(names: Iterable[str]) -> list[str]:
    present = set(names)
    known = REPORT_METRICS + _EXTRA_TABLE_METRICS
    return [m for m in known if m in present] + sorted(present - set(known))


def _adapter_key(adapter: str) -> tuple[int, str]:
    return (ADAPTER_ORDER.index(adapter) if adapter in ADAPTER_ORDER else len(ADAPTER_ORDER), adapter)


def metric_label(metric: str) -> str:
    """Human-readable metric name, e.g. 'auroc' -> 'AUROC'; unknown names are shown as they are."""
    return METRIC_LABELS.get(metric, metric)


def _axis_label(metric: str) -> str:
    return metric_label(metric) + (" (lower is better)" if metric in LOWER_IS_BETTER else "")


def _better(metric: str, a: float, b: float) -> bool:
    """Whether value ``a`` is strictly better than ``b`` for ``metric``."""
    return a < b if metric in LOWER_IS_BETTER else a > b


def primary_metric(task: str, metrics: Iterable[str], metadata: Mapping[str, Any] | None = None) -> str | None:
    """The headline metric of ``task``: metadata["primary_metric"][task] if present in ``metrics``, else the
    first of REPORT_METRICS present, else the first metric in report order (None when there is none)."""
    present = _ordered_metrics(metrics)
    chosen = (metadata or {}).get("primary_metric")
    if isinstance(chosen, Mapping) and chosen.get(task) in present:
        return str(chosen[task])
    return next((m for m in REPORT_METRICS if m in present), present[0] if present else None)


def summarise_table(results: ResultsFile | Path | str) -> list[dict[str, Any]]:
    """One row per (task, model, adapter, label fraction), aggregated over seeds.

    Each row has ``task``, ``model``, ``adapter``, ``label_fraction``, ``n_seeds``, ``n_train``,
    ``n_test`` and, for every metric in the file, ``<metric>`` (mean over seeds), ``<metric>_sd``
    (sample sd across seeds, NaN for one seed), ``<metric>_ci_low`` and ``<metric>_ci_high`` (means of
    the per-seed CI bounds). Metrics missing for a row are NaN. Rows are sorted by task, fraction,
    model and adapter (cheapest rung of ``ADAPTER_ORDER`` first, unknown adapters alphabetically after).
    """
    res = _load(results)
    metrics = _ordered_metrics(r.metric for r in res.records)
    groups: dict[tuple[str, str, str, float], list[ResultRecord]] = defaultdict(list)
    for rec in res.records:
        groups[(rec.task, rec.model, rec.adapter, rec.label_fraction)].append(rec)

    rows: list[dict[str, Any]] = []
    for key in sorted(groups, key=lambda k: (k[0], k[3], k[1], _adapter_key(k[2]))):
        task, model, adapter, fraction = key
        recs = groups[key]
        row: dict[str, Any] = {
            "task": task,
            "model": model,
            "adapter": adapter,
            "label_fraction": fraction,
            "n_seeds": len({r.seed for r in recs}),
            "n_train": round(_nanmean(float(r.n_train) for r in recs)),
            "n_test": round(_nanmean(float(r.n_test) for r in recs)),
        }
        for metric in metrics:
            of_metric = [r for r in recs if r.metric == metric]
            row[metric] = _nanmean(r.value for r in of_metric)
            row[f"{metric}_sd"] = _nanstd(r.value for r in of_metric)
            row[f"{metric}_ci_low"] = _nanmean(r.ci_low for r in of_metric)
            row[f"{metric}_ci_high"] = _nanmean(r.ci_high for r in of_metric)
        rows.append(row)
    return rows


def table_metrics(rows: list[dict[str, Any]]) -> list[str]:
    """The metric names present as columns in ``summarise_table`` rows, in report order."""
    keys: set[str] = set()
    for row in rows:
        keys.update(k for k in row if f"{k}_sd" in row)
    return _ordered_metrics(keys)


def format_fraction(fraction: float) -> str:
    """0.01 -> '1%', 0.005 -> '0.5%', 1.0 -> '100%'."""
    return f"{fraction * 100:.4g}%"


def _fmt(value: float, digits: int = 3) -> str:
    return "—" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def format_summary_text(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of ``summarise_table`` rows (mean ± sd per metric) for terminal output."""
    metrics = table_metrics(rows)
    header = ["task", "model", "adapter", "labels", "seeds"] + [METRIC_LABELS.get(m, m) for m in metrics]
    body = []
    for row in rows:
        cells = [row["task"], row["model"], row["adapter"], format_fraction(row["label_fraction"])]
        cells.append(str(row["n_seeds"]))
        for m in metrics:
            sd = row[f"{m}_sd"]
            cells.append(_fmt(row[m]) + ("" if math.isnan(sd) else f" ± {sd:.3f}"))
        body.append(cells)
    widths = [max(len(str(c)) for c in col) for col in zip(header, *body, strict=True)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) for cells in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def format_markdown_tables(results: ResultsFile | Path | str, metrics: Mapping[str, str] | None = None) -> str:
    """Markdown tables for pasting into a paper draft or an issue: per task, its headline metric (``metrics``, else
    ``metadata["primary_metric"]``, else the first in report order) as mean over seeds with the mean CI, one
    row per (model, adapter) and one column per label fraction."""
    res = _load(results)
    rows = summarise_table(res)
    chosen = dict(metrics or res.metadata.get("primary_metric") or {})
    blocks = []
    for task in dict.fromkeys(row["task"] for row in rows):
        task_rows = [row for row in rows if row["task"] == task]
        present = [m for m in table_metrics(task_rows) if any(not math.isnan(r[m]) for r in task_rows)]
        metric = chosen.get(task) if chosen.get(task) in present else (present[0] if present else None)
        if metric is None:
            continue
        fractions = sorted({row["label_fraction"] for row in task_rows})
        label = METRIC_LABELS.get(metric, metric)
        lines = [
            f"**{task}**: {label}, mean over seeds [mean 95% CI]",
            "",
            "| model | adapter | " + " | ".join(format_fraction(f) for f in fractions) + " |",
            "|---|---|" + "---|" * len(fractions),
        ]
        for model, adapter in dict.fromkeys((row["model"], row["adapter"]) for row in task_rows):
            cells = []
            for fraction in fractions:
                match = [
                    r
                    for r in task_rows
                    if (r["model"], r["adapter"], r["label_fraction"]) == (model, adapter, fraction)
                ]
                row = match[0] if match else None
                cells.append(
                    ""
                    if row is None
                    else f"{_fmt(row[metric])} [{_fmt(row[metric + '_ci_low'])}, {_fmt(row[metric + '_ci_high'])}]"
                )
            lines.append(f"| {model} | {adapter} | " + " | ".join(cells) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


# --------------------------------------------------------------------------------------------- plots


def _styles(rows: list[dict[str, Any]]) -> tuple[dict[str, str], dict[str, tuple[Any, str]]]:
    """Colour per model and (line style, marker) per adapter, fixed across all plots of the report."""
    models = sorted({r["model"] for r in rows})
    adapters = sorted({r["adapter"] for r in rows}, key=_adapter_key)
    colours = {m: _MODEL_COLOURS[i % len(_MODEL_COLOURS)] for i, m in enumerate(models)}
    styles = {a: _ADAPTER_STYLES[i % len(_ADAPTER_STYLES)] for i, a in enumerate(adapters)}
    return colours, styles


def _png_base64(fig: Figure) -> str:
    buf = io.BytesIO()
    # No Software metadata: it carries a URL and the report should hold no external addresses at all.
    fig.savefig(buf, format="png", dpi=150, metadata={"Software": None})
    return base64.b64encode(buf.getvalue()).decode("ascii")


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
    rows: list[dict[str, Any]],
    metric: str,
    colours: Mapping[str, str],
    styles: Mapping[str, tuple[Any, str]],
    title: str,
) -> Figure:
    """Metric vs. label fraction (log x) for one task: a line per (model, adapter) with its CI band."""
    series: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if not math.isnan(row.get(metric, float("nan"))):
            series[(row["model"], row["adapter"])].append(row)
    models = sorted({m for m, _ in series})
    adapters = sorted({a for _, a in series}, key=_adapter_key)
    factored = len(series) > _MAX_PAIR_LEGEND
    ncol = 2 if len(series) > 3 else max(1, len(series))
    legend_rows = max(len(models), len(adapters)) + 1 if factored else math.ceil(len(series) / ncol)
    # The legend sits below the axes; grow the figure with it so many series do not squash the plot.
    fig = Figure(figsize=(6.4, 4.2 + 0.22 * legend_rows), layout="constrained")
    ax = fig.add_subplot()
    # Overlapping bands turn muddy with many series, so each gets fainter as their number grows.
    band_alpha = 0.12 if len(series) <= 4 else 0.06 if len(series) <= 8 else 0.035
    fractions = sorted({r["label_fraction"] for rs in series.values() for r in rs})

    for (model, adapter), srows in sorted(series.items(), key=lambda kv: (kv[0][0], _adapter_key(kv[0][1]))):
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
    ax.set_ylabel(_axis_label(metric), fontsize=10)
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


@dataclass(frozen=True)
class LadderPoint:
    """One (model, adapter) of the adaptation ladder: seed means at one label fraction."""

    model: str
    adapter: str
    value: float
    ci_low: float
    ci_high: float
    trainable_params: float | None
    fit_seconds: float | None


def ladder_points(records: Iterable[ResultRecord], task: str, metric: str) -> tuple[float | None, list[LadderPoint]]:
    """Seed-averaged ladder points of ``task`` for ``metric`` at label fraction 1.0 (or the largest present).

    Returns the fraction used and the points; a point's cost is None when no seed recorded it.
    """
    recs = [r for r in records if r.task == task and r.metric == metric and not math.isnan(r.value)]
    if not recs:
        return None, []
    fraction = max(r.label_fraction for r in recs)
    groups: dict[tuple[str, str], list[ResultRecord]] = defaultdict(list)
    for rec in recs:
        if rec.label_fraction == fraction:
            groups[(rec.model, rec.adapter)].append(rec)

    def mean_of(values: list[float | int | None]) -> float | None:
        present = [float(v) for v in values if v is not None]
        return sum(present) / len(present) if present else None

    points = [
        LadderPoint(
            model=model,
            adapter=adapter,
            value=_nanmean(r.value for r in group),
            ci_low=_nanmean(r.ci_low for r in group),
            ci_high=_nanmean(r.ci_high for r in group),
            trainable_params=mean_of([r.trainable_params for r in group]),
            fit_seconds=mean_of([r.fit_seconds for r in group]),
        )
        for (model, adapter), group in sorted(groups.items(), key=lambda kv: (kv[0][0], _adapter_key(kv[0][1])))
    ]
    return fraction, points


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
        if point.adapter not in best or _better(metric, point.value, best[point.adapter][0].value):
            best[point.adapter] = (point, x)
    # Adapters at about the same cost (kNN and prototypes both fit nothing) would print their names on top of
    # each other, so they share one label at the highest of their points.
    stacks: dict[int, list[tuple[LadderPoint, float]]] = defaultdict(list)
    for point, x in best.values():
        stacks[round(math.log10(x) * 2)].append((point, x))
    for stack in stacks.values():
        names = ", ".join(sorted({p.adapter for p, _ in stack}, key=_adapter_key))
        point, x = max(stack, key=lambda px: px[0].value)
        ax.annotate(names, (x, point.value), xytext=(7, 3), textcoords="offset points", fontsize=8, color="#333")
    xs = [x for _, x in points]
    ax.set_xscale("log")
    ax.set_xlim(min(xs) / 3, max(xs) * 6)  # room on the right for the adapter names
    ax.set_ylabel(_axis_label(metric), fontsize=10)
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
    adapters = sorted({p.adapter for p in points}, key=_adapter_key)
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


# ---------------------------------------------------------------------------------------------- html

_CSS = """
:root { --ink:#1f2933; --muted:#616e7c; --line:#e4e7eb; --bg:#f7f8fa; --accent:#0b6e4f; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--ink);
  font: 15px/1.55 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1180px; margin: 0 auto; padding: 32px 28px 64px; }
header { border-bottom: 3px solid var(--accent); padding-bottom: 18px; margin-bottom: 28px; }
h1 { font-size: 28px; margin: 0 0 6px; letter-spacing: -0.01em; }
h2 { font-size: 21px; margin: 40px 0 12px; padding-bottom: 6px; border-bottom: 1px solid var(--line); }
h3 { font-size: 16px; margin: 26px 0 10px; color: var(--muted); text-transform: uppercase;
  letter-spacing: 0.04em; }
.subtitle { color: var(--muted); margin: 0; }
dl.meta { display: grid; grid-template-columns: max-content 1fr; gap: 4px 18px; margin: 16px 0 0; }
dl.meta dt { color: var(--muted); }
dl.meta dd { margin: 0; font-variant-numeric: tabular-nums; }
.chips { display: flex; flex-wrap: wrap; gap: 8px; margin-top: 14px; }
.chip { background: #fff; border: 1px solid var(--line); border-radius: 999px; padding: 2px 12px;
  font-size: 13px; color: var(--muted); }
.chip b { color: var(--ink); }
.summary { background: #fff; border: 1px solid var(--line); border-left: 4px solid var(--accent);
  border-radius: 6px; padding: 12px 18px; }
.summary ul { margin: 0; padding-left: 18px; }
.summary li { margin: 4px 0; }
.noise { color: #8a5a00; font-weight: 600; }
.clear { color: var(--accent); font-weight: 600; }
.plots { display: grid; grid-template-columns: repeat(auto-fit, minmax(460px, 1fr)); gap: 18px; }
figure { margin: 0; background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 8px; }
figure img { width: 100%; height: auto; display: block; }
.table-wrap { overflow-x: auto; background: #fff; border: 1px solid var(--line); border-radius: 8px; }
table { border-collapse: collapse; width: 100%; font-size: 14px; font-variant-numeric: tabular-nums; }
th, td { padding: 7px 12px; text-align: left; vertical-align: middle; }
thead th { background: #eef1f4; font-weight: 600; border-bottom: 1px solid #d3d8de; white-space: nowrap; }
tbody + tbody { border-top: 2px solid #d3d8de; }
tbody tr + tr td { border-top: 1px solid #f0f2f4; }
td.frac, td.name { white-space: nowrap; }
td.frac { font-weight: 600; }
td.num { text-align: right; color: var(--muted); }
td.metric { white-space: nowrap; }
td.metric .sd { color: var(--muted); font-size: 12.5px; }
td.metric .ci { display: block; color: var(--muted); font-size: 12px; }
td.metric.best .mean { font-weight: 700; color: #000; }
.swatch { display: inline-block; width: 10px; height: 10px; border-radius: 2px; margin-right: 7px; }
.note { color: var(--muted); font-size: 13px; margin-top: 10px; }
.summary .note { margin: 8px 0 0; }
.sig { color: var(--accent); font-weight: 600; }
.nonsig { color: #8a5a00; font-weight: 600; }
.ladder { margin-top: 4px; }
td.diff { text-align: right; white-space: nowrap; }
footer { margin-top: 48px; color: var(--muted); font-size: 12.5px; border-top: 1px solid var(--line);
  padding-top: 12px; }
"""


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _format_duration(seconds: float) -> str:
    if not isinstance(seconds, int | float) or math.isnan(seconds):
        return "—"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _scalar(value: Any) -> str | None:
    return str(value) if isinstance(value, str | int | float) and not isinstance(value, bool) else None


def _dataset_name(metadata: Mapping[str, Any]) -> str | None:
    if (name := _scalar(metadata.get("dataset"))) is not None:
        return name
    config = metadata.get("config")
    if isinstance(config, Mapping):
        dataset = config.get("dataset")
        if isinstance(dataset, Mapping):
            return _scalar(dataset.get("name"))
        return _scalar(dataset)
    return None


# A few stage durations fit on one header line; a suite run's per-task and per-encoder ones get a table.
_MAX_HEADER_DURATIONS = 4


def _durations(metadata: Mapping[str, Any]) -> list[tuple[str, float]]:
    """metadata["durations"] as (name, seconds), nested objects flattened to "a/b" names."""

    def flatten(prefix: str, value: Any) -> Iterable[tuple[str, float]]:
        if isinstance(value, Mapping):
            for key, sub in value.items():
                yield from flatten(f"{prefix}/{key}" if prefix else str(key), sub)
        elif isinstance(value, int | float) and not isinstance(value, bool) and prefix:
            yield prefix, float(value)

    durations = metadata.get("durations")
    return list(flatten("", durations)) if isinstance(durations, Mapping) else []


def _durations_html(metadata: Mapping[str, Any]) -> str:
    durations = _durations(metadata)
    if len(durations) <= _MAX_HEADER_DURATIONS:
        return ""
    body = "".join(
        f'<tr><td>{_esc(name)}</td><td class="num">{_esc(_format_duration(v))}</td></tr>' for name, v in durations
    )
    return (
        '<h2>Run time</h2><div class="table-wrap"><table><thead><tr><th>Stage</th><th class="num">Wall clock</th>'
        f"</tr></thead><tbody>{body}</tbody></table></div>"
    )


def _header_html(res: ResultsFile, rows: list[dict[str, Any]], title: str) -> str:
    meta = res.metadata
    items: list[tuple[str, str]] = []
    tasks = sorted({r["task"] for r in rows})
    if (dataset := _dataset_name(meta)) is not None:
        items.append(("Dataset", dataset))
    if tasks:
        items.append(("Task" if len(tasks) == 1 else "Tasks", ", ".join(tasks)))
    if (created := _scalar(meta.get("created"))) is not None:
        items.append(("Created", created.replace("T", " ")))
    durations = _durations(meta)
    if 0 < len(durations) <= _MAX_HEADER_DURATIONS:
        items.append(("Durations", " · ".join(f"{name}: {_format_duration(v)}" for name, v in durations)))
    versions = meta.get("versions")
    if isinstance(versions, Mapping) and versions:
        items.append(("Versions", " · ".join(f"{k} {v}" for k, v in versions.items() if _scalar(v) is not None)))

    n_test = sorted({r["n_test"] for r in rows})
    chips = [
        ("models", len({r["model"] for r in rows})),
        ("adapters", len({r["adapter"] for r in rows})),
        ("label fractions", len({r["label_fraction"] for r in rows})),
        ("seeds", max((r["n_seeds"] for r in rows), default=0)),
        ("records", len(res.records)),
    ]
    chip_html = "".join(f'<span class="chip"><b>{n}</b> {_esc(label)}</span>' for label, n in chips)
    if n_test:
        test_text = str(n_test[0]) if len(n_test) == 1 else f"{n_test[0]}–{n_test[-1]}"
        chip_html += f'<span class="chip"><b>{_esc(test_text)}</b> test samples</span>'
    meta_html = "".join(f"<dt>{_esc(k)}</dt><dd>{_esc(v)}</dd>" for k, v in items)
    return (
        f"<header><h1>{_esc(title)}</h1>"
        '<p class="subtitle">Label-efficiency benchmark: how each model and adapter performs as the '
        "amount of labelled training data grows.</p>"
        f'<dl class="meta">{meta_html}</dl><div class="chips">{chip_html}</div></header>'
    )


def _ci_overlap(a: Mapping[str, Any], b: Mapping[str, Any], metric: str) -> bool | None:
    bounds = [a[f"{metric}_ci_low"], a[f"{metric}_ci_high"], b[f"{metric}_ci_low"], b[f"{metric}_ci_high"]]
    if any(math.isnan(v) for v in bounds):
        return None
    return bounds[0] <= bounds[3] and bounds[2] <= bounds[1]


def _summary_html(rows: list[dict[str, Any]], headline: str | None = None) -> str:
    """Best (model, adapter) per label fraction on ``headline``, judged against the runner-up by CI overlap."""
    metrics = table_metrics(rows)
    headline = headline if headline in metrics else primary_metric("", metrics)
    if headline is None:
        return ""
    label = metric_label(headline)
    lower = headline in LOWER_IS_BETTER
    items: list[str] = []
    for fraction in sorted({r["label_fraction"] for r in rows}):
        ranked = sorted(
            (r for r in rows if r["label_fraction"] == fraction and not math.isnan(r[headline])),
            key=lambda r: r[headline],
            reverse=not lower,
        )
        if not ranked:
            continue
        best = ranked[0]
        best_txt = (
            f"<b>{_esc(best['model'])} + {_esc(best['adapter'])}</b> has the {'lowest' if lower else 'highest'} "
            f"{_esc(label)} ({_fmt(best[headline])}, CI {_fmt(best[f'{headline}_ci_low'])}–"
            f"{_fmt(best[f'{headline}_ci_high'])})"
        )
        if len(ranked) == 1:
            verdict = "; it is the only model/adapter evaluated here."
        else:
            second = ranked[1]
            second_txt = f"{_esc(second['model'])} + {_esc(second['adapter'])} ({_fmt(second[headline])})"
            overlap = _ci_overlap(best, second, headline)
            if overlap is None:
                verdict = f"; runner-up {second_txt}. No confidence interval is available to judge the gap."
            elif overlap:
                verdict = (
                    f'; the runner-up {second_txt} is <span class="noise">within noise</span> '
                    "(their confidence intervals overlap)."
                )
            else:
                verdict = (
                    f'; it is <span class="clear">clearly ahead</span> of the runner-up {second_txt} '
                    "(confidence intervals do not overlap)."
                )
        items.append(f"<li>With <b>{format_fraction(fraction)}</b> of the labels, {best_txt}{verdict}</li>")
    if not items:
        return ""
    note = (
        '<p class="note">Comparing separate confidence intervals is conservative: two results whose intervals '
        "overlap can still differ significantly in a paired comparison on the same test cases, which this file "
        "does not contain.</p>"
    )
    return f'<div class="summary"><ul>{"".join(items)}</ul>{note}</div>'


# ------------------------------------------------------------------------------------ comparisons


@dataclass(frozen=True)
class Comparison:
    """One paired bootstrap difference A − B from metadata["comparisons"], averaged over seeds."""

    task: str
    metric: str
    label_fraction: float
    model_a: str
    adapter_a: str
    model_b: str
    adapter_b: str
    value_a: float
    value_b: float
    difference: float
    ci_low: float
    ci_high: float
    share_opposite: float
    n_seeds: int
    confidence: float

    @classmethod
    def from_mapping(cls, raw: Any) -> Comparison | None:
        """Parse one entry; None when it is malformed (metadata is not validated, so skip rather than fail)."""
        if not isinstance(raw, Mapping):
            return None

        def number(key: str, default: float = float("nan")) -> float:
            value = raw.get(key)
            return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else default

        names = ("task", "metric", "model_a", "adapter_a", "model_b", "adapter_b")
        if not all(isinstance(raw.get(k), str) and raw.get(k) for k in names):
            return None
        difference = number("difference")
        fraction = number("label_fraction")
        if math.isnan(difference) or math.isnan(fraction):
            return None
        return cls(
            **{k: raw[k] for k in names},
            label_fraction=fraction,
            value_a=number("value_a"),
            value_b=number("value_b"),
            difference=difference,
            ci_low=number("ci_low"),
            ci_high=number("ci_high"),
            share_opposite=number("share_opposite"),
            n_seeds=int(number("n_seeds", 0)),
            confidence=number("confidence", 0.95),
        )

    @property
    def has_ci(self) -> bool:
        return math.isfinite(self.ci_low) and math.isfinite(self.ci_high)

    @property
    def significant(self) -> bool | None:
        """Whether the CI excludes 0; None without a CI."""
        return bool(self.ci_low > 0 or self.ci_high < 0) if self.has_ci else None


def comparisons_from_metadata(metadata: Mapping[str, Any]) -> list[Comparison]:
    """The well-formed entries of metadata["comparisons"], in file order."""
    raw = metadata.get("comparisons")
    if not isinstance(raw, list):
        return []
    return [c for c in (Comparison.from_mapping(item) for item in raw) if c is not None]


def _num(value: float, digits: int = 3) -> str:
    # A real minus sign: the hyphen reads as a dash in running text ("CI -0.02 to 0.05").
    return _fmt(value, digits).replace("-", "−")


def _level(confidence: float) -> str:
    return f"{confidence * 100:.4g}%"


def describe_comparison(c: Comparison) -> tuple[str, str, str]:
    """A plain-language sentence about ``c``, split as (lead, verdict, detail) so HTML can style the verdict.

    The sentence is ``f"{lead}: {verdict}{detail}."``. It names the better side first, so the gap and its CI are
    read as "how much better"; for lower-is-better metrics (ECE) a negative A − B means A is better.
    """
    a, b = f"{c.model_a} + {c.adapter_a}", f"{c.model_b} + {c.adapter_b}"
    lower = c.metric in LOWER_IS_BETTER
    # Gain of A over B in the metric's good direction, with its CI flipped alongside.
    gain, lo, hi = (-c.difference, -c.ci_high, -c.ci_low) if lower else (c.difference, c.ci_low, c.ci_high)
    if gain < 0:
        a, b, gain, lo, hi = b, a, -gain, -hi, -lo
    metric = metric_label(c.metric) + (" (lower is better)" if lower else "")
    where = f"At {format_fraction(c.label_fraction)} labels"
    ci = f"{_level(c.confidence)} CI {_num(lo)} to {_num(hi)}"
    significant = c.significant
    if significant:
        return f"{where}, {a} beats {b} on {metric} by {_num(gain)} ({ci})", "significant", ""
    if gain == 0:
        lead = f"{where}, {a} and {b} tie on {metric} (difference {_num(0.0)})"
    else:
        lead = f"{where}, {a} is ahead of {b} on {metric} by {_num(gain)}"
    if significant is None:
        return lead, "not judged", " (no confidence interval)"
    return lead, "not significant", f" ({ci} includes 0)"


def comparison_sentence(c: Comparison) -> str:
    """``describe_comparison`` as one plain-text sentence."""
    lead, verdict, detail = describe_comparison(c)
    return f"{lead}: {verdict}{detail}."


def _comparison_order(c: Comparison) -> tuple[Any, ...]:
    return (c.label_fraction, c.metric, c.model_a, _adapter_key(c.adapter_a), c.model_b, _adapter_key(c.adapter_b))


def _comparisons_html(comparisons: list[Comparison], colours: Mapping[str, str]) -> str:
    """Bulleted verdicts plus a compact table of differences, ordered by label fraction."""
    ordered = sorted(comparisons, key=_comparison_order)

    def item(c: Comparison) -> str:
        lead, verdict, detail = describe_comparison(c)
        cls = "sig" if c.significant else "nonsig"
        return f'<li>{_esc(lead)}: <span class="{cls}">{_esc(verdict)}</span>{_esc(detail)}.</li>'

    # A reader wants the differences that hold first; the rest stay one click away, not in their way.
    significant = [c for c in ordered if c.significant]
    others = [c for c in ordered if not c.significant]
    headline = (
        f"<p><b>{len(significant)} of {len(ordered)}</b> paired comparisons are significant "
        f"(their confidence interval excludes 0).</p>"
    )
    listed = f"<ul>{''.join(item(c) for c in significant)}</ul>" if significant else ""
    folded = (
        f"<details><summary>{len(others)} not significant</summary><ul>{''.join(item(c) for c in others)}</ul>"
        "</details>"
        if others
        else ""
    )
    note = (
        '<p class="note">Paired bootstrap on the same test cases (patients resampled for both sides at once), '
        "averaged over seeds. A difference is significant when its confidence interval excludes 0. With many "
        "comparisons some will pass by chance (about 1 in 20 of the true ties at 95%): read this as where to look, "
        "not as proof.</p>"
    )
    rows = []
    for c in ordered:

        def side(model: str, adapter: str) -> str:
            swatch = f'<span class="swatch" style="background:{colours.get(model, "#999")}"></span>'
            return f"{swatch}{_esc(model)} + {_esc(adapter)}"

        ci = f"[{_num(c.ci_low)}, {_num(c.ci_high)}]" if c.has_ci else "n/a"
        verdict = {True: "significant", False: "not significant", None: "not judged"}[c.significant]
        cls = "sig" if c.significant else "nonsig"
        rows.append(
            f'<tr><td class="frac">{format_fraction(c.label_fraction)}</td><td>{_esc(metric_label(c.metric))}</td>'
            f'<td class="name">{side(c.model_a, c.adapter_a)}</td><td class="name">{side(c.model_b, c.adapter_b)}</td>'
            f'<td class="diff">{_num(c.value_a)}</td><td class="diff">{_num(c.value_b)}</td>'
            f'<td class="diff"><b>{_num(c.difference)}</b></td>'
            f'<td class="diff">{_esc(_level(c.confidence))} {ci}</td>'
            f'<td class="diff">{_num(c.share_opposite)}</td><td class="num">{c.n_seeds}</td>'
            f'<td><span class="{cls}">{verdict}</span></td></tr>'
        )
    table = (
        '<div class="table-wrap"><table><thead><tr><th>Labels</th><th>Metric</th><th>A</th><th>B</th>'
        '<th class="num">A</th><th class="num">B</th><th class="num">A − B</th><th class="num">CI of A − B</th>'
        '<th class="num">Opposite sign</th><th class="num">Seeds</th><th>Result</th></tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></div>"
        '<p class="note">Opposite sign: share of bootstrap resamples whose difference has the sign opposite to the '
        "observed one (how often the ranking would flip). For ECE lower is better, so a negative A − B favours A.</p>"
    )
    return f'<div class="summary">{headline}{listed}{folded}{note}</div><h3>Paired comparisons</h3>{table}'


# ------------------------------------------------------------------------------------------ tables


def _cell_colour(t: float) -> str:
    # Light-to-mid green ramp: the best cell of a group is the most saturated, text stays readable.
    lightness = 97 - 19 * t
    return f"hsl(158, 48%, {lightness:.0f}%)"


def _metric_cell(row: Mapping[str, Any], metric: str, value_range: tuple[float, float], many: bool) -> str:
    value = row[metric]
    if math.isnan(value):
        return '<td class="metric"><span class="mean">—</span></td>'
    lo_v, hi_v = value_range
    best_v = lo_v if metric in LOWER_IS_BETTER else hi_v
    is_best = value == best_v and many
    # t = 1 for the best value whichever direction is better, so shading always means "better".
    t = abs(value - (hi_v if metric in LOWER_IS_BETTER else lo_v)) / (hi_v - lo_v) if hi_v > lo_v else 0.5
    sd = row[f"{metric}_sd"]
    sd_html = "" if math.isnan(sd) else f' <span class="sd">± {sd:.3f}</span>'
    lo, hi = row[f"{metric}_ci_low"], row[f"{metric}_ci_high"]
    ci_html = (
        '<span class="ci">CI n/a</span>'
        if math.isnan(lo) or math.isnan(hi)
        else f'<span class="ci">[{lo:.3f}, {hi:.3f}]</span>'
    )
    mean_html = f'<span class="mean">{value:.3f}</span>'
    if is_best:
        mean_html = f"<strong>{mean_html}</strong>"
    cls = "metric best" if is_best else "metric"
    return f'<td class="{cls}" style="background:{_cell_colour(t)}">{mean_html}{sd_html}{ci_html}</td>'


def _table_html(rows: list[dict[str, Any]], colours: Mapping[str, str], metrics: list[str] | None = None) -> str:
    metrics = table_metrics(rows) if metrics is None else metrics
    head = "".join(f"<th>{_esc(metric_label(m))}{' ↓' if m in LOWER_IS_BETTER else ''}</th>" for m in metrics)
    parts = [
        '<div class="table-wrap"><table><thead><tr><th>Labels</th><th>Model</th><th>Adapter</th>'
        f'<th class="num">Seeds</th><th class="num">n train</th>{head}</tr></thead>'
    ]
    for fraction in sorted({r["label_fraction"] for r in rows}):
        group = [r for r in rows if r["label_fraction"] == fraction]
        ranges: dict[str, tuple[float, float]] = {}
        for m in metrics:
            vals = [r[m] for r in group if not math.isnan(r[m])]
            if vals:
                ranges[m] = (min(vals), max(vals))
        parts.append("<tbody>")
        for i, row in enumerate(group):
            cells = []
            if i == 0:
                cells.append(f'<td class="frac" rowspan="{len(group)}">{format_fraction(fraction)}</td>')
            swatch = f'<span class="swatch" style="background:{colours[row["model"]]}"></span>'
            cells.append(
                f'<td class="name">{swatch}{_esc(row["model"])}</td><td class="name">{_esc(row["adapter"])}</td>'
            )
            cells.append(f'<td class="num">{row["n_seeds"]}</td><td class="num">{row["n_train"]}</td>')
            cells.extend(_metric_cell(row, m, ranges.get(m, (0.0, 0.0)), len(group) > 1) for m in metrics)
            parts.append(f"<tr>{''.join(cells)}</tr>")
        parts.append("</tbody>")
    parts.append("</table></div>")
    return "".join(parts)


# ------------------------------------------------------------------------------------------ render


def _img_html(fig: Figure, alt: str) -> str:
    return f'<img alt="{_esc(alt)}" src="data:image/png;base64,{_png_base64(fig)}">'


def _ladder_html(
    res: ResultsFile, task: str, metric: str, colours: Mapping[str, str], styles: Mapping[str, tuple[Any, str]]
) -> str:
    fraction, points = ladder_points(res.records, task, metric)
    if fraction is None:
        return ""
    title = f"Adaptation ladder — {metric_label(metric)} at {format_fraction(fraction)} labels — {task}"
    fig = plot_adaptation_ladder(points, metric, colours, styles, title)
    if fig is None:
        return ""
    alt = f"{metric_label(metric)} versus trainable parameters and fit time for {task}"
    return (
        f'<h3>Adaptation ladder</h3><figure class="ladder">{_img_html(fig, alt)}</figure>'
        '<p class="note">One point per model and adapter: mean over seeds with the mean confidence interval as '
        "error bar. Zero trainable parameters (kNN, prototypes) are drawn at the left edge labelled 0; fit time "
        "excludes embedding, which all adapters of an encoder share.</p>"
    )


def _task_html(
    res: ResultsFile,
    task: str,
    task_rows: list[dict[str, Any]],
    comparisons: list[Comparison],
    colours: Mapping[str, str],
    styles: Mapping[str, tuple[Any, str]],
) -> str:
    # summarise_table has a column for every metric of the file; keep those this task has records of.
    present = {r.metric for r in res.records if r.task == task}
    metrics = [m for m in table_metrics(task_rows) if m in present]
    headline = primary_metric(task, metrics, res.metadata)
    body: list[str] = []
    if comparisons:
        body.append(f"<h3>Summary</h3>{_comparisons_html(comparisons, colours)}")
    elif summary := _summary_html(task_rows, headline):
        body.append(f"<h3>Summary</h3>{summary}")
    plot_metrics = [m for m in REPORT_METRICS if m in metrics]
    if headline is not None and headline not in plot_metrics:
        plot_metrics.insert(0, headline)
    if plot_metrics:
        body.append('<h3>Label efficiency</h3><div class="plots">')
        for metric in plot_metrics:
            fig = plot_label_efficiency(task_rows, metric, colours, styles, f"{metric_label(metric)} — {task}")
            body.append(
                f"<figure>{_img_html(fig, f'{metric_label(metric)} versus label fraction for {task}')}</figure>"
            )
        body.append("</div>")
    if headline is not None:
        body.append(_ladder_html(res, task, headline, colours, styles))
    body.append("<h3>Results table</h3>")
    body.append(_table_html(task_rows, colours, metrics))
    body.append(
        '<p class="note">Each cell: mean over seeds ± standard deviation across seeds, and below it the '
        "bootstrap confidence interval (patients resampled; mean of the per-seed bounds). The best mean "
        "per label fraction is in bold (lowest for metrics marked ↓, highest otherwise); shading ranks the rows "
        "within each fraction, darker is better. Plots show the same means with the interval as a shaded band.</p>"
    )
    return "".join(body)


def render_report(results: ResultsFile | Path | str, out_html: Path | str, title: str = "medfoundry report") -> Path:
    """Render ``results`` (object or results.json path) to a self-contained HTML file, written atomically."""
    res = _load(results)
    rows = summarise_table(res)
    colours, styles = _styles(rows)
    comparisons = comparisons_from_metadata(res.metadata)
    body: list[str] = [_header_html(res, rows, title)]

    if not rows:
        body.append('<p class="note">The results file contains no records.</p>')
    tasks = sorted({r["task"] for r in rows})
    for task in tasks:
        if len(tasks) > 1:
            body.append(f"<h2>Task: {_esc(task)}</h2>")
        task_rows = [r for r in rows if r["task"] == task]
        task_comparisons = [c for c in comparisons if c.task == task]
        body.append(_task_html(res, task, task_rows, task_comparisons, colours, styles))

    body.append(_durations_html(res.metadata))
    body.append(f"<footer>Generated by medfoundry from results.json (schema version {res.schema_version}).</footer>")
    document = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_esc(title)}</title><style>{_CSS}</style></head>"
        f"<body><main>{''.join(body)}</main></body></html>\n"
    )
    return write_text_atomic(Path(out_html), document)
