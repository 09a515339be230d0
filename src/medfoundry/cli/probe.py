"""``medfoundry probe``: adapters and metrics on a user's own train / val / test data, over
:func:`medfoundry.bench.probe.probe_config` and the one engine."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from medfoundry.cli.common import ReaderOptionsOpt, console, parse_reader_options


def _numbers(text: str, kind: type) -> list:  # type: ignore[type-arg]
    return [kind(part) for part in text.split(",") if part.strip()]


def probe(
    train: Annotated[str, typer.Option("--train", help="training cases: folder, CSV, npz, features.h5 or prefix:path")],
    test: Annotated[str, typer.Option("--test", help="test cases, used whole (nothing is carved from them)")],
    val: Annotated[
        str | None, typer.Option("--val", help="validation cases (default: carved from train by patient)")
    ] = None,
    encoders: Annotated[
        list[str] | None,
        typer.Option("--encoder", "-e", help="checkpoint folder, public:NAME:PATH, or backbone name (random weights)"),
    ] = None,
    reader_options: ReaderOptionsOpt = None,
    adapters: Annotated[str, typer.Option(help="comma-separated adapters")] = "linear,knn",
    fractions: Annotated[str, typer.Option(help="comma-separated label fractions of train")] = "0.01,0.1,1.0",
    seeds: Annotated[str, typer.Option(help="comma-separated seeds")] = "0,1,2",
    in_chans: Annotated[int, typer.Option(help="input channels of backbone-name encoders")] = 3,
    img_size: Annotated[int | None, typer.Option(help="input size of backbone-name encoders")] = None,
    kind: Annotated[
        str | None, typer.Option(help="binary, multiclass, ordinal or multilabel (default: inferred)")
    ] = None,
    output: Annotated[Path, typer.Option("--output", help="output folder")] = Path("runs/probe"),
) -> None:
    """Probe encoders (or feature files) on your own train and test data: no pre-training, no forced carving."""
    from medfoundry.bench.engine import run_suite
    from medfoundry.bench.probe import encoder_from_text, probe_config
    from medfoundry.config import DatasetSpec

    options = parse_reader_options(reader_options)
    specs = {role: DatasetSpec(source=source, options=options) for role, source in (("train", train), ("test", test))}
    config = probe_config(
        specs["train"],
        specs["test"],
        val=DatasetSpec(source=val, options=options) if val else None,
        encoders=[encoder_from_text(text, in_chans, img_size) for text in encoders or []],
        output_dir=output,
        adapt={
            "adapters": adapters.split(","),
            "label_fractions": _numbers(fractions, float),
            "seeds": _numbers(seeds, int),
        },
        kind=kind,
    )
    out = run_suite(config, show_progress=sys.stderr.isatty(), echo=lambda line: console.print(line, highlight=False))
    console.print(f"\n{out.cells_computed} cells computed, {out.cells_reused} reused")
    console.print(f"[bold green]Report:[/] {out.report_path.resolve()}")
    console.print(f"[bold green]Results:[/] {out.results_path.resolve()}")


def register(root: typer.Typer) -> None:
    root.command("probe")(probe)
