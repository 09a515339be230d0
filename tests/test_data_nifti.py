"""NIfTI crops from a real CT (TotalSegmentator's example, int16 HU, 122x101x30 voxels of 3 mm): how many crops,
their shape and range, ids and patient grouping, orientation, and clear errors on broken files."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medfoundry.data.nifti import load_nifti_crops
from medfoundry.data.registry import load_dataset
from medfoundry.errors import DataError


@pytest.fixture(scope="module")
def ct_path(shared_data: Path) -> Path:
    path = shared_data / "totalsegmentator_ct_examples" / "example_ct_sm.nii.gz"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    return path


def test_default_crops(ct_path: Path) -> None:
    crops = load_dataset(f"nifti:{ct_path}")["train"]
    # RAS+ (z, y, x) = (30, 101, 122): z padded to 32, then 1 x 3 x 3 non-overlapping 32-voxel crops, none mostly air.
    assert len(crops) == 9
    assert crops.images.shape == (9, 1, 32, 32, 32) and crops.images.dtype == np.float32
    assert crops.images.min() == 0.0 and crops.images.max() == 1.0
    assert crops.labels is None
    assert crops.ids[:2] == ["example_ct_sm@z0y0x0", "example_ct_sm@z0y0x32"]
    assert set(crops.patient_ids) == {"example_ct_sm"}
    assert crops.spacing_mm == {"example_ct_sm": (3.0, 3.0, 3.0)}
    # The two padded slices are air (0 after windowing); the real ones are not all air.
    assert crops.images[:, :, 30:].max() == 0.0 and crops.images[:, :, :30].max() > 0.5


def test_window_matches_hounsfield_units(ct_path: Path) -> None:
    hu = np.asarray(nib.as_closest_canonical(nib.load(ct_path)).get_fdata()).transpose(2, 1, 0)
    crops = load_nifti_crops(ct_path, window=(-200.0, 300.0))["train"]
    expected = np.clip((hu[:30, 32:64, 64:96] + 200.0) / 500.0, 0.0, 1.0)
    index = crops.ids.index("example_ct_sm@z0y32x64")
    np.testing.assert_allclose(crops.images[index, 0, :30], expected, atol=1e-6)


def test_stride_and_air_filter(ct_path: Path) -> None:
    assert len(load_nifti_crops(ct_path, crop_size=28, stride=14)["train"]) == 1 * 6 * 7
    # 16-voxel crops: 1 x 6 x 7 = 42, of which 3 lie in air (less than 10% of voxels above -500 HU).
    kept = load_nifti_crops(ct_path, crop_size=16)["train"]
    assert len(load_nifti_crops(ct_path, crop_size=16, min_tissue_fraction=0.0)["train"]) == 42
    assert len(kept) == 39
    assert ((kept.images > 0.25).mean(axis=(1, 2, 3, 4)) >= 0.1).all()


def test_orientation_is_canonical(ct_path: Path, tmp_path: Path) -> None:
    """The same scan stored left-posterior-superior gives the same crops (reoriented to RAS+)."""
    image = nib.load(ct_path)
    to_lps = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(image.affine), nib.orientations.axcodes2ornt(("L", "P", "S"))
    )
    flipped = image.as_reoriented(to_lps)
    assert nib.aff2axcodes(flipped.affine) == ("L", "P", "S")
    nib.save(flipped, tmp_path / "lps.nii.gz")
    a = load_nifti_crops(ct_path)["train"].images
    b = load_nifti_crops(tmp_path / "lps.nii.gz")["train"].images
    np.testing.assert_array_equal(a, b)


def test_folder_groups_crops_by_scan(ct_path: Path, tmp_path: Path) -> None:
    for scan in ("a", "b"):
        (tmp_path / scan).mkdir()
        shutil.copy(ct_path, tmp_path / scan / "ct.nii.gz")
    (tmp_path / "notes.txt").write_text("not a volume")
    crops = load_dataset(f"nifti:{tmp_path}")["train"]
    assert len(crops) == 18 and crops.name == f"{tmp_path.name}:train"
    assert crops.patient_ids == ["a/ct"] * 9 + ["b/ct"] * 9
    assert crops.ids[9] == "b/ct@z0y0x0"
    assert set(crops.spacing_mm) == {"a/ct", "b/ct"}


def _save(array: np.ndarray, path: Path) -> Path:
    nib.save(nib.Nifti1Image(array, np.eye(4)), path)
    return path


@pytest.mark.parametrize(
    "kind, message",
    [
        ("junk", "not a readable NIfTI volume"),
        ("truncated", "not a readable NIfTI volume"),
        ("flat", r"expected a 3D volume, got shape \(40, 40\)"),
        ("nan", "1 NaN or inf voxel"),
    ],
)
def test_broken_files_name_the_file(ct_path: Path, tmp_path: Path, kind: str, message: str) -> None:
    path = tmp_path / f"{kind}.nii.gz"
    if kind == "junk":
        path.write_bytes(b"this is not a NIfTI file" * 20)
    elif kind == "truncated":
        data = ct_path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "flat":
        _save(np.zeros((40, 40), np.float32), path)
    else:
        volume = np.zeros((40, 40, 40), np.float32)
        volume[3, 4, 5] = np.nan
        _save(volume, path)
    with pytest.raises(DataError, match=message) as error:
        load_dataset(path)  # unprefixed: the .nii.gz suffix picks the NIfTI reader
    assert str(path) in str(error.value)


def test_empty_inputs_are_clear(ct_path: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no .nii or .nii.gz file"):
        load_dataset(f"nifti:{tmp_path}")
    with pytest.raises(DataError, match="no crop of 32 voxels"):
        load_nifti_crops(ct_path, min_tissue_fraction=1.01)
    with pytest.raises(DataError, match="not found"):
        load_nifti_crops(tmp_path / "missing.nii.gz")
