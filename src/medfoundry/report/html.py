"""report.html: the sections, in order, inside one self-contained page.

The report has to be readable offline and shareable as one file (attached to an email, archived next to the
results), so plots are embedded as base64 PNGs, CSS is inline and nothing is fetched from anywhere.
"""

from __future__ import annotations

from pathlib import Path

from markupsafe import Markup

from medfoundry.evaluate.results import ResultsFile
from medfoundry.io_utils import write_text_atomic
from medfoundry.report.context import ReportContext, Section, TaskSection
from medfoundry.report.sections.calibration import calibration
from medfoundry.report.sections.header import header
from medfoundry.report.sections.health import pretraining_health
from medfoundry.report.sections.plots import adaptation_ladder, label_efficiency
from medfoundry.report.sections.results_table import results_table
from medfoundry.report.sections.robustness import robustness
from medfoundry.report.sections.run_time import run_time
from medfoundry.report.sections.subgroups import subgroups
from medfoundry.report.sections.summary import summary
from medfoundry.report.sections.survival import survival_curves
from medfoundry.report.sections.verdict import verdict
from medfoundry.report.summary import load
from medfoundry.report.templating import render

# What each task shows, top to bottom.
TASK_SECTIONS: list[TaskSection] = [
    verdict,
    summary,
    label_efficiency,
    adaptation_ladder,
    survival_curves,
    calibration,
    subgroups,
    robustness,
    results_table,
]


def tasks(ctx: ReportContext) -> Markup:
    """Every task's TASK_SECTIONS, under a heading per task when the file holds more than one."""
    per_task = [(task, [section(ctx.for_task(task)) for section in TASK_SECTIONS]) for task in ctx.tasks]
    return render("tasks.html.j2", tasks=per_task)


# What the page shows, top to bottom; the footer is part of the page template.
REPORT_SECTIONS: list[Section] = [header, tasks, pretraining_health, run_time]


def render_report(results: ResultsFile | Path | str, out_html: Path | str, title: str = "medfoundry report") -> Path:
    """Render ``results`` (object or results.json path) to a self-contained HTML file, written atomically."""
    res = load(results)
    ctx = ReportContext.build(res, title)
    document = render(
        "report.html.j2",
        title=title,
        sections=[section(ctx) for section in REPORT_SECTIONS],
        schema_version=res.schema_version,
    )
    return write_text_atomic(Path(out_html), str(document))
