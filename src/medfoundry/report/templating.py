"""The Jinja2 environment of the report: templates shipped in ``templates/``, autoescaped, strict.

Autoescaping is on for every template because model, adapter and task names come from user configs and land
in the page verbatim; a fragment that is already HTML is passed as ``Markup`` and left alone.
"""

from __future__ import annotations

import math
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined
from markupsafe import Markup

from medfoundry.report.comparisons import confidence_level, describe_comparison, signed_number
from medfoundry.report.plots import png_base64
from medfoundry.report.summary import format_fraction, format_number, metric_label


def format_duration(seconds: float) -> str:
    """125 -> '2 min 05 s', 3700 -> '1 h 01 min'; an em dash for anything that is not a number."""
    if not isinstance(seconds, int | float) or math.isnan(seconds):
        return "—"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


_ENV = Environment(
    loader=PackageLoader("medfoundry.report", "templates"),
    autoescape=True,
    # A misspelt variable must fail the render, not silently print nothing in a report someone trusts.
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
)
_ENV.filters.update(
    number=format_number,
    signed=signed_number,
    fraction=format_fraction,
    metric_label=metric_label,
    duration=format_duration,
    level=confidence_level,
    describe=describe_comparison,
    png_base64=png_base64,
)


def render(template: str, **context: Any) -> Markup:
    """``template`` (a path under ``templates/``) rendered with ``context``, as HTML that is safe to embed."""
    return Markup(_ENV.get_template(template).render(**context))
