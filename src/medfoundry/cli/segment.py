"""``medfoundry segment-probe``: a thin typer layer over :func:`medfoundry.segment.run_segment_probe`, which runs
the recipe as a one-task suite of the evaluation engine (so a rerun into the same folder reuses finished cells)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from medfoundry.cli.common import console, echo


def segment_probe(
    config: Annotated[Path | None, typer.Argument(help="YAML recipe (configs/segment/); options override it")] = None,
    encoder: Annotated[
        str | None, typer.Option("--encoder", help="checkpoint folder, or a 3D ViT preset (random weights)")
    ] = None,
    image: Annotated[list[Path] | None, typer.Option("--image", help="CT (NIfTI or DICOM folder); repeatable")] = None,
    labels: Annotated[list[Path] | None, typer.Option("--labels", help="label map per --image, same grid")] = None,
    label_names: Annotated[
        Path | None, typer.Option("--label-names", help="label,name CSV (default: labels_total.csv beside labels)")
    ] = None,
    classes: Annotated[
        str | None, typer.Option("--classes", help="comma-separated names, e.g. liver,spleen,kidney_left")
    ] = None,
    decoder: Annotated[str | None, typer.Option("--decoder", help="linear, unetr, or both: linear,unetr")] = None,
    steps: Annotated[int | None, typer.Option("--steps", help="decoder training steps")] = None,
    merge_left_right: Annotated[
        bool | None, typer.Option("--merge-left-right/--no-merge-left-right", help="one class per left/right pair")
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="output folder")] = None,
    overrides: Annotated[
        list[str] | None, typer.Option("--set", "-s", help="dotted override, e.g. split.test_stop=0.5")
    ] = None,
) -> None:
    """Train a light decoder on a frozen 3D encoder's tokens; Dice per class with CIs on held-out z blocks.

    A rerun into the same --out reuses every decoder whose inputs are unchanged."""
    from medfoundry.config import load_config
    from medfoundry.segment.config import SegmentProbeConfig

    values = list(overrides or [])
    options = {
        "encoder": encoder,
        "label_names": label_names,
        "steps": steps,
        "merge_left_right": merge_left_right,
        "output_dir": out,
    }
    values += [f"{key}={value}" for key, value in options.items() if value is not None]
    lists = {
        "images": [str(p) for p in image] if image else None,
        "labels": [str(p) for p in labels] if labels else None,
        "classes": [c.strip() for c in classes.split(",") if c.strip()] if classes else None,
        "decoders": [d.strip() for d in decoder.split(",") if d.strip()] if decoder else None,
    }
    # Flow-style YAML lists, quoted, so paths with spaces or colons survive the override parser.
    values += [f"{key}=[{', '.join(repr(v) for v in items)}]" for key, items in lists.items() if items is not None]
    cfg = load_config(SegmentProbeConfig, config, values)  # before the slow imports: config typos fail fast

    from medfoundry.segment.train import run_segment_probe

    output = run_segment_probe(cfg, echo=echo)  # the engine echoes the summary table
    console.print(f"{output.suite.cells_computed} cells computed, {output.suite.cells_reused} reused")
    console.print(f"[bold green]Report:[/] {output.report_path}  overlay: {output.overlay_path}", soft_wrap=True)


def register(root: typer.Typer) -> None:
    root.command("segment-probe")(segment_probe)
