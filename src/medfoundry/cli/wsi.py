"""``medfoundry wsi``: tile whole-slide images and embed their tiles (a thin layer over ``medfoundry.wsi``).

Both commands go on past bad slides and print a summary; they exit 1 only when every slide failed. Both run under
torchrun and as several jobs (``--shard i/n``, or a SLURM job array) on one output folder: each slide is claimed
before it is done (docs/distributed.md).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from medfoundry.cli.common import echo

SHARD_HELP = "this job's share as INDEX/COUNT, e.g. 0/8 (default: the SLURM array task, if any)"

app = typer.Typer(no_args_is_help=True, help="Whole-slide images: tile and embed (pathology).")


@app.command("tile")
def tile(
    slides: Annotated[list[Path], typer.Argument(help="slide files, or folders of slides")],
    out: Annotated[Path, typer.Option("--out", help="output folder (patches/, thumbnails/, tile_summary.json)")],
    mpp: Annotated[float, typer.Option("--mpp", help="micrometres per output pixel (0.5 ~ 20x)")] = 0.5,
    tile: Annotated[int, typer.Option("--tile", help="tile side in output pixels")] = 224,
    min_tissue: Annotated[float, typer.Option("--min-tissue", help="minimum tissue fraction per tile")] = 0.5,
    mpp_override: Annotated[
        float | None, typer.Option("--mpp-override", help="level-0 MPP to use instead of the slide's metadata")
    ] = None,
    shard: Annotated[str | None, typer.Option("--shard", help=SHARD_HELP)] = None,
) -> None:
    """Find tissue and write tile coordinates (HDF5, TRIDENT/CLAM layout) and a thumbnail per slide."""
    from medfoundry.distributed import init_distributed
    from medfoundry.wsi.tiling import tile_slides

    summary = tile_slides(slides, out, mpp, tile, min_tissue, mpp_override, echo=echo, shard=shard)
    if not init_distributed().is_main:
        return  # under torchrun, rank 0 reports for all
    echo(f"tiled {len(summary.done)} slide(s), skipped {len(summary.skipped)}; summary: {out / 'tile_summary.json'}")
    for path, reason in summary.skipped:
        echo(f"  skipped {path}: {reason}")
    if not summary.ok:
        raise typer.Exit(1)


@app.command("embed")
def embed(
    patches: Annotated[Path, typer.Option("--patches", help="patches folder written by `wsi tile`")],
    model: Annotated[str, typer.Option("--model", "-m", help="checkpoint folder, preset or timm name")],
    out: Annotated[Path, typer.Option("--out", help="features folder (<slide>.h5, state/, embed_summary.json)")],
    slides: Annotated[
        list[Path] | None, typer.Option("--slides", help="slide files or folders (default: paths in the patches)")
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="tiles per batch")] = 64,
    num_workers: Annotated[
        int | None,
        typer.Option("--num-workers", help="tile-reading workers (default: 0.75 x cores on a GPU, cores / 8 on a CPU)"),
    ] = None,
    bf16: Annotated[bool, typer.Option("--bf16", help="bfloat16 autocast for the encoder")] = False,
    img_size: Annotated[int | None, typer.Option("--img-size", help="input size for a preset or timm name")] = None,
    device: Annotated[str | None, typer.Option("--device", help="cpu or cuda (default: cuda when present)")] = None,
    stain_reference: Annotated[
        Path | None, typer.Option("--stain-reference", help="Macenko reference JSON (`wsi stain-fit`)")
    ] = None,
    shard: Annotated[str | None, typer.Option("--shard", help=SHARD_HELP)] = None,
) -> None:
    """Stream tiles through an encoder into per-slide features; slides already done are skipped."""
    from medfoundry.distributed import init_distributed
    from medfoundry.wsi.embedding import embed_slides

    summary = embed_slides(
        patches,
        model,
        out,
        slides=slides,
        batch_size=batch_size,
        num_workers=num_workers,
        bf16=bf16,
        img_size=img_size,
        device=device,
        progress=sys.stderr.isatty(),
        echo=echo,
        stain_reference=stain_reference,
        shard=shard,
    )
    if not init_distributed().is_main:
        return  # under torchrun, rank 0 reports for all
    for row in summary.failed:
        echo(f"  failed {row['slide']}: {row['error']}")
    echo(f"summary: {out / 'embed_summary.json'}")
    if not summary.ok:
        raise typer.Exit(1)


@app.command("export-features")
def export_features(
    sources: Annotated[
        list[Path], typer.Argument(help="`wsi embed` folders of <slide>.h5, or `medfoundry embed` files (train.h5 ...)")
    ],
    out: Annotated[Path, typer.Option("--out", help="output folder")],
    layout: Annotated[str, typer.Option("--layout", help="clam, trident or eva")],
    labels: Annotated[
        Path | None, typer.Option("--labels", help="slide labels CSV (slide_id,patient_id,label[,split]); eva needs it")
    ] = None,
    split: Annotated[
        str | None, typer.Option("--split", help="split of one image features file (default: its name)")
    ] = None,
    encoder_name: Annotated[
        str | None, typer.Option("--encoder-name", help="TRIDENT's features_<encoder> folder name")
    ] = None,
) -> None:
    """Write features in the layout CLAM, TRIDENT or eva reads (docs/wsi.md: Interoperability)."""
    from medfoundry.wsi.interop import export_features as export

    summary = export(sources, out, layout, labels, split, encoder_name)
    echo(f"{out}: {summary.samples} sample(s) in {summary.layout}'s layout ({len(summary.written)} files)")


@app.command("stain-fit")
def stain_fit(
    reference: Annotated[Path, typer.Argument(help="a reference H&E tile (PNG, JPEG, TIFF)")],
    out: Annotated[Path, typer.Option("--out", help="JSON with the reference stain matrix")],
) -> None:
    """Fit Macenko stain normalisation on a reference tile, for `wsi embed --stain-reference`."""
    import numpy as np
    from PIL import Image

    from medfoundry.errors import DataError
    from medfoundry.transforms.stain import MacenkoNormalizer

    try:
        with Image.open(reference) as image:
            pixels = np.asarray(image.convert("RGB"))
    except OSError as error:
        raise DataError(f"cannot read the reference tile ({error})", reference) from None
    MacenkoNormalizer().fit(pixels).save(out)
    echo(f"{out}: Macenko reference from {reference.name}")


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="wsi")
