"""``medfoundry mil``: slide-level MIL on cached tile features, as a one-task suite of the evaluation engine.

The task is a ``slide-mil`` task in cross-validation mode (:mod:`medfoundry.bench.mil`): ``--folds`` patient-grouped
folds, every slide predicted out of fold, one cell per MIL model scored on all slides. A suite YAML with the same task
gives the same numbers (and can add label fractions, seeds or fixed splits).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from medfoundry.cli.common import console, echo


def mil(
    features: Annotated[Path, typer.Argument(help="folder of per-slide feature HDF5 files (medfoundry wsi embed)")],
    labels: Annotated[Path, typer.Argument(help="CSV with columns slide_id, patient_id, label")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output folder for results.json and report.html")],
    models: Annotated[str, typer.Option(help="comma-separated: mean, abmil, gated_abmil, transmil")] = "abmil",
    folds: Annotated[int, typer.Option(help="cross-validation folds, split by patient")] = 5,
    task: Annotated[str, typer.Option(help="task name in results and report")] = "slides",
    seed: Annotated[int, typer.Option(help="fold and training seed")] = 0,
    heatmaps: Annotated[bool, typer.Option(help="out-of-fold attention over each slide's thumbnail (PNG)")] = True,
) -> None:
    """Slide-level MIL on cached tile features, cross-validated by patient, into results.json and report.html."""
    from medfoundry.config import AdaptConfig, SuiteConfig, TaskConfig

    names = [name.strip() for name in models.split(",") if name.strip()]
    spec = TaskConfig(
        name=task,
        kind="slide-mil",
        source=str(features),
        labels=str(labels),
        mil={"models": names, "folds": folds, "heatmaps": heatmaps},
    )
    # Every label at the one seed: the command's grid is k-fold CV of each model, nothing more.
    suite = SuiteConfig(name=task, output_dir=out, tasks=[spec], adapt=AdaptConfig(label_fractions=[1.0], seeds=[seed]))
    from medfoundry.bench.engine import run_suite  # after the config: typos fail before the slow import

    result = run_suite(suite, show_progress=sys.stderr.isatty(), echo=echo, title=f"medfoundry MIL: {task}")
    if heatmaps:
        echo(f"Heatmaps: {(out / 'tasks' / task / 'heatmaps').resolve()}")
    console.print(f"[bold green]Report:[/] {result.report_path.resolve()}")


def register(root: typer.Typer) -> None:
    root.command("mil")(mil)
