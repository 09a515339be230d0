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
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, NullLocator

from medfoundry.evaluate.results import ResultRecord, ResultsFile, read_results
from medfoundry.io_utils import write_text_atomic

# Plotted and tabulated in this order; any other metric in the file is tabulated after these.
REPORT_METRICS: tuple[str, ...] = ("auroc", "balanced_accuracy", "accuracy")
METRIC_LABELS: dict[str, str] = {
    "auroc": "AUROC",
    "balanced_accuracy": "Balanced accuracy",
    "accuracy": "Accuracy",
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
_ADAPTER_STYLES: tuple[tuple[str, str], ...] = (
    ("-", "o"),
    ("--", "s"),
    (":", "^"),
    ("-.", "D"),
    ((0, (5, 1, 1, 1)), "v"),
    ((0, (1, 3)), "P"),
)


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
    return [m for m in REPORT_METRICS if m in present] + sorted(present - set(REPORT_METRICS))


def summarise_table(results: ResultsFile | Path | str) -> list[dict[str, Any]]:
    """One row per (task, model, adapter, label fraction), aggregated over seeds.

    Each row has ``task``, ``model``, ``adapter``, ``label_fraction``, ``n_seeds``, ``n_train``,
    ``n_test`` and, for every metric in the file, ``<metric>`` (mean over seeds), ``<metric>_sd``
    (sample sd across seeds, NaN for one seed), ``<metric>_ci_low`` and ``<metric>_ci_high`` (means of
    the per-seed CI bounds). Metrics missing for a row are NaN. Rows are sorted by task, fraction,
    model and adapter.
    """
    res = _load(results)
    metrics = _ordered_metrics(r.metric for r in res.records)
    groups: dict[tuple[str, str, str, float], list[ResultRecord]] = defaultdict(list)
    for rec in res.records:
        groups[(rec.task, rec.model, rec.adapter, rec.label_fraction)].append(rec)

    rows: list[dict[str, Any]] = []
    for key in sorted(groups, key=lambda k: (k[0], k[3], k[1], k[2])):
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


# --------------------------------------------------------------------------------------------- plots


def _styles(rows: list[dict[str, Any]]) -> tuple[dict[str, str], dict[str, tuple[Any, str]]]:
    """Colour per model and (line style, marker) per adapter, fixed across all plots of the report."""
    models = sorted({r["model"] for r in rows})
    adapters = sorted({r["adapter"] for r in rows})
    colours = {m: _MODEL_COLOURS[i % len(_MODEL_COLOURS)] for i, m in enumerate(models)}
    styles = {a: _ADAPTER_STYLES[i % len(_ADAPTER_STYLES)] for i, a in enumerate(adapters)}
    return colours, styles


def _png_base64(fig: Figure) -> str:
    buf = io.BytesIO()
    # No Software metadata: it carries a URL and the report should hold no external addresses at all.
    fig.savefig(buf, format="png", dpi=150, metadata={"Software": None})
    return base64.b64encode(buf.getvalue()).decode("ascii")


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
    ncol = 2 if len(series) > 3 else max(1, len(series))
    legend_rows = math.ceil(len(series) / ncol)
    # The legend sits below the axes; grow the figure with it so many series do not squash the plot.
    fig = Figure(figsize=(6.4, 4.2 + 0.22 * legend_rows), layout="constrained")
    ax = fig.add_subplot()
    # Overlapping bands turn muddy with many series, so each gets fainter as their number grows.
    band_alpha = 0.12 if len(series) <= 4 else 0.06
    fractions = sorted({r["label_fraction"] for rs in series.values() for r in rs})

    for (model, adapter), srows in sorted(series.items()):
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
            linewidth=2.0,
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
    ax.set_ylabel(METRIC_LABELS.get(metric, metric), fontsize=10)
    ax.set_title(title, fontsize=12, loc="left", fontweight="bold", color="#222")
    ax.grid(True, which="major", color="#e3e6ea", linewidth=0.8, zorder=0)
    ax.tick_params(labelsize=9, colors="#333")
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    for side in ("left", "bottom"):
        ax.spines[side].set_color("#9aa1a9")
    if series:
        fig.legend(
            loc="outside lower center",
            ncol=ncol,
            fontsize=9,
            frameon=False,
            handlelength=3.0,
            columnspacing=1.6,
        )
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
td.frac { font-weight: 600; white-space: nowrap; }
td.num { text-align: right; color: var(--muted); }
td.metric { white-space: nowrap; }
td.metric .sd { color: var(--muted); font-size: 12.5px; }
td.metric .ci { display: block; color: var(--muted); font-size: 12px; }
td.metric.best .mean { font-weight: 700; color: #000; }
.swatch { display: inline-block; width: 10px; height: 10px; border-radius: 2px; margin-right: 7px; }
.note { color: var(--muted); font-size: 13px; margin-top: 10px; }
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
    durations = meta.get("durations")
    if isinstance(durations, Mapping) and durations:
        parts = [
            f"{name}: {_format_duration(float(v))}"
            for name, v in durations.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        ]
        if parts:
            items.append(("Durations", " · ".join(parts)))
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


def _summary_html(rows: list[dict[str, Any]]) -> str:
    metrics = table_metrics(rows)
    # AUROC is the headline metric; fall back so a file without it still gets a summary.
    headline = next((m for m in ("auroc", "balanced_accuracy", "accuracy") if m in metrics), None)
    if headline is None:
        return ""
    label = METRIC_LABELS.get(headline, headline)
    items: list[str] = []
    for fraction in sorted({r["label_fraction"] for r in rows}):
        ranked = sorted(
            (r for r in rows if r["label_fraction"] == fraction and not math.isnan(r[headline])),
            key=lambda r: r[headline],
            reverse=True,
        )
        if not ranked:
            continue
        best = ranked[0]
        best_txt = (
            f"<b>{_esc(best['model'])} + {_esc(best['adapter'])}</b> has the highest {label} "
            f"({_fmt(best[headline])}, CI {_fmt(best[f'{headline}_ci_low'])}–"
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
    return f'<div class="summary"><ul>{"".join(items)}</ul></div>'


def _cell_colour(t: float) -> str:
    # Light-to-mid green ramp: the best cell of a group is the most saturated, text stays readable.
    lightness = 97 - 19 * t
    return f"hsl(158, 48%, {lightness:.0f}%)"


def _table_html(rows: list[dict[str, Any]], colours: Mapping[str, str]) -> str:
    metrics = table_metrics(rows)
    head = "".join(f"<th>{_esc(METRIC_LABELS.get(m, m))}</th>" for m in metrics)
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
            cells.append(f"<td>{swatch}{_esc(row['model'])}</td><td>{_esc(row['adapter'])}</td>")
            cells.append(f'<td class="num">{row["n_seeds"]}</td><td class="num">{row["n_train"]}</td>')
            for m in metrics:
                value = row[m]
                if math.isnan(value):
                    cells.append('<td class="metric"><span class="mean">—</span></td>')
                    continue
                lo_v, hi_v = ranges[m]
                is_best = value == hi_v and len(group) > 1
                t = (value - lo_v) / (hi_v - lo_v) if hi_v > lo_v else 0.5
                sd = row[f"{m}_sd"]
                sd_html = "" if math.isnan(sd) else f' <span class="sd">± {sd:.3f}</span>'
                lo, hi = row[f"{m}_ci_low"], row[f"{m}_ci_high"]
                ci_html = (
                    '<span class="ci">CI n/a</span>'
                    if math.isnan(lo) or math.isnan(hi)
                    else f'<span class="ci">[{lo:.3f}, {hi:.3f}]</span>'
                )
                mean_html = f'<span class="mean">{value:.3f}</span>'
                if is_best:
                    mean_html = f"<strong>{mean_html}</strong>"
                cls = "metric best" if is_best else "metric"
                style = f"background:{_cell_colour(t)}"
                cells.append(f'<td class="{cls}" style="{style}">{mean_html}{sd_html}{ci_html}</td>')
            parts.append(f"<tr>{''.join(cells)}</tr>")
        parts.append("</tbody>")
    parts.append("</table></div>")
    return "".join(parts)


def render_report(results: ResultsFile | Path | str, out_html: Path | str, title: str = "medfoundry report") -> Path:
    """Render ``results`` (object or results.json path) to a self-contained HTML file, written atomically."""
    res = _load(results)
    rows = summarise_table(res)
    colours, styles = _styles(rows)
    body: list[str] = [_header_html(res, rows, title)]

    if not rows:
        body.append('<p class="note">The results file contains no records.</p>')
    tasks = sorted({r["task"] for r in rows})
    for task in tasks:
        task_rows = [r for r in rows if r["task"] == task]
        metrics = table_metrics(task_rows)
        if len(tasks) > 1:
            body.append(f"<h2>Task: {_esc(task)}</h2>")
        summary = _summary_html(task_rows)
        if summary:
            body.append(f"<h3>Summary</h3>{summary}")
        plot_metrics = [m for m in REPORT_METRICS if m in metrics]
        if plot_metrics:
            body.append('<h3>Label efficiency</h3><div class="plots">')
            for metric in plot_metrics:
                fig = plot_label_efficiency(task_rows, metric, colours, styles, f"{METRIC_LABELS[metric]} — {task}")
                alt = f"{METRIC_LABELS[metric]} versus label fraction for {task}"
                body.append(f'<figure><img alt="{_esc(alt)}" src="data:image/png;base64,{_png_base64(fig)}"></figure>')
            body.append("</div>")
        body.append("<h3>Results table</h3>")
        body.append(_table_html(task_rows, colours))
        body.append(
            '<p class="note">Each cell: mean over seeds ± standard deviation across seeds, and below it the '
            "bootstrap confidence interval (patients resampled; mean of the per-seed bounds). The best mean "
            "per label fraction is in bold; shading ranks the rows within each fraction. Plots show the "
            "same means with the interval as a shaded band.</p>"
        )

    body.append(f"<footer>Generated by medfoundry from results.json (schema version {res.schema_version}).</footer>")
    document = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_esc(title)}</title><style>{_CSS}</style></head>"
        f"<body><main>{''.join(body)}</main></body></html>\n"
    )
    return write_text_atomic(Path(out_html), document)
