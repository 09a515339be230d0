"""``medfoundry zero-shot`` and ``medfoundry retrieval``: a thin layer over ``medfoundry.vlm``.

CLIP models are trained with ``medfoundry pretrain --method clip`` (docs/vision-language.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

console = Console(stderr=True)

ModelOpt = Annotated[Path, typer.Option("--model", "-m", help="CLIP model folder (<run>/pretrain/clip)")]
OutOpt = Annotated[Path | None, typer.Option("--out", "-o", help="output folder (default: beside the model)")]
BootstrapOpt = Annotated[int, typer.Option("--n-bootstrap", help="bootstrap resamples for the CIs")]


def _echo(line: str) -> None:
    console.print(escape(line), highlight=False, soft_wrap=True)


def zero_shot_cmd(
    model: ModelOpt,
    data: Annotated[str, typer.Option("--data", "-d", help="labelled dataset spec: folder, csv, prefix:path")],
    classes: Annotated[
        str,
        typer.Option(
            "--classes",
            help='class=phrasing|phrasing;class=... e.g. "normal=normal chest x-ray|clear lungs;pneumonia=pneumonia"',
        ),
    ],
    templates: Annotated[
        str | None,
        typer.Option(
            "--templates", help='prompt templates separated by |, each with {} e.g. "a chest x-ray of {}.|{}"'
        ),
    ] = None,
    split: Annotated[str | None, typer.Option(help="split to classify (default: the only one, else test)")] = None,
    patient_regex: Annotated[
        str | None, typer.Option("--patient-regex", help="patient id from file names (folder/csv data), for the CIs")
    ] = None,
    task: Annotated[str | None, typer.Option(help="task name in results (default: the data folder's name)")] = None,
    out: OutOpt = None,
    n_bootstrap: BootstrapOpt = 1000,
) -> None:
    """Zero-shot classification with prompt ensembles; writes predictions, results.json and report.html."""
    from medfoundry.vlm.zeroshot import run_zero_shot

    out_dir = out or model.parent / "zero-shot"
    result = run_zero_shot(
        model, data, classes, templates, out_dir, split, patient_regex, n_bootstrap=n_bootstrap, task=task
    )
    table = Table("metric", "value", "95% CI")
    for name, value in result.metrics.items():
        table.add_row(name, f"{value.value:.3f}", f"[{value.ci_low:.3f}, {value.ci_high:.3f}]")
    Console().print(table)
    n_prompts = ", ".join(f"{k}: {len(v)}" for k, v in result.prompts.items())
    _echo(f"{len(result.ids)} images, prompts per class {n_prompts}; {result.skipped.summary('images')}")
    _echo(f"Results: {result.paths['results']}  Report: {result.paths['report']}")


def retrieval_cmd(
    model: ModelOpt,
    pairs: Annotated[str, typer.Option("--pairs", "-p", help="pairs.csv, pairs.json or vqa_rad:PATH")],
    split: Annotated[
        str, typer.Option(help="test / train (split as in training, from the model's clip.json) or all")
    ] = "test",
    out: OutOpt = None,
    n_bootstrap: BootstrapOpt = 1000,
) -> None:
    """Image-to-text and text-to-image Recall@1/5/10 with chance levels; writes retrieval.json and results.json."""
    from medfoundry.vlm.retrieval import run_retrieval

    out_dir = out or model.parent / "retrieval"
    result = run_retrieval(model, pairs, out_dir, split, n_bootstrap)
    table = Table("direction", "Recall@K", "value", "95% CI", "chance")
    for name, rv in result.recalls.items():
        direction, k = name.split("@")
        table.add_row(
            direction.replace("_", " "),
            k,
            f"{rv.value:.3f}",
            f"[{rv.ci_low:.3f}, {rv.ci_high:.3f}]",
            f"{rv.chance:.3f}",
        )
    Console().print(table)
    _echo(f"{result.n_images} images, {result.n_texts} texts ({split}); {result.skipped}")
    if result.seen_in_training:
        _echo(f"warning: {result.seen_in_training} of these images were seen in training")
    _echo(f"Results: {result.paths['retrieval']}  Report: {result.paths['report']}")


def register(app: typer.Typer) -> None:
    """Add the vision-language commands to the main ``medfoundry`` app."""
    app.command("zero-shot")(zero_shot_cmd)
    app.command("retrieval")(retrieval_cmd)
