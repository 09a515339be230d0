"""3D volumes from DICOM series and NIfTI files, with their physical geometry, in one orientation convention.

Convention (every :class:`Volume` this module returns):

* ``array`` is float32 (possibly a strided view: ``np.ascontiguousarray`` it if a library needs C order)
  with axes ``(x, y, z)`` in **RAS+**: index ``i`` grows towards the patient's Right,
  ``j`` towards Anterior, ``k`` towards Superior (nibabel's "closest canonical" orientation, the one MONAI's
  ``Orientation("RAS")`` gives). For an oblique scan the axes are the voxel axes permuted and flipped so each
  points most nearly along +R, +A, +S; the obliquity stays in ``direction``. Readers, geometry, resampling and
  label maps all work in this order (it is the affine's, and MONAI's).
* Models take another layout: channels first, then (D, H, W) as PyTorch's 3D layers name them, with
  D = z (towards Superior: one axial slice per index), H = y (towards Anterior), W = x (towards Right), in C
  order. :meth:`Volume.to_dhw` is the one place that converts (array and spacing together), so every volume a
  model sees (NIfTI or DICOM crops, in pre-training and in evaluation) has its axes in the same order.
* ``spacing`` (mm) is along the array axes; ``origin`` (mm) is the world position of the centre of voxel
  (0, 0, 0); ``direction`` is 3x3 with column ``a`` the unit vector of array axis ``a``. World coordinates
  are RAS+ mm (NIfTI's scanner space): DICOM's LPS patient coordinates are converted by negating x and y.
  ``affine`` (4x4) = ``[direction * spacing | origin]`` maps voxel indices to world mm, as in NIfTI.
* CT values are Hounsfield units (stored value * RescaleSlope + RescaleIntercept); NIfTI values are the
  scaled data (``scl_slope``/``scl_inter`` applied by nibabel).

DICOM series (:func:`load_dicom_series`), decisions:

* files are grouped by SeriesInstanceUID. An image is a file whose SOP class name says "Image Storage" (CT,
  MR, PET, secondary capture, ...) or, for an unknown/private SOP class, one holding PixelData. Non-image
  DICOM (DICOM-SEG, SR, RT structures/dose, presentation states, DICOMDIR) is skipped with a debug log, as
  are non-DICOM files (no ``DICM`` preamble). A folder with no image DICOM raises DataError.
* several series and no ``series_uid`` -> DataError listing each (UID, modality, description, file count).
* an image file of the chosen series without PixelData -> DataError naming the file. Multi-frame (Enhanced)
  images and images without ImagePositionPatient/ImageOrientationPatient (ultrasound, radiographs) are not
  volume slices and raise DataError.
* slices are sorted by their position along the slice normal (row x column direction cosines, dotted with
  ImagePositionPatient), never by InstanceNumber or file name. The slice spacing is the median step between
  sorted positions; a step over 1.5x the median (a missing slice) or steps differing from the median by more
  than 1 % (uneven spacing) give a :class:`SliceSpacingWarning` naming the folder, the gap in mm and where;
  the volume is still returned, slices stacked as they are (no interpolation). Gantry tilt is not corrected
  (a warning says so). Two slices at one position (several echoes/phases in one series) -> DataError.
* a compressed transfer syntax without an installed decoder -> DataError naming the file, the syntax and
  what to install (pydicom's plugins: pylibjpeg + pylibjpeg-openjpeg/-libjpeg, pyjpegls or python-gdcm).

NIfTI (:func:`load_nifti_volume`): the header's affine (sform, else qform, as nibabel chooses) gives the
geometry; a non-finite or singular affine, or a zero voxel size, raises DataError naming the file. A 4D file
raises DataError unless ``volume_index=`` picks one 3D volume (a trailing axis of length 1 is dropped).
"""

from __future__ import annotations

import logging
import struct
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
from nibabel import orientations
from nibabel.filebasedimages import ImageFileError
from pydicom.errors import InvalidDicomError
from pydicom.pixels import get_decoder
from pydicom.uid import UID

from medfoundry.errors import DataError

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
# DICOM negates x and y relative to NIfTI's RAS+ world.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_GAP_FACTOR = 1.5
_UNEVEN_TOLERANCE = 0.01
_SAME_TOLERANCE = 1e-4


class SliceSpacingWarning(UserWarning):
    """A DICOM series has a missing slice, uneven slice spacing or a tilted (sheared) slice stack."""


