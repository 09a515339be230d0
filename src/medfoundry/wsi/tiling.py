"""Tissue tiling of whole-slide images into TRIDENT/CLAM-style coordinate files.

A slide is opened with OpenSlide (DICOM WSI with wsidicom, behind the same interface: ``wsi/dicom.py``),
tissue is found by Otsu's threshold on saturation in a low-resolution
thumbnail (H&E tissue is coloured; glass, dust and background are grey or white), and a non-overlapping
level-0 grid is kept where at least ``min_tissue`` of each tile is tissue. Each slide gives
``patches/<stem>.h5`` (dataset ``coords`` with TRIDENT's attributes plus ``mpp`` and ``level``) and
``thumbnails/<stem>.png`` (tissue overlay and tile grid). Bad slides are skipped with a reason; the run goes on.

Resolution is strict: tiles are cut at a physical size (``mpp``, micrometres per output pixel), so a slide that
does not state its level-0 MPP is an error unless the caller gives ``mpp_override``. A target between pyramid
levels is read from the nearest level at least as fine as the target, then resized.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np
from PIL import Image, ImageDraw

from medfoundry.errors import DataError
from medfoundry.io_utils import atomic_path, write_json_atomic

if TYPE_CHECKING:  # imported where used: sharding brings torch, which tiling alone does not need
    from medfoundry.wsi.sharding import Shard

log = logging.getLogger("medfoundry.wsi")

# Files a folder argument expands to (plus DICOM slide folders: the ``.dcm`` instances of one slide).
SLIDE_FILE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".svslide", ".bif", ".vms", ".vmu", ".dcm")
# Asking for a little finer than level 0 (0.49 um/px on a 0.499 slide) is a rounding matter, not a new resolution.
UPSAMPLE_TOLERANCE = 0.05
# Mask pixels per tile side: enough to measure a tissue fraction, few enough to keep the thumbnail small.
_MASK_PIXELS_PER_TILE = 8
_MIN_THUMBNAIL, _MAX_THUMBNAIL = 1024, 8192
# Gaps narrower than 1/8 of a tile inside tissue are closed before tissue fractions are measured.
_CLOSING_PER_TILE = 8
# Level pixels per thumbnail strip: 64 MiB as RGBA, whatever the slide's height.
_STRIP_PIXELS = 16 * 1024 * 1024
# Strip offsets within 1/1000 pixel of the level's grid change no 8-bit value; a level needing more is read whole
# up to 64 Mpx (0.5 GB peak), beyond that in strips anyway: a sub-pixel shift beats running out of memory.
_MAX_STRIP_SHIFT = 1e-3
_WHOLE_LEVEL_PIXELS = 64 * 1024 * 1024


@dataclass(frozen=True)
class ReadPlan:
    """How one output tile is read: at ``level``, ``read_size`` pixels square, resized to ``patch_size``."""

    level: int
    level_downsample: float
    read_size: int  # pixels read at ``level``
    patch_size: int  # output pixels
    patch_size_level0: int  # level-0 pixels covered by one tile
    base_mpp: float  # level-0 micrometres per pixel
    target_mpp: float


@dataclass
class TileResult:
    slide: Path
    patches: Path
    thumbnail: Path
    tiles: int
    level: int
    seconds: float


@dataclass
class TileSummary:
    done: list[TileResult] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """False when every slide failed (the CLI then exits 1)."""
        return bool(self.done) or not self.skipped

    def as_dict(self) -> dict[str, Any]:
        return {
            "done": [
                {**asdict(r), "slide": str(r.slide), "patches": str(r.patches), "thumbnail": str(r.thumbnail)}
                for r in self.done
            ],
            "skipped": [{"slide": str(path), "reason": reason} for path, reason in self.skipped],
        }


def open_slide(path: Path):  # noqa: ANN201 - openslide's type is not exported with annotations
    """An OpenSlide handle, or ``DataError`` naming the file with the reason it cannot be read.

    A ``.dcm`` file or a folder (the instances of one DICOM slide) opens as a
    :class:`~medfoundry.wsi.dicom.DicomSlide`, which answers the same calls through wsidicom.
    """
    from medfoundry.extras import require
    from medfoundry.wsi.dicom import DicomSlide, is_dicom_slide

    openslide = require("openslide", "wsi", "reading whole-slide images")

    path = Path(path)
    if not path.exists():
        raise DataError("slide not found", path)
    if is_dicom_slide(path):
        return DicomSlide(path)
    if not path.is_file():
        raise DataError("is not a file", path)
    try:
        return openslide.OpenSlide(str(path))
    except (openslide.OpenSlideError, openslide.OpenSlideUnsupportedFormatError) as error:
        raise DataError(f"OpenSlide cannot read this slide ({error}); is it truncated or not a WSI?", path) from None


def slide_stem(path: Path) -> str:
    """The name outputs are called by: a file's stem, a DICOM slide folder's whole name (UIDs hold dots)."""
    path = Path(path)
    return path.name if path.is_dir() else path.stem


def level0_mpp(slide, source: Path, mpp_override: float | None = None) -> float | None:  # noqa: ANN001
    """The slide's stated level-0 MPP (``openslide.mpp-x``), or ``mpp_override`` when given."""
    if mpp_override is not None:
        return float(mpp_override)
    value = slide.properties.get("openslide.mpp-x")
    try:
        return float(value) if value not in (None, "") and float(value) > 0 else None
    except ValueError:
        raise DataError(f"the slide states an unreadable MPP ({value!r}); give --mpp-override", source) from None


