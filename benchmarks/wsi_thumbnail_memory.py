"""Peak memory of the tissue-mask thumbnail (``wsi/tiling.py: read_thumbnail``) against slide size.

Writes synthetic slides as tiled, zlib-compressed TIFFs (OpenSlide reads them as generic-tiff): single-level, and
pyramidal with levels at 1/4, 1/16, ... down to under 512 px. The content is two pre-built 256 px tiles (a
striped pink "tissue" tile inside a disc, white glass outside), so a 50k x 50k slide costs little disk and time.
Each measurement runs in a fresh child process, which reports its peak RSS (``ru_maxrss``) after imports and after
``read_thumbnail``; the difference is what the thumbnail cost. The parent checks the same peaks with
``RUSAGE_CHILDREN``. "whole" is the former behaviour (one strip: the whole best level read as RGBA at once),
"strips" the default (strips of 16 Mpx, 64 MiB as RGBA). The synthetic pyramids have integer downsamples, so
"strips" reads them in strips too (a fractional one is read whole up to 64 Mpx, see ``read_thumbnail``).

    python benchmarks/wsi_thumbnail_memory.py                       # 5k, 10k, 20k; both ways
    python benchmarks/wsi_thumbnail_memory.py --sizes 5000 50000 --no-whole

Target: "strips" stays under ~0.3 GB on every size (strip buffers of a 50k-wide level: RGBA strip + RGB copy +
OpenSlide's tile cache, plus the thumbnail itself), while "whole" grows as 8 bytes per level pixel.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

TILE = 256
_WHOLE = 2**62  # strip_pixels large enough that the whole level is one strip: the former code path


def _tiles(width: int, height: int) -> Iterator[np.ndarray]:
    """Tiles row by row: tissue inside a disc, glass outside (each level draws its own disc, at its own size)."""
    stripes = (np.arange(TILE) % 7 < 3)[None, :, None]
    tissue = np.where(stripes, np.array([120, 40, 110], np.uint8), np.array([200, 90, 160], np.uint8))
    tissue = np.broadcast_to(tissue, (TILE, TILE, 3)).copy()
    glass = np.full((TILE, TILE, 3), 240, np.uint8)
    cx, cy, radius = width * 0.45, height * 0.5, min(width, height) * 0.35
    for ty in range(0, height, TILE):
        for tx in range(0, width, TILE):
            inside = (tx + TILE / 2 - cx) ** 2 + (ty + TILE / 2 - cy) ** 2 < radius**2
            yield tissue if inside else glass


def write_slide(path: Path, size: int, pyramid: bool) -> None:
    import tifffile

    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        width = height = size
        first = True
        while True:
            tif.write(
                _tiles(width, height),
                shape=(height, width, 3),
                dtype=np.uint8,
                tile=(TILE, TILE),
                compression="zlib",
                compressionargs={"level": 1},
                photometric="rgb",
                subfiletype=0 if first else 1,
            )
            if not pyramid or max(width, height) // 4 < 512:
                break
            width, height, first = width // 4, height // 4, False


def child(path: str, strip_pixels: int) -> None:
    """Runs in a fresh process: peak RSS after imports, then after the thumbnail, as JSON on stdout."""
    from medfoundry.wsi.tiling import open_slide, read_thumbnail

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    slide = open_slide(Path(path))
    started = time.perf_counter()
    thumbnail = read_thumbnail(slide, 1024, Path(path), strip_pixels=strip_pixels)
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    level = slide.get_best_level_for_downsample(max(slide.dimensions) / 1024)
    print(
        json.dumps(
            {
                "before_kb": before,
                "after_kb": after,
                "seconds": seconds,
                "shape": list(thumbnail.shape),
                "level": level,
                "level_size": list(slide.level_dimensions[level]),
                "sha1": hashlib.sha1(np.ascontiguousarray(thumbnail).tobytes()).hexdigest(),
            }
        )
    )


def measure(path: Path, strip_pixels: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(path), str(strip_pixels)],
        check=True,
        capture_output=True,
        text=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    # RUSAGE_CHILDREN is the largest child so far: it confirms this child's peak when it is the largest yet.
    result["children_kb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 10000, 20000])
    parser.add_argument("--no-whole", action="store_true", help="skip the former whole-level read (needs ~8 B/px)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]))
        return
    print(f"{'slide':>22} {'read level':>12} {'way':>7} {'peak - base MB':>15} {'s':>6} {'equal':>6}")
    with tempfile.TemporaryDirectory(prefix="thumb_mem_") as tmp:
        for size in args.sizes:
            for pyramid in (False, True):
                path = Path(tmp) / f"{size}_{'pyr' if pyramid else 'single'}.tif"
                write_slide(path, size, pyramid)
                ways = [("strips", None)] + ([] if args.no_whole else [("whole", _WHOLE)])
                sums = []
                for way, strip in ways:
                    r = measure(path, strip if strip is not None else 16 * 1024 * 1024)
                    sums.append(r["sha1"])
                    name = f"{size}x{size} {'pyramid' if pyramid else 'single'}"
                    level = "x".join(map(str, r["level_size"]))
                    delta = (r["after_kb"] - r["before_kb"]) / 1024
                    same = "" if len(sums) < 2 else str(sums[0] == sums[1])
                    print(f"{name:>22} {level:>12} {way:>7} {delta:>15.0f} {r['seconds']:>6.1f} {same:>6}", flush=True)
                path.unlink()


if __name__ == "__main__":
    main()
