"""Fundus preprocessing speed at full size: ``fundus_crop`` against a bare decode of the same JPEGs, images/s.

``fundus_crop`` does what a fundus pipeline needs for a model input: decode (libjpeg's reduced-size decoding,
1/2 to 1/8, picked from the output size), find the circular field of view, crop and pad to a square, resize, and
optionally Ben Graham's local contrast. The baseline is what any pipeline pays at least: decoding every
photograph at full size (4288 x 2848 for IDRiD) and resizing it to the output size with PIL. Repetitions alternate
the sides and medians are reported; a ratio above 1 means faster than the bare full-size decode. Ratios come from
wall seconds and from CPU seconds (user + system; benchmarks/_timing.py), the latter steady on a loaded machine.

    python benchmarks/fundus.py                      # the 50 IDRiD train photographs in ../shared/data
    python benchmarks/fundus.py --size 448 --reps 5
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image

from medfoundry.data.fundus import fundus_crop

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared timer beside this script, however it is run
from _timing import Timed, median, ratio, ratio_text, timed  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_FOLDER = REPO_ROOT.parent / "shared" / "data" / "idrid_dr_grading" / "train_images"


def bare_decode(files: list[Path], size: int) -> Timed:
    with timed() as span:
        for file in files:
            with Image.open(file) as image:
                image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    return span


def crop_all(files: list[Path], size: int, local_contrast: bool) -> Timed:
    with timed() as span:
        for file in files:
            fundus_crop(file, size, local_contrast=local_contrast)
    return span


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, default=DEFAULT_FOLDER)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--limit", type=int, default=20, help="photographs per repetition")
    args = parser.parse_args()
    files = sorted(args.folder.glob("*.jpg"))[: args.limit]
    if not files:
        raise SystemExit(f"{args.folder}: no .jpg photographs (this benchmark reads ../shared/data/idrid_dr_grading/)")
    with Image.open(files[0]) as first:
        full = first.size
    bare: list[Timed] = []
    crop: list[Timed] = []
    contrast: list[Timed] = []
    for rep in range(args.reps):
        sides = ["bare", "crop", "contrast"] if rep % 2 == 0 else ["contrast", "crop", "bare"]
        for side in sides:
            if side == "bare":
                bare.append(bare_decode(files, args.size))
            else:
                (crop if side == "crop" else contrast).append(crop_all(files, args.size, side == "contrast"))
    n = len(files)
    base = n / median(bare).wall
    fast, graham = n / median(crop).wall, n / median(contrast).wall
    print(f"{n} photographs of {full[0]}x{full[1]} -> {args.size} px; medians of {args.reps}")
    print(f"bare full-size decode + resize:     {base:6.1f} images/s")
    print(f"fundus_crop (FOV crop):             {fast:6.1f} images/s   ratio to bare {ratio_text(ratio(bare, crop))}")
    print(
        f"fundus_crop + local contrast:       {graham:6.1f} images/s   ratio to bare "
        f"{ratio_text(ratio(bare, contrast))}"
    )


if __name__ == "__main__":
    main()
