"""Stage durations from metadata["durations"]: a few go on the header line, many get their own table."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from markupsafe import Markup

from medfoundry.report.context import ReportContext
from medfoundry.report.templating import render

# A few stage durations fit on one header line; a suite run's per-task and per-encoder ones get a table.
MAX_HEADER_DURATIONS = 4


def durations(metadata: Mapping[str, Any]) -> list[tuple[str, float]]:
    """metadata["durations"] as (name, seconds), nested objects flattened to "a/b" names."""

    def flatten(prefix: str, value: Any) -> Iterable[tuple[str, float]]:
        if isinstance(value, Mapping):
            for key, sub in value.items():
                yield from flatten(f"{prefix}/{key}" if prefix else str(key), sub)
        elif isinstance(value, int | float) and not isinstance(value, bool) and prefix:
            yield prefix, float(value)

    raw = metadata.get("durations")
    return list(flatten("", raw)) if isinstance(raw, Mapping) else []


def run_time(ctx: ReportContext) -> Markup:
    """The table of stage durations, when there are too many for the header."""
    stages = durations(ctx.results.metadata)
    if len(stages) <= MAX_HEADER_DURATIONS:
        return Markup()
    return render("sections/run_time.html.j2", durations=stages)
