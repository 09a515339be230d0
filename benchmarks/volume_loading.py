"""DICOM series loading speed: ``load_dicom_series`` against a bare pydicom read loop, in slices per second.

``load_dicom_series`` does everything a user needs: find and group the files, sort them along the slice normal,
check the spacing, decode the pixels, apply RescaleSlope/Intercept, reorient to RAS+ and build the geometry.
The baseline is the least any reader must do: ``dcmread`` every file, ``pixel_array * slope + intercept`` as
float32, stacked (files taken in name order, no sorting or geometry). Repetitions alternate the two sides and
medians are reported, so a noisy machine shifts both alike; the ratio is reader / bare (1.0 = no overhead), from
wall seconds and from CPU seconds (user + system; benchmarks/_timing.py), the latter steady on a loaded machine.
Both run on the series as stored and on an uncompressed copy (where decoding no longer hides the overhead).

    python benchmarks/volume_loading.py                    # TotalSegmentator's 20-slice CT (JPEG 2000, 512x512)
    python benchmarks/volume_loading.py --series DIR --reps 9
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import pydicom

from medfoundry.data.volume import load_dicom_series

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared timer beside this script, however it is run
from _timing import Timed, median, ratio, ratio_text, run_timed  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SERIES = REPO_ROOT.parent / "shared" / "data" / "totalsegmentator_ct_examples" / "example_ct_dicom"


def bare_pydicom(folder: Path) -> np.ndarray:
    slices = []
    for file in sorted(p for p in folder.iterdir() if p.is_file()):
        dataset = pydicom.dcmread(file)
        slope = float(dataset.get("RescaleSlope", 1.0))
        intercept = float(dataset.get("RescaleIntercept", 0.0))
        slices.append(dataset.pixel_array.astype(np.float32) * slope + intercept)
    return np.stack(slices)


def reader(folder: Path) -> np.ndarray:
    return load_dicom_series(folder).array


def decompressed_copy(folder: Path, dest: Path) -> Path:
    """The series re-saved uncompressed (Explicit VR Little Endian), to time reading without the JPEG decoder."""
    for file in sorted(p for p in folder.iterdir() if p.is_file()):
        dataset = pydicom.dcmread(file)
        dataset.decompress()
        dataset.save_as(dest / file.name)
    return dest


def compare(folder: Path, reps: int, label: str) -> None:
    n_slices = len(bare_pydicom(folder))  # warm-up of both sides: imports, decoders, file cache
    volume = load_dicom_series(folder)
    times: dict[str, list[Timed]] = {"load_dicom_series": [], "bare pydicom loop": []}
    for _ in range(reps):
        for name, load in (("load_dicom_series", reader), ("bare pydicom loop", bare_pydicom)):
            times[name].append(run_timed(lambda load=load: load(folder))[1])
    print(f"{label}: {folder} ({n_slices} slices, {volume.shape} voxels, {volume.metadata.get('modality')})")
    for name, spans in times.items():
        middle, walls = median(spans), [span.wall for span in spans]
        spread = f"{min(walls) * 1e3:.0f}..{max(walls) * 1e3:.0f} ms"
        print(
            f"{name:>20}: {n_slices / middle.wall:7.1f} slices/s (median {middle.wall * 1e3:.0f} ms, {spread}; "
            f"{middle.cpu * 1e3:.0f} CPU-ms)"
        )
    speed = ratio(times["bare pydicom loop"], times["load_dicom_series"])
    print(f"speed ratio load_dicom_series / bare loop: {ratio_text(speed)} (medians of {reps} interleaved reps)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--series", type=Path, default=DEFAULT_SERIES, help="folder holding one DICOM series")
    parser.add_argument("--reps", type=int, default=7, help="timed repetitions of each side (after one warm-up)")
    args = parser.parse_args()
    compare(args.series, args.reps, "as stored")
    with tempfile.TemporaryDirectory() as tmp:
        compare(decompressed_copy(args.series, Path(tmp)), args.reps, "uncompressed copy")


if __name__ == "__main__":
    main()