def resolve_read_level(
    base_mpp: float | None,
    target_mpp: float,
    patch_size: int,
    level_downsamples: Sequence[float],
    source: Path | str = "",
    mpp_override: float | None = None,
) -> ReadPlan:
    """Which pyramid level to read and how many pixels, for tiles of ``patch_size`` at ``target_mpp``.

    The chosen level is the coarsest one whose downsample is <= target / base, so tiles are only ever
    downscaled (never invented from a coarser level).
    """
    base = float(mpp_override) if mpp_override is not None else base_mpp
    if base is None:
        raise DataError(
            f"the slide does not state its resolution (no MPP metadata), so tiles at {target_mpp} um/px "
            "cannot be cut; give the level-0 MPP with --mpp-override",
            source,
        )
    if target_mpp <= 0 or base <= 0:
        raise DataError(f"MPP must be positive (target {target_mpp}, level 0 {base})", source)
    wanted = target_mpp / base
    if wanted < 1 - UPSAMPLE_TOLERANCE:
        raise DataError(
            f"{target_mpp} um/px is finer than the slide's level 0 ({base} um/px); tiles would be upsampled",
            source,
        )
    # A level within 0.1% of the target counts as exact: stated downsamples are rounded (e.g. 3.9998 for 4).
    candidates = [i for i, d in enumerate(level_downsamples) if d <= wanted * 1.001]
    level = max(candidates, key=lambda i: level_downsamples[i]) if candidates else 0
    downsample = float(level_downsamples[level])
    size0 = int(round(patch_size * target_mpp / base))
    return ReadPlan(
        level=level,
        level_downsample=downsample,
        read_size=max(1, int(round(size0 / downsample))),
        patch_size=patch_size,
        patch_size_level0=size0,
        base_mpp=base,
        target_mpp=float(target_mpp),
    )


def magnifications(slide, plan: ReadPlan) -> tuple[float, float]:  # noqa: ANN001
    """(level-0, target) objective magnification: the stated objective power, else 10 / MPP (10x ~ 1 um/px)."""
    stated = slide.properties.get("openslide.objective-power")
    try:
        level0 = float(stated) if stated not in (None, "") else 10.0 / plan.base_mpp
    except ValueError:
        level0 = 10.0 / plan.base_mpp
    # One decimal: 20 x 0.499 / 0.5 = 19.96 is "20x" to anyone reading the attribute.
    return round(level0, 1), round(level0 * plan.base_mpp / plan.target_mpp, 1)


