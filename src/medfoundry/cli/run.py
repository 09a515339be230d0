"""``medfoundry run``: the whole pipeline over :func:`medfoundry.bench.run.run_experiment`."""

from __future__ import annotations

import shutil
from typing import Annotated

import typer

from medfoundry.cli.common import ConfigArg, OutputOpt, OverridesOpt, console, experiment_config
from medfoundry.cli.pretrain import ThreadsOpt


def run(
    config: ConfigArg = None,
    overrides: OverridesOpt = None,
    output: OutputOpt = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="ignore finished stages and start over")] = False,
    threads: ThreadsOpt = None,
) -> None:
    """Run the whole pipeline: pre-train, embed, adapt, baselines, results.json and report.html."""
    # First, so that -s pretrain.threads=N still wins for pre-training.
    values = [f"pretrain.threads={threads}", *(overrides or [])] if threads is not None else overrides
    cfg = experiment_config(config, values, output)  # before the slow import: config typos fail fast
    from medfoundry.bench.run import run_experiment

    if threads is not None:
        import torch

        torch.set_num_threads(threads)  # every stage: pre-training, embedding, probes and baselines

    if fresh and cfg.output_dir.exists():
        shutil.rmtree(cfg.output_dir)
    out = run_experiment(cfg, resume=True, echo=lambda line: console.print(line, highlight=False, soft_wrap=True))
    console.print(f"\n[bold green]Report:[/] {out.report_path.resolve()}")
    console.print(f"[bold green]Results:[/] {out.results_path.resolve()}")
    console.print(f"Took {out.durations['total']:.0f} s")


def register(root: typer.Typer) -> None:
    root.command("run")(run)
