"""Colour fundus photographs: crop the circular field of view (FOV) and serve the crops as an ``ImageSet``.

A fundus camera images the retina through a round aperture; the rest of the photo is black. :func:`fundus_crop`
finds that disc, crops to its bounding box, pads to a square with black and resizes, so every model input is
the retina at the same scale whatever the camera's frame. Full-size JPEGs (IDRiD's are 4288x2848) are decoded
by libjpeg at 1/2, 1/4 or 1/8 scale (``Image.draft``): decoding a 12 MP photo to make a 224 px input would cost
far more than everything else together.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from scipy import ndimage

from medfoundry.data.manifest import file_list_digest, too_large_error
from medfoundry.data.sample import ImageSet
from medfoundry.errors import DataError
from medfoundry.transforms.ophthalmology import FOV_THRESHOLD, fov_mask

#: Below this share of the photo the FOV is too small to grade (pupil not dilated, camera misaligned).
MIN_FOV_FRACTION = 0.3
# A fundus FOV is a disc, possibly clipped by the frame: IDRiD's FOVs fit a circle with IoU >= 0.98, a centred
# square scores 0.83.
_MIN_CIRCLE_IOU = 0.9
# A circle fit on fewer boundary pixels than this (at the decoded scale) is noise.
_MIN_EDGE_PIXELS = 20


@dataclass(frozen=True)
class FundusInfo:
    """Where the FOV was found, in the original image's pixel coordinates.

    ``bbox`` is ``(left, top, right, bottom)`` with right/bottom exclusive; ``image_size`` is ``(width, height)``
    of the original file; ``fov_fraction`` is the share of the image inside the FOV; ``quality_ok`` is False
    when that share is below ``min_fov_fraction``; ``decode_scale`` is the JPEG reduction used (1, 2, 4 or 8).
    """

    bbox: tuple[int, int, int, int]
    image_size: tuple[int, int]
    fov_fraction: float
    quality_ok: bool
    decode_scale: int


def fundus_crop(
    path_or_image: str | Path | Image.Image,
    size: int,
    *,
    threshold: int = FOV_THRESHOLD,
    min_fov_fraction: float = MIN_FOV_FRACTION,
    local_contrast: bool = False,
) -> tuple[np.ndarray, FundusInfo]:
    """Crop a fundus photo to its FOV: a ``(3, size, size)`` uint8 array, black outside the FOV, and its info.

    The FOV is the largest region brighter than ``threshold`` (on the brightest channel, 0-255) with holes
    filled, as in :func:`medfoundry.transforms.ophthalmology.fov_mask`. Its bounding box is padded to a centred
    square with black and resized to ``size``. ``local_contrast`` applies Ben Graham's preprocessing,
    ``4*img - 4*blur(img, sigma=size/30) + 128``, with the blur averaging inside the FOV only (so the black
    background does not leave a bright ring at the rim), then sets the outside back to black.

    Raises:
        DataError: the file cannot be read, or no disc-shaped FOV is found (all-black or all-white images,
            chest X-rays and other non-fundus images).
    """
    source = Path(path_or_image) if isinstance(path_or_image, str | Path) else _image_path(path_or_image)
    image, original_size = _decode(path_or_image, size, source)
    mask = fov_mask(image, threshold)
    _check_is_fundus(mask, source)
    left, top, right, bottom = _bbox(mask)
    box = _square_box(left, top, right, bottom)
    pixels = _crop_resize(image, box, size)
    fov = _crop_resize(Image.fromarray(mask.astype(np.uint8) * 255), box, size) >= 128
    if local_contrast:
        pixels = _local_contrast(pixels, fov, sigma=size / 30)
    pixels[~fov] = 0
    scale = original_size[0] / image.width
    fraction = float(mask.mean())
    info = FundusInfo(
        bbox=_to_original((left, top, right, bottom), original_size, image.size),
        image_size=original_size,
        fov_fraction=fraction,
        quality_ok=fraction >= min_fov_fraction,
        decode_scale=max(1, round(scale)),
    )
    return np.ascontiguousarray(pixels.transpose(2, 0, 1)), info


def _image_path(image: Image.Image) -> Path | None:
    filename = getattr(image, "filename", "")
    return Path(filename) if filename else None


def _decode(
    path_or_image: str | Path | Image.Image, size: int, source: Path | None
) -> tuple[Image.Image, tuple[int, int]]:
    """The image as RGB, decoded at the smallest JPEG scale that keeps both sides >= ``size``; and its full size."""
    if isinstance(path_or_image, Image.Image):
        return path_or_image.convert("RGB"), path_or_image.size
    try:
        with Image.open(path_or_image) as image:
            original_size = image.size
            image.draft("RGB", (size, size))  # no-op for formats other than JPEG
            return image.convert("RGB"), original_size
    except FileNotFoundError as exc:
        raise DataError("image file not found", source) from exc
    except Image.DecompressionBombError as exc:
        raise too_large_error(exc, source) from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        # Pillow's format plugins signal some broken headers with SyntaxError.
        raise DataError(f"cannot read image ({' '.join(str(exc).split())[:200]})", source) from exc


def _check_is_fundus(mask: np.ndarray, source: Path | None) -> None:
    """DataError unless ``mask`` looks like a fundus aperture: a disc with background around it."""
    if not mask.any():
        raise DataError("no fundus field of view found (the image is dark everywhere)", source)
    rows, cols = np.any(mask, axis=1), np.any(mask, axis=0)
    # The aperture may be clipped by the frame top and bottom (IDRiD) or left and right, never on all four sides.
    if rows[0] and rows[-1] and cols[0] and cols[-1]:
        raise DataError("no fundus field of view found (bright up to every edge: not a fundus photo?)", source)
    circle = _fit_circle(mask)
    height, width = mask.shape
    # A nearly straight edge (a dark strip beside an X-ray) fits a huge circle that matches any large region.
    if circle is None or not (
        0 <= circle[0] < width and 0 <= circle[1] < height and circle[2] <= 0.53 * max(mask.shape)
    ):
        raise DataError("no fundus field of view found (the bright region has no round edge)", source)
    iou = _circle_iou(mask, *circle)
    if iou < _MIN_CIRCLE_IOU:
        raise DataError(f"no fundus field of view found (the bright region is not a disc, IoU {iou:.2f})", source)


def _fit_circle(mask: np.ndarray) -> tuple[float, float, float] | None:
    """Centre x, y and radius of the circle through the boundary of ``mask`` (the parts not on the frame)."""
    edge = mask & ~ndimage.binary_erosion(mask)
    edge[[0, -1], :] = False
    edge[:, [0, -1]] = False
    ys, xs = np.nonzero(edge)
    if len(xs) < _MIN_EDGE_PIXELS:
        return None
    xs, ys = xs.astype(np.float64), ys.astype(np.float64)
    # Algebraic (Kasa) fit: x^2 + y^2 + D x + E y + F = 0 is linear in D, E, F.
    design = np.column_stack([xs, ys, np.ones_like(xs)])
    (d, e, f), *_ = np.linalg.lstsq(design, -(xs**2 + ys**2), rcond=None)
    cx, cy = -d / 2, -e / 2
    radius_sq = cx * cx + cy * cy - f
    return (float(cx), float(cy), float(np.sqrt(radius_sq))) if radius_sq > 0 else None


def _circle_iou(mask: np.ndarray, cx: float, cy: float, radius: float) -> float:
    yy, xx = np.ogrid[: mask.shape[0], : mask.shape[1]]
    disc = (xx - cx) ** 2 + (yy - cy) ** 2 <= radius**2
    return float((disc & mask).sum() / (disc | mask).sum())


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.nonzero(np.any(mask, axis=1))[0], np.nonzero(np.any(mask, axis=0))[0]
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _square_box(left: int, top: int, right: int, bottom: int) -> tuple[int, int, int, int]:
    """The square centred on the box; the parts beyond the image are filled with black by ``Image.crop``."""
    side = max(right - left, bottom - top)
    x0 = left - (side - (right - left)) // 2
    y0 = top - (side - (bottom - top)) // 2
    return x0, y0, x0 + side, y0 + side


def _crop_resize(image: Image.Image, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    # Pillow's resize filters widen their support when shrinking, so this is anti-aliased.
    return np.array(image.crop(box).resize((size, size), Image.Resampling.BICUBIC), dtype=np.uint8)


def _local_contrast(pixels: np.ndarray, fov: np.ndarray, sigma: float) -> np.ndarray:
    """Ben Graham's local contrast with the local mean taken over FOV pixels only (normalised convolution)."""
    weight = fov.astype(np.float32)
    values = pixels.astype(np.float32)
    blurred = ndimage.gaussian_filter(values * weight[..., None], sigma=(sigma, sigma, 0))
    norm = ndimage.gaussian_filter(weight, sigma=sigma)
    local_mean = blurred / np.maximum(norm, 1e-6)[..., None]
    return np.clip(4 * values - 4 * local_mean + 128, 0, 255).astype(np.uint8)


