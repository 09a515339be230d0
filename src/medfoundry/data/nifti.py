"""Cubic crops from NIfTI CT volumes (``.nii`` / ``.nii.gz``, one file or a folder), for 3D SSL pre-training.

Each volume is read by :func:`medfoundry.data.volume.load_nifti_volume` (RAS+, with its geometry) and turned
into the models' (D, H, W) = (z, y, x) layout by :meth:`~medfoundry.data.volume.Volume.to_dhw`, the one place
that converts. A CT window (default -1000..1000 HU) maps intensities to 0..1 float32. The volume is then cut
into cubic crops of ``crop_size`` voxels at every ``stride`` (default ``crop_size``: non-overlapping). Decisions:

* an axis shorter than ``crop_size`` is padded at its far end with the window's lower value (0 after
  windowing: air, as outside a CT's field of view), so a thin stack still yields crops; corners stay true voxel
  indices. Voxels past the last whole crop along an axis are not used.
* crops that are mostly air are dropped: a crop is kept when at least ``min_tissue_fraction`` (default 0.1)
  of its voxels are above ``tissue_hu`` (default -500 HU, between air at -1000 and fat at about -100; lung
  parenchyma at about -850 counts as air here).
* no resampling: voxel spacing differs between scans and is recorded, not changed. ``spacing_mm`` on the
  returned set maps each scan (patient id) to its (z, y, x) spacing in mm, the crops' axis order.

Ids are ``{scan}@z{z}y{y}x{x}`` (the crop's corner in the reoriented volume); ``patient_ids`` are the scan
names (file name without ``.nii``/``.nii.gz``, with its folder relative to the dataset folder), so crops of one
scan always stay in one group. There is one split, ``train``, with no labels: this is pre-training data.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medfoundry.data.sample import ArrayImageSet, Splits
from medfoundry.data.volume import Volume, load_nifti_volume
from medfoundry.errors import DataError

SUFFIXES = (".nii", ".nii.gz")


@dataclass
class VolumeCropSet(ArrayImageSet):
    """Crops (N, 1, S, S, S) with their scan's voxel spacing: ``spacing_mm[patient_id] = (z, y, x)`` in mm."""

    spacing_mm: dict[str, tuple[float, float, float]] = field(default_factory=dict)


def load_nifti_crops(
    path: str | Path,
    *,
    crop_size: int = 32,
    stride: int | None = None,
    window: tuple[float, float] = (-1000.0, 1000.0),
    tissue_hu: float = -500.0,
    min_tissue_fraction: float = 0.1,
    name: str | None = None,
) -> Splits:
    """Crops of one NIfTI file, or of every ``.nii``/``.nii.gz`` file under a folder, as ``{"train": set}``.

    Raises:
        DataError: no volumes, an unreadable / non-3D / NaN file (named), bad arguments, or no crop left.
    """
    path = Path(path)
    files = _volume_files(path)
    scans = ((_scan_name(file, path), load_nifti_volume(file)) for file in files)
    return crop_volumes(
        scans,
        path,
        name or _dataset_name(path),
        crop_size=crop_size,
        stride=stride,
        window=window,
        tissue_hu=tissue_hu,
        min_tissue_fraction=min_tissue_fraction,
    )


def crop_volumes(
    scans: Iterable[tuple[str, Volume]],
    source: Path,
    name: str,
    *,
    crop_size: int = 32,
    stride: int | None = None,
    window: tuple[float, float] = (-1000.0, 1000.0),
    tissue_hu: float = -500.0,
    min_tissue_fraction: float = 0.1,
) -> Splits:
    """Windowed cubic crops of (scan name, HU volume) pairs, as ``{"train": set}``; shared by the NIfTI and DICOM
    readers (the decisions are in this module's docstring)."""
    stride = stride or crop_size
    low, high = float(window[0]), float(window[1])
    if crop_size < 1 or stride < 1:
        raise DataError(f"crop_size ({crop_size}) and stride ({stride}) must be positive", source)
    if not high > low:
        raise DataError(f"CT window {window} must have its upper bound above its lower bound", source)
    crops: list[np.ndarray] = []
    ids: list[str] = []
    patients: list[str] = []
    spacing: dict[str, tuple[float, float, float]] = {}
    for scan, ras in scans:
        volume, spacing[scan] = ras.to_dhw()
        windowed = np.clip((volume - low) / (high - low), 0.0, 1.0).astype(np.float32)
        tissue_level = float(np.clip((tissue_hu - low) / (high - low), 0.0, 1.0))
        for corner, crop in _cut(windowed, crop_size, stride):
            if (crop > tissue_level).mean() < min_tissue_fraction:
                continue
            crops.append(crop)
            ids.append(f"{scan}@z{corner[0]}y{corner[1]}x{corner[2]}")
            patients.append(scan)
    if not crops:
        raise DataError(
            f"no crop of {crop_size} voxels has {min_tissue_fraction:.0%} of voxels above {tissue_hu} HU "
            f"in {len(spacing)} volume(s); lower min_tissue_fraction or crop_size",
            source,
        )
    images = np.stack(crops)[:, None]
    train = VolumeCropSet(
        name=f"{name}:train",
        source=source,
        images=images,
        ids=ids,
        patient_ids=patients,
        labels=None,
        spacing_mm=spacing,
    )
    return {"train": train}


def _volume_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.lower().endswith(SUFFIXES))
        if not files:
            raise DataError("folder holds no .nii or .nii.gz file", path)
        return files
    raise DataError("NIfTI file or folder not found", path)


def _scan_name(file: Path, root: Path) -> str:
    relative = file.relative_to(root) if root.is_dir() else Path(file.name)
    text = relative.as_posix()
    for suffix in (".nii.gz", ".nii"):
        if text.lower().endswith(suffix):
            return text[: -len(suffix)]
    return text


def _dataset_name(path: Path) -> str:
    return path.name if path.is_dir() else _scan_name(path, path)


def _cut(volume: np.ndarray, size: int, stride: int) -> list[tuple[tuple[int, int, int], np.ndarray]]:
    padding = [(0, max(0, size - n)) for n in volume.shape]
    if any(after for _, after in padding):
        volume = np.pad(volume, padding, constant_values=0.0)
    starts = [range(0, n - size + 1, stride) for n in volume.shape]
    return [
        ((z, y, x), volume[z : z + size, y : y + size, x : x + size])
        for z in starts[0]
        for y in starts[1]
        for x in starts[2]
    ]
