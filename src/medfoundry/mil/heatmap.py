"""Per-tile attention drawn over a slide thumbnail.

Scores are mapped to [0, 1] by rank within the slide (as CLAM's heatmaps do): attention is a softmax over
thousands of tiles, so raw values are tiny and heavy-tailed, and min-max scaling would leave all but a few
tiles at the bottom of the colour map. Overlapping tiles average their scores; pixels no tile covers keep the
thumbnail's own colour.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from medfoundry.data.wsi import SLIDE_SUFFIXES
from medfoundry.errors import DataError
from medfoundry.io_utils import atomic_path

log = logging.getLogger("medfoundry.mil")
# Long side of the thumbnail heatmaps are drawn on: enough to see tissue structure, small enough to share.
_THUMBNAIL_SIDE = 2048


def normalise_scores(scores: np.ndarray, method: str = "rank") -> np.ndarray:
    """Scores in [0, 1]: ``rank`` (percentile within the slide, ties share a rank) or ``minmax``."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size <= 1 or np.ptp(scores) == 0:
        return np.ones_like(scores)
    if method == "minmax":
        return (scores - scores.min()) / np.ptp(scores)
    if method == "rank":
        _, inverse = np.unique(scores, return_inverse=True)
        return inverse / max(int(inverse.max()), 1)
    raise ValueError(f"unknown score normalisation {method!r}; use 'rank' or 'minmax'")


def _tile_boxes(
    coords: np.ndarray, patch_size_level0: int, level0_size: tuple[int, int], thumb_size: tuple[int, int]
) -> np.ndarray:
    """Tile rectangles (x0, y0, x1, y1) in thumbnail pixels, clipped to the thumbnail."""
    scale = np.array([thumb_size[0] / level0_size[0], thumb_size[1] / level0_size[1]])
    start = np.floor(coords * scale).astype(np.int64)
    # At least one pixel, so tiles stay visible on a small thumbnail of a large slide.
    end = np.maximum(np.ceil((coords + patch_size_level0) * scale).astype(np.int64), start + 1)
    boxes = np.concatenate([start, end], axis=1)
    return np.clip(boxes, 0, [thumb_size[0], thumb_size[1], thumb_size[0], thumb_size[1]])


def score_map(
    coords: np.ndarray,
    scores: np.ndarray,
    patch_size_level0: int,
    level0_size: tuple[int, int],
    thumb_size: tuple[int, int],
) -> tuple[np.ndarray, np.ndarray]:
    """Mean score per thumbnail pixel (H, W) and a mask of the pixels at least one tile covers."""
    width, height = thumb_size
    total = np.zeros((height, width))
    count = np.zeros((height, width))
    boxes = _tile_boxes(coords, patch_size_level0, level0_size, thumb_size)
    for (x0, y0, x1, y1), score in zip(boxes, scores, strict=True):
        total[y0:y1, x0:x1] += score
        count[y0:y1, x0:x1] += 1
    covered = count > 0
    return np.divide(total, count, out=np.zeros_like(total), where=covered), covered


def attention_heatmap(
    thumbnail: Image.Image,
    coords: np.ndarray,
    patch_size_level0: int,
    level0_size: tuple[int, int],
    scores: Sequence[float] | np.ndarray,
    *,
    cmap: str = "jet",
    alpha: float = 0.5,
    normalise: str = "rank",
) -> Image.Image:
    """The thumbnail (RGB, same size) with each tile tinted by its attention score.

    ``coords`` are level-0 top-left corners (N, 2) of tiles ``patch_size_level0`` wide; ``level0_size`` is the
    slide's level-0 (width, height); ``scores`` has one value per tile (higher = more attended).
    """
    from matplotlib import colormaps

    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if coords.shape[0] != scores.shape[0]:
        raise DataError(f"{coords.shape[0]} tile coordinates but {scores.shape[0]} attention scores")
    if not np.isfinite(scores).all():
        raise DataError("attention scores contain NaN or infinite values")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    base = np.asarray(thumbnail.convert("RGB"), dtype=np.float64) / 255.0
    values, covered = score_map(
        coords, normalise_scores(scores, normalise), patch_size_level0, level0_size, thumbnail.size
    )
    colours = colormaps[cmap](values)[..., :3]
    blended = np.where(covered[..., None], (1 - alpha) * base + alpha * colours, base)
    return Image.fromarray(np.round(blended * 255).astype(np.uint8), mode="RGB")


def save_heatmap(image: Image.Image, path: str | Path) -> Path:
    """Write the heatmap as PNG atomically (no half-written image is left after a crash)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return path


# What a slide_path attribute may name: the formats open_slide reads (a DICOM WSI is a folder).
_SLIDE_FILE_SUFFIXES = (*SLIDE_SUFFIXES, ".tif", ".tiff")


def _slide_location(value: object) -> Path | None:
    """The slide a features file's ``slide_path`` attribute names, or None when it names anything else.

    The attribute comes from a file that may have been made elsewhere: only an existing slide file (by suffix) or a
    folder is opened, never a device, a pipe or an arbitrary file.
    """
    if not isinstance(value, str) or not value or "\0" in value:
        return None
    path = Path(value)
    if path.is_dir():
        return path
    if path.is_file() and path.name.lower().endswith(_SLIDE_FILE_SUFFIXES):
        return path
    return None


def write_attention_heatmaps(bags: Sequence[Any], attention: Sequence[np.ndarray | None], out_dir: Path) -> list[Path]:
    """One PNG per bag whose slide can be opened: attention over the slide's thumbnail.

    The slide comes from the features file's ``slide_path`` attribute (written by ``wsi embed``), the tile size
    from ``patch_size_level0``. A bag without attention, without those attributes or whose slide is gone is
    skipped with a warning naming it; the others are drawn.
    """
    from medfoundry.wsi.tiling import open_slide

    written = []
    for bag, scores in zip(bags, attention, strict=True):
        slide_path, size0 = bag.attrs.get("slide_path"), bag.attrs.get("patch_size_level0")
        if scores is None or slide_path is None or size0 is None:
            log.warning("%s: no heatmap (needs attention scores, slide_path and patch_size_level0)", bag.slide_id)
            continue
        where = _slide_location(slide_path)
        if where is None:
            log.warning("%s: no heatmap (slide_path attribute is not a slide file or folder)", bag.slide_id)
            continue
        try:
            slide = open_slide(where)
        except DataError as error:
            log.warning("%s: no heatmap (%s)", bag.slide_id, error)
            continue
        try:
            thumbnail = slide.get_thumbnail((_THUMBNAIL_SIDE, _THUMBNAIL_SIDE)).convert("RGB")
            picture = attention_heatmap(thumbnail, bag.coords, int(size0), slide.dimensions, scores)
        finally:
            slide.close()
        written.append(save_heatmap(picture, Path(out_dir) / f"{bag.slide_id}.png"))
    return written
