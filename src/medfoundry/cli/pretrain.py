"""``medfoundry pretrain``: SSL pre-training only, over :func:`medfoundry.bench.run.run_pretraining`."""

from __future__ import annotations

import json
import os
from typing import Annotated

import typer
from rich.markup import escape

from medfoundry.cli.common import (
    ConfigArg,
    OutputOpt,
    OverridesOpt,
    ReaderOptionsLongOpt,
    console,
    experiment_config,
    split_reader_options,
)

ThreadsOpt = Annotated[
    int | None,
    typer.Option("--threads", min=1, help="CPU threads for torch (pretrain.threads; torch.set_num_threads)"),
]


def pretrain_overrides(
    domain: str | None,
    stop_on_collapse: bool,
    overrides: list[str] | None,
    method: str | None = None,
    data: str | None = None,
    reader_options: list[str] | None = None,
    threads: int | None = None,
) -> list[str]:
    """The pretrain command's options as dotted overrides, placed first so that ``-s`` overrides still win."""
    values = [f"pretrain.views.domain={domain}"] if domain is not None else []
    if method is not None:
        values.append(f"pretrain.method={method}")
    if data is not None:
        # Quoted: a spec such as "wsi:slide.svs" would otherwise be read as a YAML mapping.
        values.append(f"data.source={json.dumps(data)}")
    # The override parser reads the value as YAML, as -o does elsewhere.
    values += [f"data.options.{key}={raw}" for key, raw in split_reader_options(reader_options)]
    if stop_on_collapse:
        values.append("pretrain.stop_on_collapse=true")
    if threads is not None:
        values.append(f"pretrain.threads={threads}")
    return [*values, *(overrides or [])]


def pretrain(
    config: ConfigArg = None,
    overrides: OverridesOpt = None,
    output: OutputOpt = None,
    resume: Annotated[bool, typer.Option("--resume/--no-resume", help="continue from the last checkpoint")] = True,
    domain: Annotated[
        str | None,
        typer.Option(
            "--domain",
            help="view preset: natural, pathology, radiology, ophthalmology or oct (docs/views.md); "
            "-s pretrain.views.<field>=... overrides single fields",
        ),
    ] = None,
    stop_on_collapse: Annotated[
        bool, typer.Option("--stop-on-collapse", help="stop when the collapse monitor fires")
    ] = False,
    method: Annotated[
        str | None, typer.Option("--method", help="dino, ibot, simclr, mocov3, byol, mae or clip (pretrain.method)")
    ] = None,
    data: Annotated[
        str | None,
        typer.Option(
            "--data", "-d", help="dataset spec to pre-train on (data.source); clip: pairs.csv|json, vqa_rad:PATH"
        ),
    ] = None,
    reader_options: ReaderOptionsLongOpt = None,
    threads: ThreadsOpt = None,
) -> None:
    """SSL pre-training only; writes <output>/pretrain/encoder (a checkpoint folder); --method clip: pretrain/clip."""
    from medfoundry.bench.run import run_pretraining

    values = pretrain_overrides(domain, stop_on_collapse, overrides, method, data, reader_options, threads)
    cfg = experiment_config(config, values, output)
    state = cfg.output_dir / "pretrain" / "state" / "last.pt"
    if not resume:
        state.unlink(missing_ok=True)  # missing_ok: under torchrun every rank removes it
    result = run_pretraining(cfg, resume=resume)
    if os.environ.get("RANK", "0") != "0":
        return  # under torchrun, rank 0 reports for all
    status = "finished" if result.finished else f"stopped at step {result.steps}/{result.total_steps}"
    console.print(
        f"{status}; {result.images_per_second:.1f} img/s; encoder: {result.encoder_dir if result.finished else '-'}"
    )
    for warning in result.warnings:
        console.print(f"[yellow]warning: {warning['message']}[/] (docs/pretraining-health.md)")
    if result.collapsed:
        verdict = "; ".join(result.verdict) or "see log.jsonl"
        console.print(f"[yellow]collapse suspected at the end of the run: {escape(verdict)}[/]")


def register(root: typer.Typer) -> None:
    root.command("pretrain")(pretrain)