def thumbnail_size(dimensions: tuple[int, int], patch_size_level0: int) -> int:
    """Longest side of the mask thumbnail: each tile spans a few mask pixels, within fixed bounds."""
    longest = max(dimensions)
    wanted = longest * _MASK_PIXELS_PER_TILE / max(patch_size_level0, 1)
    return int(min(max(wanted, _MIN_THUMBNAIL), _MAX_THUMBNAIL, longest))


def read_thumbnail(slide, size: int, source: Path | None, *, strip_pixels: int = _STRIP_PIXELS) -> np.ndarray:  # noqa: ANN001
    """RGB thumbnail whose longest side is ``size``, from the coarsest level fine enough; damaged levels become
    ``DataError``.

    Like OpenSlide's ``get_thumbnail`` (transparent pixels become white glass), but shrunk by an integer box
    filter (``Image.reduce``: each thumbnail pixel is the mean colour of its area, what a tissue fraction needs)
    and a final bilinear resize, instead of Lanczos over the whole level. The level is read in horizontal strips
    of at most ``strip_pixels`` pixels (and at least one box row), each reduced before the next is read, so peak
    memory grows with the level's width, not its area: a whole 20k x 20k single-level read took 3.2 GB.
    """
    try:
        width, height = (int(v) for v in slide.dimensions)
        target = (max(1, round(width * size / max(width, height))), max(1, round(height * size / max(width, height))))
        level = slide.get_best_level_for_downsample(max(width, height) / size)
        level_width, level_height = (int(v) for v in slide.level_dimensions[level])
        downsample = float(slide.level_downsamples[level])
        factor = max(1, min(level_width // target[0], level_height // target[1]))
        # A multiple of the box size, so no box straddles two strips and the result equals a whole-level reduce.
        rows = max(1, strip_pixels // max(level_width * factor, 1)) * factor
        # OpenSlide maps a level-0 y to y / downsample and interpolates a fractional result, so with a non-integer
        # downsample (SVS: 4.0003) strips would be shifted by a fraction of a pixel. Such a level is read whole, as
        # before, unless that would be large; coarse pyramid levels are small, single-level slides have ds 1.
        shift = max((math.ceil(top * downsample) / downsample - top for top in range(0, level_height, rows)), default=0)
        if shift > _MAX_STRIP_SHIFT and level_width * level_height <= _WHOLE_LEVEL_PIXELS:
            rows = level_height
        strips = [
            _reduced_strip(slide, level, downsample, top, level_width, min(rows, level_height - top), factor)
            for top in range(0, level_height, rows)
        ]
    except Exception as error:  # noqa: BLE001 - OpenSlide raises several types for damaged levels
        raise DataError(f"cannot read a low-resolution level for the tissue mask ({error})", source) from None
    image = Image.fromarray(np.concatenate(strips, axis=0), "RGB")
    if image.size != target:
        image = image.resize(target, Image.Resampling.BILINEAR)
    return np.asarray(image)


def _reduced_strip(
    slide,  # noqa: ANN001
    level: int,
    downsample: float,
    top: int,
    width: int,
    rows: int,
    factor: int,
) -> np.ndarray:
    """Rows ``top`` .. ``top + rows`` of ``level`` as RGB (glass white), box-reduced by ``factor``."""
    # Level-0 y rounded up: DICOM slides floor location / downsample, which must give back ``top`` exactly.
    region = slide.read_region((0, math.ceil(top * downsample)), level, (width, rows))
    if region.mode == "RGBA" and region.getextrema()[3][0] < 255:
        strip = Image.new("RGB", region.size, (255, 255, 255))
        strip.paste(region, None, region)
    else:
        strip = region.convert("RGB")
    del region  # the RGBA strip is the largest buffer alive; let it go before reducing
    if factor > 1:
        strip = strip.reduce(factor)
    return np.asarray(strip)


def hsv_saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation, (max - min) / max, 0 for black. Equal to skimage's ``rgb2hsv(rgb)[..., 1]`` within float32
    rounding, but about 5x faster: that computes hue and value in float64 too, and only saturation is needed."""
    high = rgb.max(axis=-1).astype(np.float32)
    low = rgb.min(axis=-1).astype(np.float32)
    return np.where(high > 0, (high - low) / np.maximum(high, 1e-12), 0.0).astype(np.float32)


def otsu_tissue_mask(thumbnail: np.ndarray) -> np.ndarray:
    """Boolean tissue mask: saturation above Otsu's threshold (and above 0.05, so all-glass slides stay empty)."""
    from skimage.filters import threshold_otsu

    saturation = hsv_saturation(thumbnail)
    # Otsu on a near-constant thumbnail (all glass) would split noise; require a minimum saturation as well.
    threshold = max(threshold_otsu(saturation), 0.05) if saturation.max() > saturation.min() else 1.0
    return saturation > threshold


def close_mask(mask: np.ndarray, radius: int) -> np.ndarray:
    """Morphological closing: bridges the glass between collagen fibres and nuclei, so a tile over loose
    tissue counts as tissue, while background larger than ``radius`` mask pixels stays background."""
    if radius < 1:
        return mask
    from skimage.morphology import closing, disk

    # Padding keeps tissue touching the border from being eroded by the closing's edge effects.
    padded = np.pad(mask, radius, mode="edge")
    # The disk as a sequence of small footprints: about 10x faster at the radii used here (~20 px on a 1024 px
    # thumbnail), and within 0.3% of the exact disk's mask on CMU-1-Small-Region.
    closed = closing(padded, disk(radius, decomposition="sequence"))
    return closed[radius:-radius, radius:-radius].astype(bool)


def grid_corners(dimensions: tuple[int, int], size0: int) -> np.ndarray:
    """Level-0 top-left corners of the non-overlapping tiles that fit entirely inside the slide."""
    width, height = dimensions
    xs = np.arange(0, width - size0 + 1, size0, dtype=np.int64)
    ys = np.arange(0, height - size0 + 1, size0, dtype=np.int64)
    gx, gy = np.meshgrid(xs, ys)
    return np.stack([gx.ravel(), gy.ravel()], axis=1)


def tissue_fractions(mask: np.ndarray, corners: np.ndarray, size0: int, scale: float) -> np.ndarray:
    """Share of tissue under each tile, from a summed-area table of the mask (one pass for any tile count)."""
    integral = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.int64)
    integral[1:, 1:] = mask.astype(np.int64).cumsum(0).cumsum(1)
    height, width = mask.shape
    x0 = np.clip((corners[:, 0] / scale).astype(np.int64), 0, width - 1)
    y0 = np.clip((corners[:, 1] / scale).astype(np.int64), 0, height - 1)
    # At least one mask pixel per tile, even when a tile is smaller than a mask pixel.
    x1 = np.clip(np.maximum(((corners[:, 0] + size0) / scale).astype(np.int64), x0 + 1), 1, width)
    y1 = np.clip(np.maximum(((corners[:, 1] + size0) / scale).astype(np.int64), y0 + 1), 1, height)
    area = (x1 - x0) * (y1 - y0)
    inside = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return inside / area


def select_tissue_tiles(
    mask: np.ndarray, dimensions: tuple[int, int], size0: int, min_tissue: float
) -> tuple[np.ndarray, np.ndarray]:
    """(corners, tissue fraction) of the grid tiles with at least ``min_tissue`` tissue."""
    corners = grid_corners(dimensions, size0)
    if len(corners) == 0:
        return corners, np.zeros(0)
    scale = dimensions[0] / mask.shape[1]
    fractions = tissue_fractions(mask, corners, size0, scale)
    keep = fractions >= min_tissue
    return corners[keep], fractions[keep]


def read_tile(slide, corner: Sequence[int], plan: ReadPlan) -> Image.Image:  # noqa: ANN001
    """One RGB tile at the plan's resolution: read at ``plan.level`` and resized to ``patch_size`` if needed."""
    x, y = int(corner[0]), int(corner[1])
    region = slide.read_region((x, y), plan.level, (plan.read_size, plan.read_size)).convert("RGB")
    if plan.read_size != plan.patch_size:
        region = region.resize((plan.patch_size, plan.patch_size), Image.Resampling.BILINEAR)
    return region


def check_level_readable(slide, corners: np.ndarray, plan: ReadPlan, source: Path) -> None:  # noqa: ANN001
    """Read the first tile now, so a damaged level is a skip at tiling time, not a crash while embedding."""
    try:
        read_tile(slide, corners[0], plan)
    except Exception as error:  # noqa: BLE001 - OpenSlide raises several types for damaged tiles
        raise DataError(f"cannot read level {plan.level} ({error})", source) from None


def coords_attrs(slide, plan: ReadPlan, name: str, source: Path) -> dict[str, Any]:  # noqa: ANN001
    """TRIDENT's attributes on ``coords`` plus the ones it lacks (``mpp``, ``level``, how a tile is read)."""
    level0_mag, target_mag = magnifications(slide, plan)
    width, height = slide.dimensions
    return {
        "patch_size": plan.patch_size,
        "patch_size_level0": plan.patch_size_level0,
        "target_magnification": target_mag,
        "level0_magnification": level0_mag,
        "level0_width": int(width),
        "level0_height": int(height),
        "overlap": 0,
        "mpp": plan.target_mpp,
        "level": plan.level,
        "level_downsample": plan.level_downsample,
        "read_size": plan.read_size,
        "level0_mpp": plan.base_mpp,
        "name": name,
        "slide_path": str(Path(source).resolve()),
        # CLAM's names (Whole_Slide_Bag_FP reads ``patch_level``; its ``patch_size`` means pixels at that level,
        # ours the output size: the two agree when ``read_size == patch_size``, and `wsi export-features --layout
        # clam` writes CLAM's meaning).
        "patch_level": plan.level,
        "downsample": np.array([plan.level_downsample, plan.level_downsample], dtype=np.float64),
        "level_dim": np.array(slide.level_dimensions[plan.level], dtype=np.int64),
        "downsampled_level_dim": np.array(slide.level_dimensions[plan.level], dtype=np.int64),
    }


def write_patches(path: Path, corners: np.ndarray, attrs: dict[str, Any]) -> Path:
    """``coords`` (N x 2 int64, level-0 top-left x, y) with its attributes, written atomically."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as h5:
        dataset = h5.create_dataset("coords", data=np.asarray(corners, dtype=np.int64))
        for key, value in attrs.items():
            dataset.attrs[key] = value
    return path


def read_patches(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    """``coords`` and its attributes from a patches file (ours, TRIDENT's or CLAM's)."""
    try:
        with h5py.File(path, "r") as h5:
            dataset = h5["coords"]
            coords = np.asarray(dataset[()], dtype=np.int64)
            attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in dataset.attrs.items()}
    except (OSError, KeyError) as error:
        raise DataError(f"not a readable patches file with a 'coords' dataset ({error})", path) from None
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise DataError(f"'coords' has shape {coords.shape}, expected (N, 2)", path)
    return coords, attrs


def draw_thumbnail(
    thumbnail: np.ndarray, mask: np.ndarray, corners: np.ndarray, size0: int, scale: float
) -> Image.Image:
    """The thumbnail with tissue tinted green, its outline drawn, and each kept tile outlined in blue."""
    from scipy.ndimage import binary_erosion

    image = thumbnail.astype(np.float32)
    image[mask] = 0.75 * image[mask] + 0.25 * np.array([0, 200, 0], dtype=np.float32)
    outline = mask & ~binary_erosion(mask)
    image[outline] = (0, 160, 0)
    picture = Image.fromarray(image.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    for x, y in corners:
        box = (x / scale, y / scale, (x + size0) / scale - 1, (y + size0) / scale - 1)
        draw.rectangle(box, outline=(30, 60, 220))
    return picture


def save_png(picture: Image.Image, path: Path) -> Path:
    with atomic_path(path) as tmp:
        picture.save(tmp, format="PNG", compress_level=1)  # fast: thumbnails are previews
    return path


def tile_slide(
    source: Path,
    out_dir: Path,
    mpp: float = 0.5,
    tile_size: int = 224,
    min_tissue: float = 0.5,
    mpp_override: float | None = None,
) -> TileResult:
    """Tile one slide into ``out_dir/patches/<stem>.h5`` and ``out_dir/thumbnails/<stem>.png``."""
    started = time.perf_counter()
    source = Path(source)
    slide = open_slide(source)
    try:
        plan = resolve_read_level(
            level0_mpp(slide, source, mpp_override), mpp, tile_size, slide.level_downsamples, source
        )
        dimensions = tuple(int(v) for v in slide.dimensions)
        if plan.patch_size_level0 > min(dimensions):
            raise DataError(
                f"tiles of {plan.patch_size_level0} level-0 pixels do not fit in a "
                f"{dimensions[0]}x{dimensions[1]} slide",
                source,
            )
        thumbnail = read_thumbnail(slide, thumbnail_size(dimensions, plan.patch_size_level0), source)
        scale = dimensions[0] / thumbnail.shape[1]
        mask = close_mask(otsu_tissue_mask(thumbnail), int(plan.patch_size_level0 / scale / _CLOSING_PER_TILE))
        corners, _ = select_tissue_tiles(mask, dimensions, plan.patch_size_level0, min_tissue)
        if len(corners) == 0:
            raise DataError(
                f"no tissue: no tile has at least {min_tissue:.0%} tissue (try a lower --min-tissue)", source
            )
        check_level_readable(slide, corners, plan, source)
        attrs = coords_attrs(slide, plan, slide_stem(source), source)
    finally:
        slide.close()
    patches = write_patches(out_dir / "patches" / f"{slide_stem(source)}.h5", corners, attrs)
    picture = draw_thumbnail(thumbnail, mask, corners, plan.patch_size_level0, scale)
    png = save_png(picture, out_dir / "thumbnails" / f"{slide_stem(source)}.png")
    return TileResult(source, patches, png, len(corners), plan.level, time.perf_counter() - started)


def expand_slides(inputs: Iterable[str | Path]) -> list[Path]:
    """Files as given; a DICOM slide folder is one slide; other folders expand to the slide files and DICOM
    slide folders directly inside them (sorted)."""
    from medfoundry.wsi.dicom import is_dicom_slide_folder

    slides: list[Path] = []
    for item in inputs:
        path = Path(item)
        if is_dicom_slide_folder(path):
            slides.append(path)
        elif path.is_dir():
            slides.extend(
                sorted(
                    p
                    for p in path.iterdir()
                    if (p.is_file() and p.suffix.lower() in SLIDE_FILE_SUFFIXES) or is_dicom_slide_folder(p)
                )
            )
        else:
            slides.append(path)
    return slides


def tile_slides(
    slides: Iterable[str | Path],
    out_dir: str | Path,
    mpp: float = 0.5,
    tile_size: int = 224,
    min_tissue: float = 0.5,
    mpp_override: float | None = None,
    echo: Callable[[str], None] | None = None,
    shard: str | Shard | None = None,
) -> TileSummary:
    """Tile every slide; a bad slide is skipped with a one-line reason. Writes ``out_dir/tile_summary.json``.

    A slide already tiled into ``out_dir`` with the same settings is kept (``state/<stem>.json`` records them).
    Several processes may share ``out_dir`` (torchrun ranks, ``shard`` "i/n" or a SLURM array's task): each slide
    is claimed first (:mod:`medfoundry.wsi.sharding`), and under torchrun rank 0 writes the summary of all ranks.
    """
    from medfoundry.distributed import init_distributed
    from medfoundry.wsi.sharding import claimed, merge_outcomes, resolve_shard, worker_position

    out_dir = Path(out_dir)
    say = echo or log.info
    env = init_distributed()
    position, workers = worker_position(resolve_shard(shard), env)
    settings = {"mpp": mpp, "tile_size": tile_size, "min_tissue": min_tissue, "mpp_override": mpp_override}
    summary = TileSummary()
    seen: dict[str, Path] = {}
    unique: list[Path] = []
    sources = expand_slides(slides)
    # Decided before any claim, in input order, so every worker agrees on which of two same-named slides is tiled.
    for source in sources:
        if slide_stem(source) in seen:
            reason = f"same name as {seen[slide_stem(source)]}; output files are named by slide stem"
            summary.skipped.append((source, reason))
            say(f"skipped {source}: {reason}")
            continue
        seen[slide_stem(source)] = source
        unique.append(source)

    def kept(source: Path) -> TileResult | None:
        return _tiled_before(source, out_dir, settings)

    def done_elsewhere(source: Path) -> None:
        result = kept(source)
        if result is not None:
            summary.done.append(result)

    owned = claimed(unique, slide_stem, out_dir, position, workers, say, lambda s: kept(s) is not None, done_elsewhere)
    for source in owned:
        result = kept(source)
        if result is not None:
            summary.done.append(result)
            say(f"{source}: already tiled with these settings, kept")
            continue
        try:
            result = tile_slide(source, out_dir, mpp, tile_size, min_tissue, mpp_override)
        except DataError as error:
            summary.skipped.append((source, _reason(error)))
            say(f"skipped {error}")
            continue
        write_json_atomic(_tile_record(out_dir, source), {"settings": settings, "result": _result_dict(result)})
        summary.done.append(result)
        say(f"{source}: {result.tiles} tiles at level {result.level} ({result.seconds:.1f} s)")
    merged = merge_outcomes(
        {"done": summary.done, "skipped": summary.skipped},
        env,
        key=lambda row: str(row.slide if isinstance(row, TileResult) else row[0]),
        order=[str(source) for source in sources],
    )
    summary = TileSummary(merged["done"], merged["skipped"])
    if not env.is_main:
        return summary
    write_json_atomic(
        out_dir / "tile_summary.json",
        {"mpp": mpp, "tile_size": tile_size, "min_tissue": min_tissue, **summary.as_dict()},
    )
    return summary


def _tile_record(out_dir: Path, source: Path) -> Path:
    return out_dir / "state" / f"{slide_stem(source)}.json"


def _result_dict(result: TileResult) -> dict[str, Any]:
    return {**asdict(result), **{k: str(getattr(result, k)) for k in ("slide", "patches", "thumbnail")}}


def _tiled_before(source: Path, out_dir: Path, settings: dict[str, Any]) -> TileResult | None:
    """The recorded result when ``source`` was tiled into ``out_dir`` with ``settings`` and its files are there."""
    import json

    try:
        record = json.loads(_tile_record(out_dir, source).read_text(encoding="utf-8"))
        row = record["result"]
        same = record["settings"] == settings and Path(row["slide"]).resolve() == Path(source).resolve()
        files = Path(row["patches"]), Path(row["thumbnail"])
        result = TileResult(Path(source), *files, int(row["tiles"]), int(row["level"]), float(row["seconds"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return result if same and result.patches.is_file() and result.thumbnail.is_file() else None


def _reason(error: DataError) -> str:
    """The message without the leading path (the summary lists the path in its own field)."""
    text = str(error)
    prefix = f"{error.path}: " if error.path is not None else ""
    return text[len(prefix) :] if prefix and text.startswith(prefix) else text
