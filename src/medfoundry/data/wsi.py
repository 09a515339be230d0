"""Tiles cut from a whole-slide image (OpenSlide), on a grid restricted to tissue.

A slide becomes an ``ImageSet`` of tiles: each tile is read lazily from the slide when loaded, so a large slide
never sits in memory. Tissue is found on a thumbnail by Otsu's threshold on saturation (H&E tissue is coloured,
glass and background are grey or white), and a tile is kept when enough of it is tissue.
Tiles keep the slide's stem as their patient (slide) id, so splits and bootstraps never separate one slide's tiles.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from medfoundry.data.sample import ImageSet, Splits
from medfoundry.errors import DataError
from medfoundry.wsi.tiling import open_slide, otsu_tissue_mask, read_thumbnail, select_tissue_tiles, slide_stem

# Slide formats OpenSlide reads that are never plain images (.tif/.tiff need the ``wsi:`` prefix).
SLIDE_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".scn", ".svslide", ".bif", ".vms", ".vmu")
_THUMBNAIL_SIZE = 1024


@dataclass(frozen=True)
class TileGrid:
    """Where tiles are read: level-0 corners, the level-0 size each covers, and the output size in pixels."""

    corners: np.ndarray  # (N, 2) x, y at level 0
    read_size: int  # level-0 pixels per tile side
    tile_size: int  # output pixels per tile side
    mpp: float | None  # micrometres per output pixel, when the slide states its resolution


def _open(path: Path):  # noqa: ANN202 - openslide's type is not exported with annotations
    return open_slide(path)


def tissue_mask(
    slide,  # noqa: ANN001
    thumbnail_size: int = _THUMBNAIL_SIZE,
    source: Path | None = None,
) -> tuple[np.ndarray, float]:
    """Boolean tissue mask of a thumbnail, and level-0 pixels per thumbnail pixel."""
    thumbnail = read_thumbnail(slide, thumbnail_size, source)
    scale = slide.dimensions[0] / thumbnail.shape[1]
    return otsu_tissue_mask(thumbnail), scale


def tile_grid(
    slide,  # noqa: ANN001
    tile_size: int,
    mpp: float | None,
    min_tissue: float,
    source: Path,
) -> TileGrid:
    """Non-overlapping tiles on a level-0 grid, kept where at least ``min_tissue`` of the tile is tissue."""
    base_mpp = slide.properties.get("openslide.mpp-x")
    if mpp is not None and base_mpp is None:
        raise DataError(f"the slide does not state its resolution, so tiles at {mpp} um/px cannot be cut", source)
    read_size = tile_size if mpp is None else int(round(tile_size * mpp / float(base_mpp)))
    width, height = slide.dimensions
    if read_size > min(width, height):
        raise DataError(f"tiles of {read_size} level-0 pixels do not fit in a {width}x{height} slide", source)
    mask, _ = tissue_mask(slide, source=source)
    corners, _ = select_tissue_tiles(mask, (width, height), read_size, min_tissue)
    if len(corners) == 0:
        raise DataError(f"no tile has at least {min_tissue:.0%} tissue; lower min_tissue or check the slide", source)
    out_mpp = float(base_mpp) * read_size / tile_size if base_mpp is not None else None
    return TileGrid(corners, read_size, tile_size, out_mpp)


class WSITileSet(ImageSet):
    """Tiles of one slide, read on demand as (3, tile, tile) uint8 RGB."""

    def __init__(self, path: Path, grid: TileGrid) -> None:
        self.path = path
        self.source = path
        self.grid = grid
        stem = slide_stem(path)  # a DICOM slide folder keeps its whole (dotted) name
        self.name = stem
        self.ids = [f"{stem}@{x}_{y}" for x, y in grid.corners]
        self.patient_ids = [stem] * len(self.ids)
        self.labels = None
        self._slide = None

    def __getstate__(self) -> dict:
        # OpenSlide handles cannot be pickled into DataLoader workers: each worker opens its own.
        return {**self.__dict__, "_slide": None}

    def load(self, index: int) -> np.ndarray:
        if self._slide is None:
            self._slide = _open(self.path)
        x, y = (int(v) for v in self.grid.corners[index])
        size = self.grid.read_size
        try:
            region = self._slide.read_region((x, y), 0, (size, size)).convert("RGB")
        except Exception as error:  # noqa: BLE001 - OpenSlide raises several types for damaged tiles
            raise DataError(f"cannot read the tile at ({x}, {y}): {error}", self.path) from None
        if size != self.grid.tile_size:
            region = region.resize((self.grid.tile_size, self.grid.tile_size), Image.Resampling.BILINEAR)
        return np.ascontiguousarray(np.asarray(region).transpose(2, 0, 1))

    # No content_fingerprint of its own: a slide is gigabytes, so a resumed job keys on its path, size and time.
    def fingerprint(self) -> str:
        stat = self.path.stat()
        digest = hashlib.sha256(f"{self.path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode())
        digest.update(self.grid.corners.tobytes())
        digest.update(f"{self.grid.read_size}|{self.grid.tile_size}".encode())
        return digest.hexdigest()[:16]


def load_wsi_tiles(
    path: str | Path, *, tile_size: int = 224, mpp: float | None = None, min_tissue: float = 0.5
) -> Splits:
    """Tiles of ``tile_size`` pixels from a slide, at ``mpp`` micrometres per pixel (default: the slide's level 0).

    Returns ``{"train": WSITileSet}`` (a slide has no splits of its own; unlabeled tiles feed pre-training).
    """
    path = Path(path)
    slide = _open(path)
    try:
        grid = tile_grid(slide, tile_size, mpp, min_tissue, path)
    finally:
        slide.close()
    return {"train": WSITileSet(path, grid)}
