"""Volumes from DICOM series and NIfTI: geometry in RAS+ (x, y, z), HU values, and clear errors on bad input.

Real data: TotalSegmentator's example CT (a 20-slice DICOM series, 512x512, 0.977 mm pixels, 2 mm slices, JPEG
2000 compressed, with its label map as NIfTI on the same grid) and DICOM/NIfTI test images from pydicom and
nibabel wheels. The 3 mm NIfTI CT shipped beside it (example_ct_sm) covers a different body region (z 94..184
mm against -804..-767 mm), so it is not compared with the series.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from helpers import expect_data_error
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGLSLossless

from medfoundry.data.volume import (
    SliceSpacingWarning,
    Volume,
    load_dicom_series,
    load_nifti_volume,
    load_volume,
)

LIVER, SPLEEN = 5, 1


@pytest.fixture(scope="module")
def ts_dir(shared_data: Path) -> Path:
    path = shared_data / "totalsegmentator_ct_examples"
    if not (path / "example_ct_dicom").is_dir():
        pytest.skip(f"{path} is absent")
    return path


@pytest.fixture(scope="module")
def pkg_dir(shared_data: Path) -> Path:
    path = shared_data / "package_test_images"
    if not path.is_dir():
        pytest.skip(f"{path} is absent")
    return path


@pytest.fixture(scope="module")
def ct_series(ts_dir: Path) -> Volume:
    return load_dicom_series(ts_dir / "example_ct_dicom")


def _series_files(ts_dir: Path) -> list[Path]:
    return sorted((ts_dir / "example_ct_dicom").iterdir())


def _link(files: list[Path], folder: Path, names: list[str] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for index, file in enumerate(files):
        os.symlink(file.resolve(), folder / (names[index] if names else file.name))
    return folder


# ------------------------------------------------------------------------------------------ geometry


def test_series_matches_totalsegmentator_label_nifti(ct_series: Volume, ts_dir: Path) -> None:
    """TotalSegmentator's own NIfTI of this series (its label map, stored L-A-S) gives the same RAS+ grid."""
    labels = load_nifti_volume(ts_dir / "example_seg_dicom.nii.gz")
    assert ct_series.shape == labels.shape == (512, 512, 20)
    assert ct_series.array.dtype == np.float32
    np.testing.assert_allclose(ct_series.spacing, (0.9765625, 0.9765625, 2.0))
    np.testing.assert_allclose(ct_series.spacing, labels.spacing, atol=1e-5)
    np.testing.assert_allclose(ct_series.origin, labels.origin, atol=1e-3)
    np.testing.assert_allclose(ct_series.direction, labels.direction, atol=1e-6)
    np.testing.assert_allclose(ct_series.direction, np.eye(3), atol=1e-6)
    # Voxels line up: labelled organs are soft tissue in HU, and the liver is contrast-enhanced tissue.
    organs = labels.array > 0
    assert (ct_series.array[organs] > -200).mean() > 0.95
    assert 40 < np.median(ct_series.array[labels.array == LIVER]) < 200
    # A front-back flip would put ~30 % of organ voxels on air or fat: the check discriminates.
    assert (ct_series.array[:, ::-1][organs] > -200).mean() < 0.8
    # RAS+: the liver (patient's right) has a larger x than the spleen (patient's left).
    liver_x = ct_series.voxel_to_world(np.argwhere(labels.array == LIVER))[:, 0].mean()
    spleen_x = ct_series.voxel_to_world(np.argwhere(labels.array == SPLEEN))[:, 0].mean()
    assert liver_x > spleen_x + 50


