"""``medfoundry robustness``: encoders' features under controlled image shifts, over
:func:`medfoundry.bench.robustness.run_robustness`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from medfoundry.cli.common import ReaderOptionsOpt, console, echo, parse_reader_options


def robustness(
    data: Annotated[
        str | None, typer.Option("--data", help="one dataset with splits (missing val/test carved by patient)")
    ] = None,
    train: Annotated[str | None, typer.Option("--train", help="training cases (instead of --data)")] = None,
    test: Annotated[str | None, typer.Option("--test", help="test cases: the images that are shifted")] = None,
    val: Annotated[str | None, typer.Option("--val", help="validation cases (default: carved from train)")] = None,
    encoders: Annotated[
        list[str] | None,
        typer.Option("--encoder", "-e", help="checkpoint folder, public:NAME:PATH, or backbone name (random weights)"),
    ] = None,
    reader_options: ReaderOptionsOpt = None,
    preset: Annotated[str | None, typer.Option(help="domain preset of shifts: pathology, radiology or fundus")] = None,
    shifts: Annotated[
        list[str] | None,
        typer.Option("--shift", help="NAME:LEVEL,LEVEL,... (repeatable), e.g. jpeg:50,25,10; replaces a preset's"),
    ] = None,
    stain_reference: Annotated[
        Path | None, typer.Option(help="reference tile or Macenko JSON for stain_norm (default: a train tile)")
    ] = None,
    in_chans: Annotated[int, typer.Option(help="input channels of backbone-name encoders")] = 3,
    img_size: Annotated[int | None, typer.Option(help="input size of backbone-name encoders")] = None,
    n_bootstrap: Annotated[int, typer.Option(help="patient-bootstrap resamples of every CI")] = 1000,
    seed: Annotated[int, typer.Option(help="seed of the random shifts and the bootstrap")] = 0,
    name: Annotated[str, typer.Option(help="task name, used in file names")] = "robustness",
    output: Annotated[Path, typer.Option("--output", help="output folder")] = Path("runs/robustness"),
) -> None:
    """Embed the same test images under stain, JPEG, blur, resolution, window, noise or brightness shifts and
    report cosine to the clean feature, top-k retrieval agreement, probe flip rate and metric change, with CIs."""
    from medfoundry.bench.probe import encoder_from_text
    from medfoundry.bench.robustness import RobustnessConfig, run_robustness
    from medfoundry.config import DatasetSpec, TaskConfig
    from medfoundry.errors import MedfoundryError
    from medfoundry.transforms.shifts import parse_shifts

    options = parse_reader_options(reader_options)
    if (data is None) == (train is None):
        raise MedfoundryError("give the images either as --data (one dataset) or as --train and --test")
    if not encoders:
        raise MedfoundryError("give at least one --encoder (a checkpoint folder or a backbone name)")
    if data is not None:
        task = TaskConfig(name=name, source=data, options=options)
    else:
        if test is None:
            raise MedfoundryError("--train needs --test: the images that are shifted")
        task = TaskConfig(
            name=name,
            train=DatasetSpec(source=train, options=options),
            test=DatasetSpec(source=test, options=options),
            val=DatasetSpec(source=val, options=options) if val else None,
        )
    config = RobustnessConfig(
        name=name,
        output_dir=output,
        task=task,
        encoders=[encoder_from_text(text, in_chans, img_size) for text in encoders],
        shifts={key: list(levels) for key, levels in parse_shifts(preset, shifts).items()},
        stain_reference=stain_reference,
        seed=seed,
        n_bootstrap=n_bootstrap,
    )
    out = run_robustness(config, echo=echo)
    console.print(f"\n{out.cells_computed} shift cells computed, {out.cells_reused} reused, {out.seconds:.1f} s")
    console.print(f"[bold green]Report:[/] {out.report_path.resolve()}")
    console.print(f"[bold green]Results:[/] {out.json_path.resolve()}")


def register(root: typer.Typer) -> None:
    root.command("robustness")(robustness)
