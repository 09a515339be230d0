"""``medfoundry zero-shot`` and ``medfoundry retrieval``: a thin layer over ``medfoundry.vlm``.

Zero-shot runs as a one-task suite of the evaluation engine (a ``zero-shot`` task, :mod:`medfoundry.bench.zeroshot`),
so its results, predictions and report are laid out like any suite's and a suite YAML can hold the same task.
Retrieval scores image-text pairs, which no suite task kind holds yet, so it writes its own results.
CLIP models are trained with ``medfoundry pretrain --method clip`` (docs/vision-language.md).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from medfoundry.cli.common import echo

ModelOpt = Annotated[Path, typer.Option("--model", "-m", help="CLIP model folder (<run>/pretrain/clip)")]
OutOpt = Annotated[Path | None, typer.Option("--out", "-o", help="output folder (default: beside the model)")]
BootstrapOpt = Annotated[int, typer.Option("--n-bootstrap", help="bootstrap resamples for the CIs")]


def zero_shot(
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
    from medfoundry.config import AdaptConfig, EvaluateConfig, SuiteConfig, TaskConfig
    from medfoundry.data.registry import resolve_reader

    out_dir = out or model.parent / "zero-shot"
    # Task names become file names: the data folder's name with anything else replaced.
    name = task or re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(str(resolve_reader(data)[1])).name).strip("-._") or "data"
    settings = {"checkpoint": str(model), "classes": classes, **({"templates": templates} if templates else {})}
    spec = TaskConfig(
        name=name,
        kind="zero-shot",
        source=data,
        options={"patient_regex": patient_regex} if patient_regex else {},
        test_split=split or "test",
        metrics=["auroc", "balanced_accuracy"],
        zero_shot=settings,
    )
    suite = SuiteConfig(
        name=name,
        output_dir=out_dir,
        tasks=[spec],
        adapt=AdaptConfig(seeds=[0]),
        evaluate=EvaluateConfig(n_bootstrap=n_bootstrap),
    )
    from medfoundry.bench.engine import run_suite  # after the config: typos fail before the slow import

    result = run_suite(suite, show_progress=sys.stderr.isatty(), echo=echo, title="medfoundry zero-shot")
    table = Table("metric", "value", "95% CI")
    for record in result.results.records:
        table.add_row(record.metric, f"{record.value:.3f}", f"[{record.ci_low:.3f}, {record.ci_high:.3f}]")
    Console().print(table)
    prompts = result.results.metadata["tasks"][name]["n_prompts_per_class"]
    n_images = result.results.records[0].n_test
    echo(f"{n_images} images, prompts per class {', '.join(f'{k}: {v}' for k, v in prompts.items())}")
    echo(f"Results: {result.results_path}  Report: {result.report_path}")


def retrieval(
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
    echo(f"{result.n_images} images, {result.n_texts} texts ({split}); {result.skipped}")
    if result.seen_in_training:
        echo(f"warning: {result.seen_in_training} of these images were seen in training")
    echo(f"Results: {result.paths['retrieval']}  Report: {result.paths['report']}")


def register(root: typer.Typer) -> None:
    root.command("zero-shot")(zero_shot)
    root.command("retrieval")(retrieval)