def test_series_equals_nifti_built_independently(ct_series: Volume, ts_dir: Path, tmp_path: Path) -> None:
    """A NIfTI written from a plain pydicom loop (sorted by SliceLocation, voxels stored (row, column, slice) in
    DICOM's order, in-plane geometry from nibabel's DICOM wrapper) reads back to the same array and affine."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from nibabel.nicom import dicomwrappers

    datasets = sorted((pydicom.dcmread(f) for f in _series_files(ts_dir)), key=lambda d: float(d.SliceLocation))
    stack = np.stack([d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in datasets], -1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nibabel calls its DICOM readers experimental
        # nibabel's affine maps (row, column) indices: axis 0 runs down the columns.
        lps = np.array(dicomwrappers.wrapper_from_file(_series_files(ts_dir)[0]).affine, dtype=float)
    first = np.array([float(v) for v in datasets[0].ImagePositionPatient])
    last = np.array([float(v) for v in datasets[-1].ImagePositionPatient])
    lps[:3, 2] = (last - first) / (len(datasets) - 1)
    lps[:3, 3] = first
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    path = tmp_path / "from_dicom.nii.gz"
    nib.save(nib.Nifti1Image(stack.astype(np.int16), ras), path)
    from_nifti = load_nifti_volume(path)
    np.testing.assert_array_equal(from_nifti.array, ct_series.array)
    np.testing.assert_allclose(from_nifti.affine, ct_series.affine, atol=1e-4)


def test_hu_on_known_voxels(ct_series: Volume, ts_dir: Path) -> None:
    """Stored value * slope + intercept read with pydicom for given pixels, found through world coordinates."""
    file = _series_files(ts_dir)[5]
    dataset = pydicom.dcmread(file)
    stored = dataset.pixel_array
    ipp = np.array([float(v) for v in dataset.ImagePositionPatient])
    row_cos = np.array([float(v) for v in dataset.ImageOrientationPatient[:3]])
    col_cos = np.array([float(v) for v in dataset.ImageOrientationPatient[3:]])
    dr, dc = (float(v) for v in dataset.PixelSpacing)
    for row, col in [(0, 0), (100, 200), (256, 256), (300, 140), (511, 511)]:
        lps = ipp + col * dc * row_cos + row * dr * col_cos
        index = ct_series.world_to_voxel(lps * np.array([-1.0, -1.0, 1.0]))
        assert np.allclose(index, np.round(index), atol=1e-3)
        expected = float(stored[row, col]) * float(dataset.RescaleSlope) + float(dataset.RescaleIntercept)
        assert ct_series.array[tuple(np.round(index).astype(int))] == expected
    # Outside the reconstruction circle the scanner stores -1024. A 39 x 15 mm patch in the midline, 75 mm in
    # front of the abdomen (the body ends at y index 347 there) and inside the circle, is room air: about -1000.
    assert ct_series.array[0, 0, 0] == -1024.0
    air = ct_series.array[236:276, 490:505, :]
    assert -1010 < np.median(air) < -985 and air.max() < -950


def test_sorting_ignores_file_names(ct_series: Volume, ts_dir: Path, tmp_path: Path) -> None:
    files = _series_files(ts_dir)
    names = [f"IM{(i * 7) % len(files):04d}.dcm" for i in range(len(files))]  # scrambled order
    volume = load_dicom_series(_link(files, tmp_path / "scrambled", names))
    np.testing.assert_array_equal(volume.array, ct_series.array)
    assert volume.origin == ct_series.origin


def test_oblique_two_slice_mr(pkg_dir: Path) -> None:
    """nibabel's two Siemens MR slices: 3 mm apart, tilted 0.3 degrees about x; direction stays orthonormal."""
    volume = load_dicom_series([pkg_dir / "nibabel" / "1.dcm", pkg_dir / "nibabel" / "0.dcm"])
    assert volume.shape == (256, 256, 2)
    np.testing.assert_allclose(volume.spacing[2], 3.0, atol=1e-4)
    np.testing.assert_allclose(volume.direction.T @ volume.direction, np.eye(3), atol=1e-6)
    assert abs(volume.direction[1, 2]) > 1e-3  # the tilt is kept in the direction, not dropped
    # Voxel (0, 0, 0) is the corner nearest right-posterior-inferior; the first slice (lower z) is 0.dcm.
    first = pydicom.dcmread(pkg_dir / "nibabel" / "0.dcm")
    assert volume.origin[2] < float(first.ImagePositionPatient[2]) + 1.0


def test_load_volume_dispatch(ct_series: Volume, ts_dir: Path, pkg_dir: Path) -> None:
    one_file = load_volume(_series_files(ts_dir)[3])  # one slice loads its whole series
    np.testing.assert_array_equal(one_file.array, ct_series.array)
    assert load_volume(ts_dir / "example_ct_dicom").shape == (512, 512, 20)
    nifti = load_volume(pkg_dir / "nibabel" / "anatomical.nii")
    assert nifti.shape == (33, 41, 25) and nifti.spacing == (2.0, 2.0, 2.0)
    expected = np.asarray(nib.as_closest_canonical(nib.load(pkg_dir / "nibabel" / "anatomical.nii")).get_fdata())
    np.testing.assert_array_equal(nifti.array, expected.astype(np.float32))
    expect_data_error(lambda: load_volume(ts_dir / "labels_total.csv"), ts_dir / "labels_total.csv", "neither NIfTI")
    seg = pkg_dir / "pydicom_data" / "liver.dcm"
    expect_data_error(lambda: load_volume(seg), seg, "Segmentation Storage")


# ------------------------------------------------------------------------------------------ bad DICOM


def test_missing_slice_warns_and_returns(ts_dir: Path, tmp_path: Path) -> None:
    files = _series_files(ts_dir)
    folder = _link(files[:9] + files[10:], tmp_path / "gap")
    with pytest.warns(SliceSpacingWarning) as caught:
        volume = load_dicom_series(folder)
    assert volume.shape == (512, 512, 19) and volume.spacing[2] == 2.0
    message = str(caught[0].message)
    assert str(folder) in message and "gap of 4.00 mm" in message
    assert "at -786.50 mm" in message and "at -782.50 mm" in message  # the slice at -784.5 mm is missing