@dataclass
class Volume:
    """A 3D image in RAS+ with its geometry (see the module docstring for the convention)."""

    array: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: np.ndarray
    source: Path | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.array.shape)  # type: ignore[return-value]

    def to_dhw(self) -> tuple[np.ndarray, tuple[float, float, float]]:
        """The array in the models' (D, H, W) = (z, y, x) layout (C order) and its spacing in that order (mm).

        The one conversion from this module's (x, y, z) RAS+ arrays (module docstring); a copy, as models and
        crops want contiguous slices.
        """
        x, y, z = self.spacing
        return np.ascontiguousarray(self.array.transpose(2, 1, 0)), (z, y, x)

    @property
    def affine(self) -> np.ndarray:
        """4x4 voxel index -> world RAS+ mm."""
        affine = np.eye(4)
        affine[:3, :3] = self.direction * np.asarray(self.spacing)
        affine[:3, 3] = self.origin
        return affine

    def voxel_to_world(self, indices: np.ndarray) -> np.ndarray:
        """World RAS+ mm of voxel indices ``(..., 3)`` (fractional indices allowed)."""
        affine = self.affine
        return np.asarray(indices, dtype=float) @ affine[:3, :3].T + affine[:3, 3]

    def world_to_voxel(self, points: np.ndarray) -> np.ndarray:
        """Fractional voxel indices of world RAS+ points ``(..., 3)`` in mm."""
        inverse = np.linalg.inv(self.affine)
        return np.asarray(points, dtype=float) @ inverse[:3, :3].T + inverse[:3, 3]

    @classmethod
    def from_affine(
        cls,
        array: np.ndarray,
        affine: np.ndarray,
        source: Path | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Volume:
        """A Volume from an array and a 4x4 affine already in this module's convention (checked)."""
        check_affine(affine, source)
        matrix = np.asarray(affine, dtype=float)[:3, :3]
        spacing = np.linalg.norm(matrix, axis=0)
        return cls(
            # No forced copy: reorientation gives views (flipped/transposed strides), as nibabel's Fortran-order
            # arrays are; copying 512x512xN floats into C order would cost as much as 7 % of a DICOM load.
            array=np.asarray(array, dtype=np.float32),
            spacing=tuple(float(s) for s in spacing),  # type: ignore[arg-type]
            origin=tuple(float(o) for o in np.asarray(affine, dtype=float)[:3, 3]),  # type: ignore[arg-type]
            direction=matrix / spacing,
            source=source,
            metadata=dict(metadata or {}),
        )


def check_affine(affine: np.ndarray, path: str | Path | None = None) -> None:
    """DataError unless ``affine`` is a finite 4x4 with non-zero voxel sizes and independent axes."""
    affine = np.asarray(affine, dtype=float)
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise DataError(f"broken affine (not a finite 4x4 matrix): {affine.tolist()}", path)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    if (spacing < 1e-6).any():
        raise DataError(f"broken affine: zero voxel size {np.round(spacing, 6).tolist()} mm", path)
    # Unit columns make the determinant a pure measure of how independent the axes are.
    if abs(np.linalg.det(affine[:3, :3] / spacing)) < 1e-3:
        raise DataError("broken affine: singular direction matrix (axes are not independent)", path)


def to_ras(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Permute/flip the first three axes so they point most nearly along +R, +A, +S; the matching affine."""
    current = orientations.io_orientation(affine)
    transform = orientations.ornt_transform(current, orientations.axcodes2ornt(("R", "A", "S")))
    reoriented = orientations.apply_orientation(array, transform)
    return reoriented, affine @ orientations.inv_ornt_aff(transform, array.shape[:3])


def load_volume(path: str | Path, **kwargs: Any) -> Volume:
    """A NIfTI file (``.nii``/``.nii.gz``), a folder of DICOM files, or one DICOM file (its whole series).

    ``kwargs`` go to the reader: ``series_uid=`` for DICOM, ``volume_index=`` for NIfTI. One DICOM file
    loads every slice of its series found in the same folder.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        return load_dicom_series(path, **kwargs)
    if not path.is_file():
        raise DataError("volume not found (no such file or folder)", path)
    if path.name.lower().endswith(NIFTI_SUFFIXES):
        return load_nifti_volume(path, **kwargs)
    if not _has_dicom_preamble(path):
        raise DataError("not a volume: neither NIfTI (.nii, .nii.gz) nor DICOM (no DICM preamble)", path)
    header = _read_header(path, pixels=False)
    if not _is_image(header):
        raise DataError(f"not an image DICOM ({_sop_name(header)}): no volume to load", path)
    series = kwargs.pop("series_uid", None)
    if series is None:
        series = str(header.get("SeriesInstanceUID", "") or "")
    return load_dicom_series(path.parent, series_uid=series, **kwargs)


# ---------------------------------------------------------------------------------------------- NIfTI


def load_nifti_volume(path: str | Path, *, volume_index: int | None = None) -> Volume:
    """One 3D NIfTI volume as float32 RAS+ (x, y, z) with its geometry; ``volume_index`` picks one of a 4D file."""
    path = Path(path).expanduser()
    image = _open_nifti(path)
    affine = np.asarray(image.affine, dtype=float)
    check_affine(affine, path)
    shape = _nifti_shape(image.shape, path)
    data = _nifti_data(image, shape, volume_index, path)
    if not np.isfinite(data).all():
        raise DataError(f"volume contains {int((~np.isfinite(data)).sum())} NaN or inf voxel(s)", path)
    array, affine = to_ras(data, affine)
    return Volume.from_affine(array, affine, path, {"format": "nifti"})


def _open_nifti(path: Path) -> nib.Nifti1Image:
    if not path.is_file():
        raise DataError("NIfTI file not found", path)
    try:
        return nib.load(path)
    except (ImageFileError, OSError, EOFError, ValueError, zlib.error) as error:
        raise DataError(f"not a readable NIfTI volume ({type(error).__name__}: {error})", path) from None


def _nifti_shape(shape: tuple[int, ...], path: Path) -> tuple[int, ...]:
    # Trailing axes of length 1 (a "4D" file holding one volume) are common and harmless.
    shape = tuple(shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) < 3 or len(shape) > 4:
        raise DataError(f"expected a 3D volume, got shape {shape}", path)
    return shape


def _nifti_data(image: Any, shape: tuple[int, ...], volume_index: int | None, path: Path) -> np.ndarray:
    proxy = image.dataobj
    try:
        if len(shape) == 3:
            if volume_index not in (None, 0):
                raise DataError(f"volume_index={volume_index} given but the file holds one 3D volume", path)
            data = np.asarray(proxy, dtype=np.float32).reshape(shape)
        else:
            count = shape[3]
            if volume_index is None:
                raise DataError(f"4D NIfTI with {count} volumes: pass volume_index=0..{count - 1}", path)
            if not 0 <= volume_index < count:
                raise DataError(f"volume_index={volume_index} out of range 0..{count - 1}", path)
            data = np.asarray(proxy[..., volume_index], dtype=np.float32).reshape(shape[:3])
    except (OSError, EOFError, ValueError, zlib.error) as error:
        raise DataError(f"not a readable NIfTI volume: its voxels ({type(error).__name__}: {error})", path) from None
    return data


# ---------------------------------------------------------------------------------------------- DICOM


@dataclass
class _Slice:
    path: Path
    dataset: pydicom.Dataset


def load_dicom_series(folder_or_files: str | Path | Sequence[str | Path], series_uid: str | None = None) -> Volume:
    """One DICOM series as float32 RAS+ (x, y, z) with its geometry (HU for CT).

    ``folder_or_files``: a folder (searched recursively) or a list of files. ``series_uid`` chooses one of
    several series; without it a folder holding several raises DataError listing them.
    """
    files, where = _candidate_files(folder_or_files)
    series = _group_by_series(files, where, series_uid)
    uid = _choose_series(series, series_uid, where)
    slices = series[uid]
    for item in slices:
        _check_image_slice(item)
    _check_same_grid(slices)
    slices, positions = _sort_along_normal(slices)
    step = _slice_step(slices, positions, where)
    stacked = _stack_pixels(slices)  # (slice, row, column)
    raw = stacked.transpose(2, 1, 0)  # (column, row, slice): the affine's voxel order
    affine = _LPS_TO_RAS @ _lps_affine(slices[0].dataset, step)
    array, affine = to_ras(raw, affine)
    first = slices[0].dataset
    metadata = {
        "format": "dicom",
        "series_uid": uid,
        "modality": str(first.get("Modality", "")),
        "series_description": str(first.get("SeriesDescription", "")),
        "n_slices": len(slices),
    }
    return Volume.from_affine(array, affine, where, metadata)


def _candidate_files(folder_or_files: str | Path | Sequence[str | Path]) -> tuple[list[Path], Path]:
    if isinstance(folder_or_files, (str, Path)):
        root = Path(folder_or_files).expanduser()
        if root.is_dir():
            return sorted(p for p in root.rglob("*") if p.is_file()), root
        if root.is_file():
            return [root], root
        raise DataError("DICOM folder or file not found", root)
    files = [Path(f).expanduser() for f in folder_or_files]
    if not files:
        raise DataError("no DICOM files given")
    for file in files:
        if not file.is_file():
            raise DataError("DICOM file not found", file)
    return files, files[0].parent


def _has_dicom_preamble(path: Path) -> bool:
    with path.open("rb") as handle:
        handle.seek(128)
        return handle.read(4) == b"DICM"


def _read_header(path: Path, pixels: bool = True) -> pydicom.Dataset:
    try:
        return pydicom.dcmread(path, stop_before_pixels=not pixels)
    except InvalidDicomError:
        raise
    except (OSError, EOFError, ValueError, KeyError, struct.error) as error:
        raise DataError(f"corrupt DICOM file ({type(error).__name__}: {error})", path) from None


def _group_by_series(files: list[Path], where: Path, wanted: str | None = None) -> dict[str, list[_Slice]]:
    """Image files by SeriesInstanceUID. Pixel data is kept for the wanted series only (the first one seen
    when none is named: with a second one the call ends in an error listing them), so a folder of many series
    costs one series' memory, and one read per file (deferred reads cost 30 % on uncompressed series)."""
    series: dict[str, list[_Slice]] = {}
    skipped: list[str] = []
    for file in files:
        try:
            dataset = _read_header(file, pixels=wanted is not None or len(series) <= 1)
        except InvalidDicomError:
            log.debug("%s: not DICOM (no DICM preamble), ignored", file)
            continue
        if not _is_image(dataset):
            skipped.append(f"{file.name} ({_sop_name(dataset)})")
            log.debug("%s: non-image DICOM (%s), ignored", file, _sop_name(dataset))
            continue
        # An anonymised export may blank the UID: such files form one series, keyed "".
        uid = str(dataset.get("SeriesInstanceUID", "") or "")
        keep = wanted if wanted is not None else next(iter(series), uid)
        if uid != keep and "PixelData" in dataset:
            del dataset.PixelData
        series.setdefault(uid, []).append(_Slice(file, dataset))
    if not series:
        detail = f"; skipped non-image DICOM: {', '.join(skipped[:5])}" if skipped else ""
        raise DataError(f"no DICOM image found among {len(files)} file(s){detail}", where)
    return series


def _sop_class(dataset: pydicom.Dataset) -> UID | None:
    # Anonymisers may blank SOPClassUID (the TotalSegmentator series has); the file meta keeps a copy.
    meta = getattr(dataset, "file_meta", None)
    value = dataset.get("SOPClassUID") or (meta.get("MediaStorageSOPClassUID") if meta is not None else None)
    return UID(str(value)) if value else None


def _sop_name(dataset: pydicom.Dataset) -> str:
    sop = _sop_class(dataset)
    return sop.name if sop is not None else "no SOP class"


def _is_image(dataset: pydicom.Dataset) -> bool:
    sop = _sop_class(dataset)
    if sop is None or sop.name == str(sop):  # unknown or private SOP class: judge by content
        return "PixelData" in dataset or "Rows" in dataset
    return "Image Storage" in sop.name


def _choose_series(series: dict[str, list[_Slice]], series_uid: str | None, where: Path) -> str:
    if series_uid is not None:
        if series_uid not in series:
            raise DataError(f"no series with UID {series_uid}; found: {_describe(series)}", where)
        return series_uid
    if len(series) > 1:
        raise DataError(f"{len(series)} series found, choose one with series_uid=: {_describe(series)}", where)
    return next(iter(series))


def _describe(series: dict[str, list[_Slice]]) -> str:
    parts = []
    for uid, slices in series.items():
        first = slices[0].dataset
        modality = first.get("Modality", "?")
        description = first.get("SeriesDescription", "")
        parts.append(f"{uid or '(empty SeriesInstanceUID)'} ({modality}, {description!r}, {len(slices)} files)")
    return "; ".join(parts)


def _check_image_slice(item: _Slice) -> None:
    dataset = item.dataset
    if "PixelData" not in dataset:
        raise DataError(f"DICOM image has no pixel data ({_sop_name(dataset)})", item.path)
    if int(dataset.get("NumberOfFrames", 1) or 1) > 1:
        raise DataError(
            f"multi-frame DICOM ({_sop_name(dataset)}, {dataset.NumberOfFrames} frames) is not supported; "
            "convert it to a single-frame series or NIfTI (e.g. dcm2niix)",
            item.path,
        )
    missing = [k for k in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing") if k not in dataset]
    if missing:
        raise DataError(f"not a volume slice: no {', '.join(missing)} ({_sop_name(dataset)})", item.path)
    if int(dataset.get("SamplesPerPixel", 1)) != 1:
        raise DataError(f"colour DICOM ({dataset.SamplesPerPixel} samples per pixel) is not a scan slice", item.path)


def _check_same_grid(slices: list[_Slice]) -> None:
    reference = slices[0].dataset
    for item in slices[1:]:
        dataset = item.dataset
        if (dataset.Rows, dataset.Columns) != (reference.Rows, reference.Columns):
            raise DataError(
                f"slice size {dataset.Rows}x{dataset.Columns} differs from {reference.Rows}x{reference.Columns} "
                f"of {slices[0].path.name} in the same series",
                item.path,
            )
        for key in ("ImageOrientationPatient", "PixelSpacing"):
            if not np.allclose(_floats(dataset, key), _floats(reference, key), atol=_SAME_TOLERANCE):
                raise DataError(
                    f"{key} {_floats(dataset, key).tolist()} differs from {slices[0].path.name} in the same series",
                    item.path,
                )


def _floats(dataset: pydicom.Dataset, key: str) -> np.ndarray:
    return np.array([float(v) for v in dataset[key].value], dtype=float)


def _normal(dataset: pydicom.Dataset) -> np.ndarray:
    orientation = _floats(dataset, "ImageOrientationPatient")
    normal = np.cross(orientation[:3], orientation[3:])
    return normal / np.linalg.norm(normal)


def _sort_along_normal(slices: list[_Slice]) -> tuple[list[_Slice], np.ndarray]:
    normal = _normal(slices[0].dataset)
    positions = np.array([_floats(s.dataset, "ImagePositionPatient") @ normal for s in slices])
    order = np.argsort(positions, kind="stable")
    slices = [slices[i] for i in order]
    positions = positions[order]
    steps = np.diff(positions)
    if len(steps) and steps.min() < 1e-3:
        at = int(np.argmin(steps))
        raise DataError(
            f"two slices at one position ({positions[at]:.3f} mm along the normal): {slices[at].path.name} and "
            f"{slices[at + 1].path.name}; several echoes/phases in one series are not supported",
            slices[at + 1].path.parent,
        )
    return slices, positions


def _slice_step(slices: list[_Slice], positions: np.ndarray, where: Path) -> float:
    """The median distance between sorted slices; warns on gaps, uneven steps and tilt."""
    if len(slices) == 1:
        dataset = slices[0].dataset
        thickness = dataset.get("SpacingBetweenSlices") or dataset.get("SliceThickness") or 1.0
        log.debug("%s: single slice, slice spacing taken as %s mm", slices[0].path, thickness)
        return float(thickness)
    steps = np.diff(positions)
    median = float(np.median(steps))
    _warn_spacing(slices, positions, steps, median, where)
    _warn_tilt(slices, median, where)
    return median


def _warn_spacing(slices: list[_Slice], positions: np.ndarray, steps: np.ndarray, median: float, where: Path) -> None:
    gaps = np.flatnonzero(steps > _GAP_FACTOR * median)
    for at in gaps:
        warnings.warn(
            f"{where}: missing slice(s): gap of {steps[at]:.2f} mm (median step {median:.2f} mm) between "
            f"{_slice_name(slices, at, where)} at {positions[at]:.2f} mm and {_slice_name(slices, at + 1, where)} "
            f"at {positions[at + 1]:.2f} mm along the slice normal; slices are stacked without filling the gap",
            SliceSpacingWarning,
            stacklevel=4,
        )
    uneven = np.abs(steps - median) > _UNEVEN_TOLERANCE * median
    uneven[gaps] = False
    if uneven.any():
        at = int(np.flatnonzero(uneven)[0])
        warnings.warn(
            f"{where}: uneven slice spacing: {int(uneven.sum())} step(s) differ from the median {median:.3f} mm, "
            f"steps range {steps.min():.3f}..{steps.max():.3f} mm, first at {_slice_name(slices, at, where)} -> "
            f"{_slice_name(slices, at + 1, where)} ({steps[at]:.3f} mm); the median is used as the slice spacing",
            SliceSpacingWarning,
            stacklevel=4,
        )


def _slice_name(slices: list[_Slice], index: int, where: Path) -> str:
    """``file CT.1.2.3 (slice 10 of 20)``: the file as found under the series folder, and where it sorts.

    Exports often name files by their SOP Instance UID, so the sorted position is what tells a user where the
    slice is; the path relative to the folder tells two same-named files in different subfolders apart.
    """
    path = slices[index].path
    name = path.relative_to(where).as_posix() if path.is_relative_to(where) and path != where else path.name
    return f"file {name} (slice {index + 1} of {len(slices)})"


def _warn_tilt(slices: list[_Slice], median: float, where: Path) -> None:
    first = _floats(slices[0].dataset, "ImagePositionPatient")
    last = _floats(slices[-1].dataset, "ImagePositionPatient")
    offset = last - first
    normal = _normal(slices[0].dataset)
    in_plane = float(np.linalg.norm(offset - (offset @ normal) * normal))
    if in_plane > max(1.0, 0.05 * median * (len(slices) - 1)):
        warnings.warn(
            f"{where}: slice positions drift {in_plane:.1f} mm in-plane over the series (gantry tilt?); "
            "not corrected: the grid is treated as orthogonal",
            SliceSpacingWarning,
            stacklevel=4,
        )


def _stack_pixels(slices: list[_Slice]) -> np.ndarray:
    first = slices[0].dataset
    stacked = np.empty((len(slices), int(first.Rows), int(first.Columns)), dtype=np.float32)
    for index, item in enumerate(slices):
        _rescale_into(item, stacked[index])
    return stacked


def _rescale_into(item: _Slice, out: np.ndarray) -> None:
    """Stored values * RescaleSlope + RescaleIntercept (HU for CT) into ``out``; per slice, as both may vary.

    Written in place: a float32 temporary per slice cost about 10 % of an uncompressed series' load time.
    """
    dataset = item.dataset
    _check_decoder(dataset, item.path)
    try:
        pixels = dataset.pixel_array
    except Exception as error:  # noqa: BLE001 - decoders raise many types; the message names the file
        syntax = dataset.file_meta.get("TransferSyntaxUID")
        name = f"{syntax.name} ({syntax})" if syntax is not None else "unknown transfer syntax"
        raise DataError(f"cannot decode pixel data, {name}: {type(error).__name__}: {error}", item.path) from None
    if pixels.shape != out.shape:
        raise DataError(f"pixel data has shape {pixels.shape}, expected {out.shape} (Rows x Columns)", item.path)
    out[...] = pixels
    slope = float(dataset.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(dataset.get("RescaleIntercept", 0.0) or 0.0)
    if slope != 1.0:
        out *= np.float32(slope)
    if intercept != 0.0:
        out += np.float32(intercept)


def _check_decoder(dataset: pydicom.Dataset, path: Path) -> None:
    syntax = dataset.file_meta.get("TransferSyntaxUID")
    if syntax is None or not syntax.is_compressed:
        return
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise DataError(f"{syntax.name} ({syntax}): pydicom has no decoder for this transfer syntax", path) from None
    if not decoder.is_available:
        plugins = "; ".join(decoder.missing_dependencies) or "a pydicom pixel-data plugin"
        raise DataError(f"{syntax.name} ({syntax}) has no decoder installed: install one of: {plugins}", path)


def _lps_affine(first: pydicom.Dataset, step: float) -> np.ndarray:
    """Voxel (column, row, slice) -> LPS mm, from the first sorted slice and the slice step."""
    orientation = _floats(first, "ImageOrientationPatient")
    row_spacing, column_spacing = _floats(first, "PixelSpacing")  # between rows, between columns
    affine = np.eye(4)
    affine[:3, 0] = orientation[:3] * column_spacing  # along a row: the column index grows
    affine[:3, 1] = orientation[3:] * row_spacing
    affine[:3, 2] = _normal(first) * step
    affine[:3, 3] = _floats(first, "ImagePositionPatient")
    return affine
