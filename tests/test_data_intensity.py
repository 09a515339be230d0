"""CT windows, MRI percentile normalisation and resampling to a target spacing (checked against world coordinates)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medfoundry.data.intensity import (
    WINDOW_PRESETS,
    apply_window,
    percentile_normalise,
    resample,
    window_bounds,
)
from medfoundry.data.volume import Volume, load_nifti_volume
from medfoundry.errors import DataError


def _volume(array: np.ndarray, affine: np.ndarray) -> Volume:
    return Volume.from_affine(array.astype(np.float32), affine)


def test_presets_and_bounds() -> None:
    assert set(WINDOW_PRESETS) >= {"lung", "mediastinum", "soft_tissue", "bone", "brain"}
    assert window_bounds("lung") == (-1350.0, 150.0)
    assert window_bounds("Soft tissue") == (-150.0, 250.0)
    assert window_bounds("brain") == (0.0, 80.0)
    assert window_bounds((40, 400)) == (-160.0, 240.0)
    with pytest.raises(DataError, match="unknown CT window 'liverish'; presets: bone, brain"):
        window_bounds("liverish")
    with pytest.raises(DataError, match="width must be positive"):
        window_bounds((40, 0))


def test_apply_window_values() -> None:
    hu = np.array([-2000.0, -1350.0, -600.0, 150.0, 3000.0])
    np.testing.assert_allclose(apply_window(hu, "lung"), [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-6)
    out = apply_window(hu.astype(np.int16), (0, 100))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [0, 0, 0, 1, 1])


def test_apply_window_keeps_volume_geometry() -> None:
    affine = np.diag([0.5, 0.5, 2.0, 1.0])
    affine[:3, 3] = (1.0, 2.0, 3.0)
    volume = _volume(np.linspace(-1000, 1000, 27).reshape(3, 3, 3), affine)
    windowed = apply_window(volume, "bone")
    assert isinstance(windowed, Volume)
    np.testing.assert_allclose(windowed.affine, volume.affine)
    assert windowed.array.min() == 0.0 and windowed.array.max() <= 1.0
    assert volume.array.min() == -1000.0  # the input is left untouched


def test_percentile_normalise_with_and_without_mask() -> None:
    rng = np.random.default_rng(0)
    array = np.zeros((20, 20, 20), np.float32)  # MRI-like: most voxels are background at 0
    foreground = np.zeros_like(array, dtype=bool)
    foreground[5:15, 5:15, 5:15] = True
    array[foreground] = rng.uniform(100.0, 200.0, foreground.sum())
    whole = percentile_normalise(array)
    assert whole.dtype == np.float32 and whole.min() == 0.0 and whole.max() == 1.0
    # Without a mask the 0.5th percentile is background (0), so foreground keeps an offset above 0.
    assert whole[foreground].min() > 0.4
    masked = percentile_normalise(array, low=1.0, high=99.0, mask=foreground)
    low, high = np.percentile(array[foreground], [1.0, 99.0])
    np.testing.assert_allclose(masked[foreground], np.clip((array[foreground] - low) / (high - low), 0, 1), atol=1e-5)
    assert (masked[~foreground] == 0.0).all()


def test_percentile_normalise_errors() -> None:
    array = np.ones((4, 4, 4), np.float32)
    with pytest.raises(DataError, match="percentiles are equal"):
        percentile_normalise(array)
    with pytest.raises(DataError, match="mask is empty"):
        percentile_normalise(np.arange(64.0).reshape(4, 4, 4), mask=np.zeros((4, 4, 4), bool))
    with pytest.raises(DataError, match="mask shape"):
        percentile_normalise(np.arange(64.0).reshape(4, 4, 4), mask=np.ones((4, 4), bool))
    with pytest.raises(DataError, match="0 <= low < high <= 100"):
        percentile_normalise(np.arange(64.0).reshape(4, 4, 4), low=99.0, high=1.0)


def _ramp(shape: tuple[int, int, int], affine: np.ndarray) -> tuple[Volume, np.ndarray]:
    """A volume whose value is a linear function of world position, so any grid can be checked exactly."""
    gradient = np.array([0.3, -0.2, 0.5])
    indices = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    world = indices @ affine[:3, :3].T + affine[:3, 3]
    return _volume(world @ gradient + 1.0, affine), gradient


def test_resample_keeps_world_positions() -> None:
    affine = np.array([[0.8, 0, 0, -10.0], [0, 0.9, 0, 5.0], [0, 0, 2.5, 3.0], [0, 0, 0, 1.0]])
    volume, gradient = _ramp((40, 30, 12), affine)
    out = resample(volume, (2.0, 2.0, 2.0), order=1)
    assert out.spacing == (2.0, 2.0, 2.0) and out.array.dtype == np.float32
    np.testing.assert_allclose(out.origin, volume.origin)
    np.testing.assert_allclose(out.direction, volume.direction)
    # The new grid covers the old extent: 39 * 0.8 mm = 31.2 mm -> 17 voxels of 2 mm.
    assert out.shape == (17, 14, 15)
    indices = np.stack(np.meshgrid(*[np.arange(n) for n in out.shape], indexing="ij"), -1)
    world = out.voxel_to_world(indices)
    inside = np.all((indices * np.array(out.spacing)) <= (np.array(volume.shape) - 1) * np.array(volume.spacing), -1)
    np.testing.assert_allclose(out.array[inside], (world @ gradient + 1.0)[inside], atol=1e-3)


def test_resample_labels_nearest_and_scalar_spacing() -> None:
    labels = np.zeros((10, 10, 10), np.float32)
    labels[2:8, 2:8, 2:8] = 5.0
    out = resample(_volume(labels, np.diag([1.0, 1.0, 1.0, 1.0])), 0.5, order=0)
    assert out.shape == (19, 19, 19)
    assert set(np.unique(out.array)) == {0.0, 5.0}
    with pytest.raises(DataError, match="3 positive values"):
        resample(out, (1.0, 0.0, 1.0))
    with pytest.raises(DataError, match="order must be 0..5"):
        resample(out, 1.0, order=7)


def test_resample_real_mri(shared_data: Path) -> None:
    path = shared_data / "package_test_images" / "nibabel" / "anatomical.nii"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    volume = load_nifti_volume(path)  # 33 x 41 x 25 voxels of 2 mm
    out = resample(volume, 4.0, order=1)
    assert out.shape == (17, 21, 13) and out.spacing == (4.0, 4.0, 4.0)
    # Every other voxel of the new grid is a voxel of the old one: trilinear returns it exactly.
    np.testing.assert_allclose(out.array, volume.array[::2, ::2, ::2], rtol=1e-5, atol=1e-2)
    normalised = percentile_normalise(out, mask=out.array > 0)
    assert normalised.array.min() == 0.0 and normalised.array.max() == 1.0