def test_uneven_spacing_warns(ts_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "uneven"
    folder.mkdir()
    for index, file in enumerate(_series_files(ts_dir)[:5]):
        dataset = pydicom.dcmread(file)
        if index == 2:  # nudge one slice 0.5 mm: steps become 2.5 and 1.5 mm around it
            dataset.ImagePositionPatient[2] = float(dataset.ImagePositionPatient[2]) + 0.5
        dataset.save_as(folder / file.name)
    with pytest.warns(SliceSpacingWarning, match="uneven slice spacing"):
        volume = load_dicom_series(folder)
    assert volume.shape[2] == 5


def test_even_series_gives_no_warning(ts_dir: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", SliceSpacingWarning)
        load_dicom_series(ts_dir / "example_ct_dicom")


def test_several_series_listed_then_chosen(ts_dir: Path, pkg_dir: Path, tmp_path: Path) -> None:
    folder = _link(_series_files(ts_dir)[:3], tmp_path / "mixed")
    _link([pkg_dir / "nibabel" / "0.dcm", pkg_dir / "nibabel" / "1.dcm", pkg_dir / "pydicom" / "CT_small.dcm"], folder)
    mr_uid = str(pydicom.dcmread(pkg_dir / "nibabel" / "0.dcm").SeriesInstanceUID)
    expect_data_error(
        lambda: load_dicom_series(folder),
        folder,
        "3 series found",
        mr_uid,
        "(MR, ",
        "2 files",
        "'CT Body 3.0', 3 files",
    )
    volume = load_dicom_series(folder, series_uid=mr_uid)
    assert volume.shape == (256, 256, 2) and volume.metadata["modality"] == "MR"
    expect_data_error(lambda: load_dicom_series(folder, series_uid="1.2.3"), folder, "no series with UID 1.2.3")


def test_no_pixel_data_names_file(pkg_dir: Path, tmp_path: Path) -> None:
    dataset = pydicom.dcmread(pkg_dir / "pydicom" / "CT_small.dcm")
    del dataset.PixelData
    path = tmp_path / "series" / "no_pixels.dcm"
    path.parent.mkdir()
    dataset.save_as(path)
    expect_data_error(lambda: load_dicom_series(path.parent), path, "no pixel data", "CT Image Storage")


def test_compressed_without_decoder_names_syntax(pkg_dir: Path, tmp_path: Path) -> None:
    from pydicom.pixels import get_decoder

    if get_decoder(JPEGLSLossless).is_available:
        pytest.skip("a JPEG-LS decoder is installed here")
    dataset = pydicom.dcmread(pkg_dir / "pydicom" / "MR_small.dcm")
    dataset.file_meta.TransferSyntaxUID = JPEGLSLossless
    dataset.PixelData = encapsulate([b"\xff\xd8" + b"\x00" * 64])  # a frame no one will get to decode
    dataset["PixelData"].VR = "OB"
    path = tmp_path / "jpegls.dcm"
    dataset.save_as(path)
    expect_data_error(
        lambda: load_dicom_series(path),
        path,
        "JPEG-LS Lossless Image Compression (1.2.840.10008.1.2.4.80)",
        "pylibjpeg",
    )


def test_non_dicom_and_non_image_files_are_skipped(pkg_dir: Path, tmp_path: Path) -> None:
    folder = _link([pkg_dir / "pydicom" / "CT_small.dcm", pkg_dir / "pydicom_data" / "liver.dcm"], tmp_path / "f")
    (folder / "README.txt").write_text("exported by a PACS\n")
    volume = load_dicom_series(folder)
    assert volume.shape == (128, 128, 1) and volume.metadata["modality"] == "CT"
    dataset = pydicom.dcmread(pkg_dir / "pydicom" / "CT_small.dcm")
    expected = dataset.pixel_array.astype(np.float32) * float(dataset.RescaleSlope) + float(dataset.RescaleIntercept)
    # Rows run anterior -> posterior and columns right -> left in DICOM: RAS+ flips both, x first.
    np.testing.assert_array_equal(volume.array[:, :, 0], expected.T[::-1, ::-1])

    only_seg = _link([pkg_dir / "pydicom_data" / "liver.dcm"], tmp_path / "seg")
    expect_data_error(lambda: load_dicom_series(only_seg), only_seg, "no DICOM image", "Segmentation Storage")
    empty = tmp_path / "text"
    empty.mkdir()
    (empty / "notes.txt").write_text("nothing")
    expect_data_error(lambda: load_dicom_series(empty), empty, "no DICOM image found among 1 file")


def test_non_volume_images_rejected(pkg_dir: Path) -> None:
    enhanced = pkg_dir / "pydicom_data" / "emri_small.dcm"
    expect_data_error(lambda: load_dicom_series(enhanced), enhanced, "multi-frame", "10 frames")
    ultrasound = pkg_dir / "pydicom_data" / "US1_UNCR.dcm"
    expect_data_error(lambda: load_dicom_series(ultrasound), ultrasound, "no ImagePositionPatient")


# ------------------------------------------------------------------------------------------ NIfTI


def test_4d_nifti_needs_volume_index(pkg_dir: Path) -> None:
    path = pkg_dir / "nibabel" / "example4d.nii.gz"
    expect_data_error(lambda: load_nifti_volume(path), path, "4D NIfTI with 2 volumes", "volume_index=0..1")
    expect_data_error(lambda: load_nifti_volume(path, volume_index=2), path, "out of range")
    volume = load_nifti_volume(path, volume_index=1)
    expected = np.asarray(nib.as_closest_canonical(nib.load(path)).get_fdata())[..., 1]
    assert volume.shape == expected.shape
    np.testing.assert_allclose(volume.array, expected, rtol=1e-6)


def _write_with_header_affine(path: Path, srow: np.ndarray, pixdim: tuple[float, float, float] = (1, 1, 1)) -> Path:
    header = nib.Nifti1Header()
    header.set_data_shape((4, 4, 4))
    header.set_data_dtype(np.int16)
    header["pixdim"][1:4] = pixdim
    header["sform_code"], header["qform_code"] = 1, 0
    header["srow_x"], header["srow_y"], header["srow_z"] = srow[0], srow[1], srow[2]
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), None, header=header), path)
    return path


