"""DICOM whole-slide images (VL Whole Slide Microscopy) read through wsidicom, behind OpenSlide's interface.

The tiler, the embedder and ``data/wsi.py`` only use a small part of OpenSlide: ``dimensions``, ``level_count``,
``level_dimensions``, ``level_downsamples``, ``properties`` (``openslide.mpp-x``/``-y``), ``read_region`` (level-0
coordinates, RGBA out), ``get_thumbnail`` and ``close``. :class:`DicomSlide` gives exactly that over
``wsidicom.WsiDicom``, so a DICOM slide goes through the same code as an SVS.

A DICOM slide is one ``.dcm`` instance, or a folder holding the instances of one slide (the usual layout: one
instance per pyramid level, plus label/overview/thumbnail images, which are not levels). The level-0 MPP is the
base level's PixelSpacing (mm, converted to micrometres). Files wsidicom cannot use are diagnosed with pydicom
so the error says what is missing (ImageType VOLUME, pixel spacing, frame positions) instead of wsidicom's
"Level files not found".
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from medfoundry.errors import DataError

DICOM_SUFFIX = ".dcm"
_WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"  # VL Whole Slide Microscopy Image Storage
# Header tags needed to group instances by slide and to say why a file is not a readable level.
_HEADER_TAGS = [
    "SOPClassUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "ImageType",
    "DimensionOrganizationType",
    "SharedFunctionalGroupsSequence",
    "PerFrameFunctionalGroupsSequence",
    "NumberOfFrames",
]


class DicomSlide:
    """An OpenSlide-like handle on a DICOM WSI (file or slide folder); level ``i`` is wsidicom's i-th level."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._wsi = _open_wsidicom(self.path)
        levels = list(self._wsi.levels.levels)
        base = levels[0]
        # wsidicom numbers levels by log2 of their pixel spacing over the base's, so 2**level is the exact
        # scale it uses itself when reading; OpenSlide's index is the position in the pyramid.
        self._levels = levels
        self.level_count = len(levels)
        self.level_dimensions = tuple((int(lv.size.width), int(lv.size.height)) for lv in levels)
        self.level_downsamples = tuple(float(2**lv.level) for lv in levels)
        self.dimensions = self.level_dimensions[0]
        spacing = base.pixel_spacing  # SizeMm: width is the column spacing (x), height the row spacing (y)
        self.properties: dict[str, str] = {
            "openslide.vendor": "dicom",
            "openslide.level-count": str(self.level_count),
            "openslide.mpp-x": repr(float(spacing.width) * 1000.0),
            "openslide.mpp-y": repr(float(spacing.height) * 1000.0),
        }

    def __reduce__(self) -> tuple[type[DicomSlide], tuple[Path]]:
        # wsidicom holds open file streams; a pickled handle (DataLoader workers) reopens the slide instead.
        return (DicomSlide, (self.path,))

    def __enter__(self) -> DicomSlide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def get_best_level_for_downsample(self, downsample: float) -> int:
        """The coarsest level whose downsample is at most ``downsample`` (OpenSlide's rule)."""
        fitting = [i for i, d in enumerate(self.level_downsamples) if d <= downsample]
        return max(fitting) if fitting else 0

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> Image.Image:
        """RGBA region of ``size`` pixels at ``level``, top-left at level-0 ``location``; outside is transparent."""
        if not 0 <= level < self.level_count:
            raise DataError(f"level {level} does not exist (the slide has {self.level_count})", self.path)
        width, height = int(size[0]), int(size[1])
        downsample = self.level_downsamples[level]
        # Level-0 coordinates to this level's pixels, rounded down as OpenSlide's tile grid does.
        x, y = int(location[0] // downsample), int(location[1] // downsample)
        level_width, level_height = self.level_dimensions[level]
        out = np.zeros((height, width, 4), dtype=np.uint8)  # transparent black, as OpenSlide outside the image
        left, top = max(x, 0), max(y, 0)
        right, bottom = min(x + width, level_width), min(y + height, level_height)
        if right > left and bottom > top:
            # wsidicom refuses regions that leave the image, so only the part inside is read.
            pixels = self._wsi.read_region(
                (left, top), self._levels[level].level, (right - left, bottom - top), as_array=True
            )
            out[top - y : bottom - y, left - x : right - x, :3] = _as_rgb(pixels)
            out[top - y : bottom - y, left - x : right - x, 3] = 255
        return Image.fromarray(out, "RGBA")

    def get_thumbnail(self, size: tuple[int, int]) -> Image.Image:
        """RGB thumbnail within ``size``, keeping the aspect ratio, from the finest level no finer than needed.

        Same recipe as OpenSlide's: the whole best level is read, then shrunk with Lanczos; that keeps the tissue
        mask (and so the tile grid) of a DICOM copy of a slide identical to the original's.
        """
        downsample = max(dim / max(int(limit), 1) for dim, limit in zip(self.dimensions, size, strict=True))
        level = self.get_best_level_for_downsample(downsample)
        region = self.read_region((0, 0), level, self.level_dimensions[level])
        picture = Image.new("RGB", region.size, (255, 255, 255))
        picture.paste(region, None, region)
        picture.thumbnail(tuple(int(v) for v in size), Image.Resampling.LANCZOS)
        return picture

    def close(self) -> None:
        self._wsi.close()

    def __repr__(self) -> str:
        return f"DicomSlide({str(self.path)!r})"


def _as_rgb(pixels: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 from wsidicom's array: monochrome is repeated, an alpha channel dropped."""
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[..., None], 3, axis=2)
    if pixels.shape[2] == 1:
        pixels = np.repeat(pixels, 3, axis=2)
    if pixels.dtype != np.uint8:
        raise DataError(f"only 8-bit DICOM WSI is supported (got {pixels.dtype} pixels)")
    return pixels[..., :3]


def is_dicom_slide(path: str | Path) -> bool:
    """Whether ``open_slide`` should read ``path`` as DICOM: a ``.dcm`` file or a folder (slide folder)."""
    path = Path(path)
    return path.is_dir() or path.suffix.lower() == DICOM_SUFFIX


def dicom_files(folder: Path) -> list[Path]:
    """The ``.dcm`` files directly inside ``folder``, sorted."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == DICOM_SUFFIX)


def is_dicom_slide_folder(folder: str | Path) -> bool:
    """A folder holding several ``.dcm`` instances of one series (one slide) and no other slide files.

    A folder with a single ``.dcm`` or instances of several series is a folder *of* slides instead.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return False
    files = dicom_files(folder)
    if len(files) < 2:
        return False
    series = {_series_key(_header(f)) for f in files}
    return len(series) == 1 and None not in series


def _series_key(header: Any) -> tuple[str, str] | None:
    if header is None:
        return None
    study, series = getattr(header, "StudyInstanceUID", None), getattr(header, "SeriesInstanceUID", None)
    return (str(study), str(series)) if study and series else None


def _header(path: Path) -> Any:
    """The header tags needed here (no pixel data), or None for a file that is not DICOM."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # over-long UIDs and names are common and irrelevant here
            return pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
    except (InvalidDicomError, OSError, ValueError, EOFError):
        return None


@contextlib.contextmanager
def _quiet_wsidicom() -> Iterator[None]:
    """wsidicom logs a traceback for every file it cannot use; the DataError raised here says it in one line."""
    logger = logging.getLogger("wsidicom")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _open_wsidicom(path: Path) -> Any:
    try:
        from wsidicom import WsiDicom
        from wsidicom.errors import WsiDicomNoResolutionError, WsiDicomNotFoundError
    except ImportError:
        raise DataError(
            "reading a DICOM WSI needs wsidicom, which is not installed (pip install 'medfoundry[wsi]')", path
        ) from None
    if not path.exists():
        raise DataError("slide not found", path)
    files = dicom_files(path) if path.is_dir() else [path]
    if not files:
        raise DataError("folder holds no .dcm files (a DICOM slide folder holds the slide's instances)", path)
    try:
        with _quiet_wsidicom():
            return WsiDicom.open(files)
    except (WsiDicomNotFoundError, WsiDicomNoResolutionError):
        raise DataError(f"not a readable DICOM WSI (wsidicom): {diagnose(files)}", path) from None
    except Exception as error:  # noqa: BLE001 - wsidicom and pydicom raise many types for malformed files
        raise DataError(f"not a readable DICOM WSI (wsidicom: {type(error).__name__}: {error})", path) from None


def diagnose(files: list[Path]) -> str:
    """What stops ``files`` from forming a DICOM WSI pyramid, in one line (from their headers)."""
    problems = {}
    for file in files:
        found = _problems(_header(file))
        if found:
            problems[file.name] = found
    if not problems:
        return "wsidicom found no usable pyramid level"
    first, reasons = next(iter(problems.items()))
    text = "; ".join(reasons)
    if len(files) == 1:
        return text
    more = f" (and {len(problems) - 1} more of {len(files)} files)" if len(problems) > 1 else ""
    return f"{first}: {text}{more}"


def _problems(header: Any) -> list[str]:
    """The reasons one instance is not a readable pyramid level (empty when the header looks fine)."""
    if header is None:
        return ["not a DICOM file (no DICM preamble or unreadable header)"]
    sop = str(getattr(header, "SOPClassUID", ""))
    if sop != _WSI_SOP_CLASS:
        return [f"not a VL Whole Slide Microscopy image (SOP class {sop or 'missing'})"]
    found = []
    image_type = [str(v).upper() for v in (getattr(header, "ImageType", None) or [])]
    if "VOLUME" not in image_type:
        stated = "\\".join(image_type) if image_type else "absent"
        found.append(f"no VOLUME image level (ImageType {stated})")
    if _pixel_spacing(header) is None:
        # wsidicom orders pyramid levels by pixel spacing and will not open a slide without it, so unlike an
        # OpenSlide slide without MPP, --mpp-override cannot stand in for it.
        found.append(
            "no pixel spacing (SharedFunctionalGroupsSequence > PixelMeasuresSequence > PixelSpacing), "
            "which wsidicom needs to open the slide"
        )
    tiled_full = str(getattr(header, "DimensionOrganizationType", "")).upper() == "TILED_FULL"
    several_frames = int(getattr(header, "NumberOfFrames", 1) or 1) > 1
    if not tiled_full and several_frames and "PerFrameFunctionalGroupsSequence" not in header:
        found.append("no frame positions (not TILED_FULL and no PerFrameFunctionalGroupsSequence)")
    return found


def _pixel_spacing(header: Any) -> list[float] | None:
    shared = getattr(header, "SharedFunctionalGroupsSequence", None)
    if not shared:
        return None
    measures = getattr(shared[0], "PixelMeasuresSequence", None)
    spacing = getattr(measures[0], "PixelSpacing", None) if measures else None
    return [float(v) for v in spacing] if spacing else None
