"""The page header: title, dataset, tasks, dates, durations and versions, and counts as chips.

Only these whitelisted metadata keys are shown, so nothing patient-level in a config can leak into the report.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from markupsafe import Markup

from medfoundry.report.context import ReportContext
from medfoundry.report.sections.run_time import MAX_HEADER_DURATIONS, durations
from medfoundry.report.templating import format_duration, render


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


def _meta_items(ctx: ReportContext) -> list[tuple[str, str]]:
    meta = ctx.results.metadata
    items: list[tuple[str, str]] = []
    if (dataset := _dataset_name(meta)) is not None:
        items.append(("Dataset", dataset))
    if tasks := ctx.tasks:
        items.append(("Task" if len(tasks) == 1 else "Tasks", ", ".join(tasks)))
    task_meta = meta.get("tasks")
    if isinstance(task_meta, Mapping):
        for name, entry in task_meta.items():
            if not isinstance(entry, Mapping):
                continue
            label = "Splits" if len(task_meta) == 1 else f"Splits ({name})"
            if (grouping := _scalar(entry.get("grouping"))) is not None:
                items.append((label, grouping))
            for warning in entry.get("warnings") or []:
                if (text := _scalar(warning)) is not None:
                    items.append(("⚠ Warning", text))
    if (created := _scalar(meta.get("created"))) is not None:
        items.append(("Created", created.replace("T", " ")))
    stages = durations(meta)
    if 0 < len(stages) <= MAX_HEADER_DURATIONS:
        items.append(("Durations", " · ".join(f"{name}: {format_duration(v)}" for name, v in stages)))
    versions = meta.get("versions")
    if isinstance(versions, Mapping) and versions:
        items.append(("Versions", " · ".join(f"{k} {v}" for k, v in versions.items() if _scalar(v) is not None)))
    return items


def _chips(ctx: ReportContext) -> list[tuple[str, str]]:
    rows = ctx.rows
    chips = [
        (str(len({r["model"] for r in rows})), "models"),
        (str(len({r["adapter"] for r in rows})), "adapters"),
        (str(len({r["label_fraction"] for r in rows})), "label fractions"),
        (str(max((r["n_seeds"] for r in rows), default=0)), "seeds"),
        (str(len(ctx.results.records)), "records"),
    ]
    if n_test := sorted({r["n_test"] for r in rows}):
        chips.append((str(n_test[0]) if len(n_test) == 1 else f"{n_test[0]}–{n_test[-1]}", "test samples"))
    return chips


def header(ctx: ReportContext) -> Markup:
    """Title, run metadata and the size of the grid."""
    return render("sections/header.html.j2", title=ctx.title, items=_meta_items(ctx), chips=_chips(ctx))