@pytest.mark.parametrize(
    ("name", "srow", "fragment"),
    [
        ("nan", np.array([[np.nan, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]]), "not a finite"),
        ("zero", np.array([[1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0]]), "zero voxel size"),
        ("singular", np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0]]), "singular"),
    ],
)
def test_broken_affine_names_file(tmp_path: Path, name: str, srow: np.ndarray, fragment: str) -> None:
    path = _write_with_header_affine(tmp_path / f"{name}.nii.gz", srow.astype(float))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        expect_data_error(lambda: load_nifti_volume(path), path, "broken affine", fragment)


def test_model_layout_is_z_y_x(ct_series: Volume) -> None:
    """``to_dhw``: the one conversion to the models' (D, H, W) = (z, y, x), spacing in the same order."""
    array, spacing = ct_series.to_dhw()
    assert array.shape == ct_series.shape[::-1] == (20, 512, 512) and array.flags.c_contiguous
    assert spacing == ct_series.spacing[::-1] == (2.0, 0.9765625, 0.9765625)
    assert array[3, 100, 200] == ct_series.array[200, 100, 3]


def test_dicom_prefix_crops_series_like_nifti(shared_data: Path, tmp_path: Path) -> None:
    """``dicom:FOLDER`` gives the NIfTI reader's windowed crops, one scan per series folder, named by folder."""
    import shutil

    from medfoundry.data.registry import load_dataset

    series = shared_data / "totalsegmentator_ct_examples" / "example_ct_dicom"
    if not series.is_dir():
        pytest.skip(f"{series} is absent")
    crops = load_dataset(f"dicom:{series}", crop_size=32)["train"]
    assert crops.images.shape[1:] == (1, 32, 32, 32) and crops.images.dtype == np.float32
    assert crops.images.min() >= 0.0 and crops.images.max() <= 1.0
    assert crops.spacing_mm == {"example_ct_dicom": (2.0, 0.9765625, 0.9765625)}
    # The same voxels as the series read directly, windowed -1000..1000 HU, in (z, y, x) order.
    hu = load_dicom_series(series).array.transpose(2, 1, 0)
    z, y, x = (int(v) for v in crops.ids[0].split("@z")[1].replace("y", " ").replace("x", " ").split())
    expected = np.clip((hu[z : z + 32, y : y + 32, x : x + 32] + 1000) / 2000, 0, 1)
    depth = expected.shape[0]  # 20 slices: the crop is padded with air (0) past the last one
    np.testing.assert_allclose(crops.images[0, 0, :depth], expected, atol=1e-6)
    assert depth == 20 and not crops.images[0, 0, depth:].any()
    # A PACS-style export: one subfolder per scan; each becomes its own patient group.
    export = tmp_path / "export"
    for scan in ("scan_a", "scan_b"):
        shutil.copytree(series, export / scan)
    both = load_dataset(f"dicom:{export}", crop_size=32)["train"]
    assert set(both.patient_ids) == {"scan_a", "scan_b"} and len(both) == 2 * len(crops)
    missing = tmp_path / "missing"
    expect_data_error(lambda: load_dataset(f"dicom:{missing}"), missing, "DICOM folder not found")
