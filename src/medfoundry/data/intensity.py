"""Intensity handling for CT and MRI volumes: CT windows, MRI percentile normalisation, resampling.

Every function takes a :class:`~medfoundry.data.volume.Volume` (and returns one with the same geometry, except
:func:`resample`) or, for the intensity functions, a plain array (and returns a float32 array).

* :func:`apply_window` maps Hounsfield units to [0, 1] with a window of centre ``level`` and ``width``:
  ``level - width / 2`` -> 0, ``level + width / 2`` -> 1, linear between, clipped outside (the DICOM
  "LINEAR" VOI function without its half-unit offsets, which matter only for integer display).
* :func:`percentile_normalise` maps the ``low``..``high`` percentiles (computed inside a foreground mask when
  one is given) to 0..1, clipped: MRI has no absolute scale, so each scan is scaled by its own intensities.
* :func:`resample` changes the voxel spacing, keeping the world position of voxel (0, 0, 0) and the
  direction.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from medfoundry.data.volume import Volume
from medfoundry.errors import DataError

# (level, width) in HU. Source: Radiopaedia, "Windowing (CT)" (radiopaedia.org/articles/windowing-ct),
# which lists brain W:80 L:40, lungs W:1500 L:-600, mediastinum W:350 L:50, abdominal soft tissue
# W:400 L:50 and bone W:1800 L:400; the same values are the defaults of common PACS viewers.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "soft_tissue": (50.0, 400.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
}

Window = str | tuple[float, float]


def window_bounds(window: Window) -> tuple[float, float]:
    """The (low, high) HU of a preset name (``"lung"``, ``"soft tissue"``, ...) or a ``(level, width)`` pair."""
    if isinstance(window, str):
        key = window.strip().lower().replace(" ", "_").replace("-", "_")
        if key not in WINDOW_PRESETS:
            raise DataError(f"unknown CT window {window!r}; presets: {', '.join(sorted(WINDOW_PRESETS))}")
        level, width = WINDOW_PRESETS[key]
    else:
        level, width = (float(v) for v in window)
    if not width > 0:
        raise DataError(f"CT window width must be positive, got {width}")
    return level - width / 2.0, level + width / 2.0


def apply_window(hu: np.ndarray | Volume, window: Window) -> Any:
    """HU -> [0, 1] float32 through a preset name or a ``(level, width)`` pair; a Volume gives a Volume."""
    low, high = window_bounds(window)
    values = _values(hu)
    scaled = np.clip((values - np.float32(low)) / np.float32(high - low), 0.0, 1.0).astype(np.float32)
    return _like(hu, scaled)


def percentile_normalise(
    volume: np.ndarray | Volume,
    low: float = 0.5,
    high: float = 99.5,
    mask: np.ndarray | None = None,
) -> Any:
    """Map the ``low``..``high`` percentiles to 0..1 (clipped), float32; percentiles taken inside ``mask``.

    ``mask`` (bool, same shape) restricts the statistics to the foreground (for MRI, where the background
    is most voxels and would pull the low percentile to zero); the whole volume is still normalised.
    """
    if not 0.0 <= low < high <= 100.0:
        raise DataError(f"percentiles must satisfy 0 <= low < high <= 100, got {low} and {high}")
    values = _values(volume)
    sample = values
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != values.shape:
            raise DataError(f"mask shape {mask.shape} differs from the volume's {values.shape}")
        sample = values[mask]
        if sample.size == 0:
            raise DataError("foreground mask is empty: no voxel to take percentiles from")
    bottom, top = (float(v) for v in np.percentile(sample, [low, high]))
    if not top > bottom:
        raise DataError(f"cannot normalise: the {low} and {high} percentiles are equal ({bottom})")
    scaled = np.clip((values - np.float32(bottom)) / np.float32(top - bottom), 0.0, 1.0).astype(np.float32)
    return _like(volume, scaled)


def resample(volume: Volume, spacing: float | tuple[float, float, float], order: int = 1) -> Volume:
    """The volume on a grid of ``spacing`` mm (one value or one per axis), by spline interpolation of ``order``.

    ``order`` 0 is nearest neighbour (for label maps), 1 trilinear, 3 cubic. The output grid keeps the
    origin and direction and covers the input's extent (voxel centres from the first to past the last);
    values outside it repeat the border.
    """
    # MONAI's Spacing computes the output grid from the affine (origin and direction kept, shape covering
    # the field of view) and interpolates in one call; tested here against an analytic ramp in world
    # coordinates. It handles oblique directions too, which a bare scipy.ndimage.zoom would leave to us.
    import torch
    from monai.data import MetaTensor
    from monai.transforms import Spacing

    target = (float(spacing),) * 3 if np.isscalar(spacing) else tuple(float(s) for s in spacing)  # type: ignore[arg-type]
    if len(target) != 3 or min(target) <= 0:
        raise DataError(f"target spacing must be 3 positive values in mm, got {spacing}", volume.source)
    if order not in range(6):
        raise DataError(f"interpolation order must be 0..5, got {order}", volume.source)
    image = MetaTensor(
        torch.from_numpy(np.ascontiguousarray(volume.array[None])), affine=torch.from_numpy(volume.affine)
    )
    # An int mode makes MONAI use scipy's spline interpolation of that order on CPU.
    transform = Spacing(pixdim=target, mode=order, padding_mode="border", dtype=torch.float32)
    output = transform(image)
    array = np.asarray(output.array[0], dtype=np.float32) if hasattr(output, "array") else np.asarray(output[0])
    affine = np.asarray(output.affine, dtype=float)
    resampled = Volume.from_affine(array, affine, volume.source, volume.metadata)
    resampled.metadata["resampled_from_spacing"] = volume.spacing
    return resampled


def _values(data: np.ndarray | Volume) -> np.ndarray:
    array = data.array if isinstance(data, Volume) else np.asarray(data)
    return array.astype(np.float32, copy=False)


def _like(original: np.ndarray | Volume, values: np.ndarray) -> Any:
    if isinstance(original, Volume):
        return dataclasses.replace(original, array=values, metadata=dict(original.metadata))
    return values
