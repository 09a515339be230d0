"""Whole-slide throughput: tiling + streamed embedding of a slide, against a bare forward pass in the same run.

End to end is what ``medfoundry wsi tile`` + ``medfoundry wsi embed`` do: find tissue, write the coordinates, read
every tile from the slide with DataLoader workers, run the encoder, write the features. The baseline is a bare
forward pass of the same model over the same tiles already in memory (read, normalised and resized beforehand),
the best a pipeline could do. Repetitions alternate the two sides and medians are reported, so a noisy machine
shifts both alike. Every ratio is given twice: from wall seconds and from CPU seconds (user + system, loader workers
included; benchmarks/_timing.py), which hold steady when other jobs load the machine.
Also: the bf16 option's speed-up over fp32 and its largest feature difference, and peak memory.

    python benchmarks/wsi.py                               # CMU-1-Small-Region.svs, ViT-S/16, 224 px at 0.5 um/px
    python benchmarks/wsi.py --slide my.svs --reps 5
    python benchmarks/wsi.py --mosaic 3 --reps 3             # a 3x3 mosaic of CMU-1 as a 3-level tiled TIFF

``--mosaic N`` writes the slide's level 0 repeated N x N times as a pyramidal tiled TIFF (256 px tiles, deflate,
levels at 1/4 and 1/16, MPP in the resolution tags; OpenSlide reads it as generic-tiff) in a temporary folder: the
bundled slide is a single level of 48 tissue tiles, where the tissue mask's fixed cost (a full decode for the
thumbnail) weighs more than on any real slide. The mosaic has real tissue, a pyramid, and 9x the tiles at N=3.

Target: end to end >= 0.95 of the bare forward pass in fp32. For reference, TRIDENT on this slide and machine
(2 threads, ViT-S/16, 224 px at 20x, 78 tiles) reached 0.89 to 0.92 of the bare pass, plus 5 to 7 s start-up.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np
import torch

from medfoundry.models.backbones import Encoder, create_encoder
from medfoundry.models.features import prepare_batch
from medfoundry.wsi import embed_slides, read_patches, tile_slides
from medfoundry.wsi.embedding import SlideTiles, default_workers, plan_from_attrs
from medfoundry.wsi.tiling import open_slide

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared timer beside this script, however it is run
from _timing import Timed, median, ratio, ratio_text, timed  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SLIDE = REPO_ROOT.parent / "shared" / "data" / "wsi_samples" / "CMU-1-Small-Region.svs"
TARGET_RATIO = 0.95


def end_to_end(slide: Path, encoder: Encoder, args: argparse.Namespace, bf16: bool) -> tuple[Timed, Timed, np.ndarray]:
    """Seconds for tiling + embedding from scratch, seconds of the embedding stage alone, and the features."""
    with tempfile.TemporaryDirectory() as tmp, timed() as whole:
        out = Path(tmp)
        tile_slides([slide], out / "tiles", mpp=args.mpp, tile_size=args.tile, echo=lambda line: None)
        with timed() as embedding:
            embed_slides(
                out / "tiles" / "patches",
                args.model,
                out / "features",
                slides=[slide],
                batch_size=args.batch_size,
                num_workers=args.workers,
                bf16=bf16,
                encoder=encoder,
                progress=False,
                echo=lambda line: None,
            )
        with h5py.File(out / "features" / f"{slide.stem}.h5") as handle:
            features = handle["features"][:]
    return whole, embedding, features


def tiles_in_memory(slide: Path, args: argparse.Namespace) -> torch.Tensor:
    with tempfile.TemporaryDirectory() as tmp:
        summary = tile_slides([slide], Path(tmp), mpp=args.mpp, tile_size=args.tile, echo=lambda line: None)
        coords, attrs = read_patches(Path(tmp) / "patches" / f"{slide.stem}.h5")
    assert summary.done, "the slide could not be tiled"
    tiles = SlideTiles(slide, coords, plan_from_attrs(attrs, open_slide(slide), slide))
    return torch.stack([tiles[i] for i in range(len(tiles))])


@torch.inference_mode()
def bare_forward(encoder: Encoder, batches: list[torch.Tensor], bf16: bool = False) -> Timed:
    with timed() as span, torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for batch in batches:
            encoder(batch)
    return span


def write_mosaic(slide: Path, repeats: int, out: Path) -> Path:
    """The slide's level 0 tiled ``repeats`` x ``repeats`` as a 3-level tiled TIFF with the slide's MPP."""
    import tifffile  # comes with scikit-image

    handle = open_slide(slide)
    try:
        mpp = float(handle.properties["openslide.mpp-x"])
        level0 = np.asarray(handle.read_region((0, 0), 0, handle.dimensions).convert("RGB"))
    finally:
        handle.close()
    mosaic = np.tile(level0, (repeats, repeats, 1))
    with tifffile.TiffWriter(out, bigtiff=True) as writer:
        for index, step in enumerate((1, 4, 16)):
            pixels_per_cm = 1e4 / (mpp * step)
            writer.write(
                np.ascontiguousarray(mosaic[::step, ::step]),
                tile=(256, 256),
                compression="zlib",
                photometric="rgb",
                resolution=(pixels_per_cm, pixels_per_cm),
                resolutionunit="CENTIMETER",
                subfiletype=0 if index == 0 else 1,
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slide", type=Path, default=DEFAULT_SLIDE)
    parser.add_argument("--model", default="vit_small_224")
    parser.add_argument("--mpp", type=float, default=0.5)
    parser.add_argument("--tile", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=None, help="loader workers (default: embed_slides' choice)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--mosaic", type=int, default=0, help="benchmark an N x N mosaic of the slide (see above)")
    args = parser.parse_args()
    if not args.slide.is_file():
        raise SystemExit(f"{args.slide}: slide not found (this benchmark reads ../shared/data/wsi_samples/)")
    with tempfile.TemporaryDirectory() as scratch:
        if args.mosaic > 1:
            args.slide = write_mosaic(args.slide, args.mosaic, Path(scratch) / f"mosaic{args.mosaic}.tif")
        measure(args)


def measure(args: argparse.Namespace) -> None:
    encoder = create_encoder(args.model, in_chans=3, img_size=args.tile, seed=0).eval()
    tiles = tiles_in_memory(args.slide, args)
    with torch.inference_mode():
        batches = [
            prepare_batch(encoder, tiles[i : i + args.batch_size]) for i in range(0, len(tiles), args.batch_size)
        ]
    bare_forward(encoder, batches[:1])  # warm-up: first-call allocations belong to neither side
    e2e: list[Timed] = []
    bare: list[Timed] = []
    e2e_bf16: list[Timed] = []
    bare_bf16: list[Timed] = []
    embed_only: list[Timed] = []
    features: dict[str, np.ndarray] = {}
    for rep in range(args.reps):
        order = ["e2e", "bare", "bf16", "bare_bf16"]
        for side in order if rep % 2 == 0 else order[::-1]:
            if side == "bare":
                bare.append(bare_forward(encoder, batches))
            elif side == "bare_bf16":
                bare_bf16.append(bare_forward(encoder, batches, bf16=True))
            else:
                seconds, embedding, feats = end_to_end(args.slide, encoder, args, bf16=side == "bf16")
                (e2e if side == "e2e" else e2e_bf16).append(seconds)
                if side == "e2e":
                    embed_only.append(embedding)
                features[side] = feats
    n = len(tiles)
    fp32, bf16 = median(e2e).wall, median(e2e_bf16).wall
    base = median(bare).wall
    diff = float(np.abs(features["bf16"] - features["e2e"]).max())
    scale = float(np.abs(features["e2e"]).max())
    peak_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peak_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    workers = default_workers(torch.device("cpu")) if args.workers is None else args.workers
    print(
        f"slide {args.slide.name}: {n} tiles of {args.tile} px at {args.mpp} um/px; model {args.model}; "
        f"{torch.get_num_threads()} torch threads, {workers} loader workers; medians of {args.reps}"
    )
    print(f"bare forward (tiles in memory): {n / base:7.1f} tiles/s   ({_seconds(bare)})")
    print(
        f"tile + embed, fp32:             {n / fp32:7.1f} tiles/s   ratio to bare {ratio_text(ratio(bare, e2e))} "
        f"(target >= {TARGET_RATIO}; {_seconds(e2e)})"
    )
    only = median(embed_only).wall
    print(
        f"  of which wsi embed, fp32:     {n / only:7.1f} tiles/s   ratio to bare "
        f"{ratio_text(ratio(bare, embed_only))} (tiling took {fp32 - only:.2f} s)"
    )
    print(
        f"tile + embed, bf16:             {n / bf16:7.1f} tiles/s   speed-up over fp32 "
        f"{ratio_text(ratio(e2e, e2e_bf16))}; largest feature difference {diff:.4f} (largest |feature| {scale:.2f})"
    )
    print(
        f"bare forward, bf16:             {n / median(bare_bf16).wall:7.1f} tiles/s   speed-up over fp32 "
        f"{ratio_text(ratio(bare, bare_bf16))} (target: tile + embed's bf16 speed-up at least this)"
    )
    print(f"peak resident memory: main process {peak_self:.0f} MiB, largest loader worker {peak_children:.0f} MiB")


def _seconds(spans: list[Timed]) -> str:
    middle = median(spans)
    return f"median {middle.wall:.2f} s wall, {middle.cpu:.2f} CPU-s"


if __name__ == "__main__":
    main()
