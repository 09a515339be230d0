"""``medfoundry report``: report.html from results.json alone, over :mod:`medfoundry.report`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from medfoundry.cli.common import console


def report(
    results: Annotated[Path, typer.Argument(help="results.json")],
    out: Annotated[Path | None, typer.Option("--out", help="report.html (default: beside results.json)")] = None,
    markdown: Annotated[bool, typer.Option("--markdown", help="print each task's headline metric as Markdown")] = False,
) -> None:
    """Render report.html from results.json alone."""
    from medfoundry.evaluate.results import read_results
    from medfoundry.report import format_markdown_tables, format_summary_text, render_report, summarise_table

    res = read_results(results)
    if markdown:
        print(format_markdown_tables(res))
    path = render_report(res, out or results.with_name("report.html"))
    console.print(format_summary_text(summarise_table(res)), highlight=False, soft_wrap=True)
    console.print(f"Report: {path.resolve()}")


def register(root: typer.Typer) -> None:
    root.command("report")(report)
