"""Seed-aggregated tables of results.json and the plain-language verdicts read from them.

Everything here is data or plain text; HTML and figures are built from it elsewhere, so the terminal, Markdown
and the HTML report always show the same numbers.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medfoundry.evaluate.metrics import LOWER_IS_BETTER
from medfoundry.evaluate.results import ResultRecord, ResultsFile, read_results

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
# Cheapest to most expensive rung of the adaptation ladder: adapters keep this order (and so their line
# style and marker) in every legend, whatever subset a file holds. Unknown adapters follow alphabetically.
ADAPTER_ORDER: tuple[str, ...] = ("knn", "fewshot", "linear", "mlp", "finetune-lora", "finetune-full", "supervised")

Row = dict[str, Any]


def load(results: ResultsFile | Path | str) -> ResultsFile:
    """``results`` itself, or the results.json it names."""
    return results if isinstance(results, ResultsFile) else read_results(results)


def nanmean(values: Iterable[float]) -> float:
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


def adapter_key(adapter: str) -> tuple[int, str]:
    """Sort key putting adapters in ``ADAPTER_ORDER``, unknown ones alphabetically after."""
    return (ADAPTER_ORDER.index(adapter) if adapter in ADAPTER_ORDER else len(ADAPTER_ORDER), adapter)


def metric_label(metric: str) -> str:
    """Human-readable metric name, e.g. 'auroc' -> 'AUROC'; unknown names are shown as they are."""
    return METRIC_LABELS.get(metric, metric)


def axis_label(metric: str) -> str:
    """``metric_label`` plus a note when lower values are better."""
    return metric_label(metric) + (" (lower is better)" if metric in LOWER_IS_BETTER else "")


def better(metric: str, a: float, b: float) -> bool:
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


def summarise_table(results: ResultsFile | Path | str) -> list[Row]:
    """One row per (task, model, adapter, label fraction), aggregated over seeds.

    Each row has ``task``, ``model``, ``adapter``, ``label_fraction``, ``n_seeds``, ``n_train``,
    ``n_test`` and, for every metric in the file, ``<metric>`` (mean over seeds), ``<metric>_sd``
    (sample sd across seeds, NaN for one seed), ``<metric>_ci_low`` and ``<metric>_ci_high`` (means of
    the per-seed CI bounds). Metrics missing for a row are NaN. Rows are sorted by task, fraction,
    model and adapter (cheapest rung of ``ADAPTER_ORDER`` first, unknown adapters alphabetically after).
    """
    res = load(results)
    metrics = _ordered_metrics(r.metric for r in res.records)
    groups: dict[tuple[str, str, str, float], list[ResultRecord]] = defaultdict(list)
    for rec in res.records:
        groups[(rec.task, rec.model, rec.adapter, rec.label_fraction)].append(rec)

    rows: list[Row] = []
    for key in sorted(groups, key=lambda k: (k[0], k[3], k[1], adapter_key(k[2]))):
        task, model, adapter, fraction = key
        recs = groups[key]
        row: Row = {
            "task": task,
            "model": model,
            "adapter": adapter,
            "label_fraction": fraction,
            "n_seeds": len({r.seed for r in recs}),
            "n_train": round(nanmean(float(r.n_train) for r in recs)),
            "n_test": round(nanmean(float(r.n_test) for r in recs)),
        }
        for metric in metrics:
            of_metric = [r for r in recs if r.metric == metric]
            row[metric] = nanmean(r.value for r in of_metric)
            row[f"{metric}_sd"] = _nanstd(r.value for r in of_metric)
            row[f"{metric}_ci_low"] = nanmean(r.ci_low for r in of_metric)
            row[f"{metric}_ci_high"] = nanmean(r.ci_high for r in of_metric)
        rows.append(row)
    return rows


def table_metrics(rows: list[Row]) -> list[str]:
    """The metric names present as columns in ``summarise_table`` rows, in report order."""
    keys: set[str] = set()
    for row in rows:
        keys.update(k for k in row if f"{k}_sd" in row)
    return _ordered_metrics(keys)


def format_fraction(fraction: float) -> str:
    """0.01 -> '1%', 0.005 -> '0.5%', 1.0 -> '100%'."""
    return f"{fraction * 100:.4g}%"


def format_number(value: float | None, digits: int = 3) -> str:
    """``value`` with ``digits`` decimals, or an em dash when it is missing."""
    return "—" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def format_summary_text(rows: list[Row]) -> str:
    """A plain-text table of ``summarise_table`` rows (mean ± sd per metric) for terminal output."""
    metrics = table_metrics(rows)
    header = ["task", "model", "adapter", "labels", "seeds"] + [metric_label(m) for m in metrics]
    body = []
    for row in rows:
        cells = [row["task"], row["model"], row["adapter"], format_fraction(row["label_fraction"])]
        cells.append(str(row["n_seeds"]))
        for m in metrics:
            sd = row[f"{m}_sd"]
            cells.append(format_number(row[m]) + ("" if math.isnan(sd) else f" ± {sd:.3f}"))
        body.append(cells)
    widths = [max(len(str(c)) for c in col) for col in zip(header, *body, strict=True)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) for cells in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def format_markdown_tables(results: ResultsFile | Path | str, metrics: Mapping[str, str] | None = None) -> str:
    """Markdown tables for pasting into a paper draft or an issue: per task, its headline metric (``metrics``, else
    ``metadata["primary_metric"]``, else the first in report order) as mean over seeds with the mean CI, one
    row per (model, adapter) and one column per label fraction."""
    res = load(results)
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
        lines = [
            f"**{task}**: {metric_label(metric)}, mean over seeds [mean 95% CI]",
            "",
            "| model | adapter | " + " | ".join(format_fraction(f) for f in fractions) + " |",
            "|---|---|" + "---|" * len(fractions),
        ]
        by_key = {(r["model"], r["adapter"], r["label_fraction"]): r for r in task_rows}
        for model, adapter in dict.fromkeys((row["model"], row["adapter"]) for row in task_rows):
            cells = []
            for fraction in fractions:
                row = by_key.get((model, adapter, fraction))
                cells.append(
                    ""
                    if row is None
                    else f"{format_number(row[metric])} "
                    f"[{format_number(row[metric + '_ci_low'])}, {format_number(row[metric + '_ci_high'])}]"
                )
            lines.append(f"| {model} | {adapter} | " + " | ".join(cells) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


@dataclass(frozen=True)
class Leader:
    """The best (model, adapter) at one label fraction and how it stands against the runner-up.

    ``overlap`` is whether their separate CIs overlap (None when a bound is missing); without a runner-up
    the leader is the only entry and ``runner_up`` is None.
    """

    fraction: float
    best: Row
    runner_up: Row | None
    overlap: bool | None


def _ci_overlap(a: Mapping[str, Any], b: Mapping[str, Any], metric: str) -> bool | None:
    bounds = [a[f"{metric}_ci_low"], a[f"{metric}_ci_high"], b[f"{metric}_ci_low"], b[f"{metric}_ci_high"]]
    if any(math.isnan(v) for v in bounds):
        return None
    return bounds[0] <= bounds[3] and bounds[2] <= bounds[1]


def leaders(rows: list[Row], metric: str) -> list[Leader]:
    """Per label fraction with a value of ``metric``, the best row judged against the runner-up by CI overlap."""
    lower = metric in LOWER_IS_BETTER
    out = []
    for fraction in sorted({r["label_fraction"] for r in rows}):
        ranked = sorted(
            (r for r in rows if r["label_fraction"] == fraction and not math.isnan(r[metric])),
            key=lambda r: r[metric],
            reverse=not lower,
        )
        if ranked:
            second = ranked[1] if len(ranked) > 1 else None
            overlap = _ci_overlap(ranked[0], second, metric) if second is not None else None
            out.append(Leader(fraction, ranked[0], second, overlap))
    return out


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
            value=nanmean(r.value for r in group),
            ci_low=nanmean(r.ci_low for r in group),
            ci_high=nanmean(r.ci_high for r in group),
            trainable_params=mean_of([r.trainable_params for r in group]),
            fit_seconds=mean_of([r.fit_seconds for r in group]),
        )
        for (model, adapter), group in sorted(groups.items(), key=lambda kv: (kv[0][0], adapter_key(kv[0][1])))
    ]
    return fraction, points
