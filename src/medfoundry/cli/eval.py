"""``medfoundry eval``: a benchmark suite over :func:`medfoundry.bench.engine.run_suite`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from medfoundry.cli.common import OutputOpt, OverridesOpt, console


def eval_suite(
    suite: Annotated[Path, typer.Argument(help="suite YAML (see configs/suites/)")],
    overrides: OverridesOpt = None,
    output: OutputOpt = None,
) -> None:
    """Run a benchmark suite: tasks x encoders x adapters x label fractions x seeds (resumes where it stopped)."""
    from medfoundry.config import SuiteConfig, load_config

    values = list(overrides or [])
    if output is not None:
        values.append(f"output_dir={output}")
    cfg = load_config(SuiteConfig, suite, values)  # before the slow import: config typos fail fast
    from medfoundry.bench.engine import run_suite

    out = run_suite(cfg, show_progress=sys.stderr.isatty(), echo=lambda line: console.print(line, highlight=False))
    console.print(f"\n{out.cells_computed} cells computed, {out.cells_reused} reused")
    console.print(f"[bold green]Report:[/] {out.report_path.resolve()}")
    console.print(f"[bold green]Results:[/] {out.results_path.resolve()}")
    console.print(f"Took {out.durations['total']:.0f} s")


def register(root: typer.Typer) -> None:
    root.command("eval")(eval_suite)