def _to_original(
    box: tuple[int, int, int, int], original: tuple[int, int], decoded: tuple[int, int]
) -> tuple[int, int, int, int]:
    sx, sy = original[0] / decoded[0], original[1] / decoded[1]
    left, top, right, bottom = box
    return (
        max(0, round(left * sx)),
        max(0, round(top * sy)),
        min(original[0], round(right * sx)),
        min(original[1], round(bottom * sy)),
    )


class FundusImageSet(ImageSet):
    """Fundus photos cropped to their FOV by :func:`fundus_crop` when loaded, as uint8 ``(3, size, size)``."""

    def __init__(
        self,
        name: str,
        source: Path,
        paths: Sequence[Path],
        ids: list[str],
        patient_ids: list[str],
        labels: np.ndarray | None = None,
        class_names: list[str] | None = None,
        *,
        image_size: int = 224,
        local_contrast: bool = False,
        threshold: int = FOV_THRESHOLD,
    ) -> None:
        if not (len(paths) == len(ids) == len(patient_ids)) or (labels is not None and len(labels) != len(ids)):
            raise ValueError("paths, ids, patient_ids and labels must have the same length")
        if image_size < 1:
            raise DataError(f"image_size must be positive, got {image_size}", source)
        self.name = name
        self.source = source
        self.paths = [Path(p) for p in paths]
        self.ids = ids
        self.patient_ids = patient_ids
        self.labels = labels
        self.class_names = class_names
        self.image_size = image_size
        self.local_contrast = local_contrast
        self.threshold = threshold

    def load(self, index: int) -> np.ndarray:
        return self.crop(index)[0]

    def crop(self, index: int) -> tuple[np.ndarray, FundusInfo]:
        """The cropped image and where its FOV was found (for quality checks)."""
        return fundus_crop(
            self.paths[index], self.image_size, threshold=self.threshold, local_contrast=self.local_contrast
        )

    def fingerprint(self) -> str:
        """Hash of paths, file sizes and mtimes, ids, labels and the crop options (contents are not read)."""
        return self._digest(file_list_digest(self.paths, self.ids, self.patient_ids, self.labels))

    def content_fingerprint(self) -> str:
        return self._digest(file_list_digest(self.paths, self.ids, self.patient_ids, self.labels, content=True))

    def _digest(self, files: Any) -> str:
        options = f"fundus size={self.image_size} local_contrast={self.local_contrast} threshold={self.threshold}"
        files.update(options.encode())
        return files.hexdigest()[:16]
