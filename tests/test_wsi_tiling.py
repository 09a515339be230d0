"""`wsi tile` on the real CMU-1 slide: tissue grid, TRIDENT-style attributes, resolution rules, bad slides skipped."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from medfoundry.cli.wsi import app as wsi_app
from medfoundry.errors import DataError
from medfoundry.wsi import open_slide, read_patches, read_tile, resolve_read_level, tile_slides
from medfoundry.wsi.tiling import (
    close_mask,
    level0_mpp,
    otsu_tissue_mask,
    read_thumbnail,
    select_tissue_tiles,
    thumbnail_size,
)

CMU1 = "wsi_samples/CMU-1-Small-Region.svs"
BASE_MPP = 0.499


@pytest.fixture(scope="module")
def slide(shared_data: Path) -> Path:
    return shared_data / CMU1


@pytest.fixture(scope="module")
def tiled(slide: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiles")
    summary = tile_slides([slide], out, mpp=0.5, tile_size=224, min_tissue=0.5)
    assert summary.ok and len(summary.done) == 1 and not summary.skipped
    return out


def test_tiles_lie_inside_the_slide_and_on_tissue(slide: Path, tiled: Path) -> None:
    coords, attrs = read_patches(tiled / "patches" / "CMU-1-Small-Region.h5")
    size0 = attrs["patch_size_level0"]
    # 2220 x 2967 holds 9 x 13 = 117 tiles of 224 level-0 pixels; about a third of the slide is glass.
    assert 20 <= len(coords) < 117 and coords.dtype == np.int64
    assert (coords >= 0).all() and (coords % size0 == 0).all()
    assert (coords[:, 0] + size0 <= 2220).all() and (coords[:, 1] + size0 <= 2967).all()
    assert len({tuple(c) for c in coords}) == len(coords)
    # Against the raw (unclosed) mask: tiles are mostly tissue there too, not just after gap closing.
    handle = open_slide(slide)
    try:
        thumbnail = read_thumbnail(handle, 1024, slide)
        plan = resolve_read_level(BASE_MPP, 0.5, 224, handle.level_downsamples)
        raw = otsu_tissue_mask(thumbnail)
        scale = 2220 / raw.shape[1]
        x, y = (coords / scale).astype(int).T
        assert raw[y + int(size0 / scale / 2), x + int(size0 / scale / 2)].mean() > 0.5  # tile centres
        tiles = np.stack([np.asarray(read_tile(handle, c, plan)) for c in coords[::4]])
    finally:
        handle.close()
    assert tiles.shape[1:] == (224, 224, 3)
    means = tiles.reshape(len(tiles), -1, 3).mean(axis=1)
    assert (means.mean(axis=1) < 220).all() and (means[:, 1] < means[:, 0]).mean() > 0.8  # H&E: green lowest
    assert (tiled / "thumbnails" / "CMU-1-Small-Region.png").is_file()
    assert Image.open(tiled / "thumbnails" / "CMU-1-Small-Region.png").size[0] >= 700


def test_attributes_follow_trident_and_the_resolution(tiled: Path, slide: Path, tmp_path: Path) -> None:
    _, attrs = read_patches(tiled / "patches" / "CMU-1-Small-Region.h5")
    assert attrs["patch_size"] == 224 and attrs["patch_size_level0"] == round(224 * 0.5 / BASE_MPP)
    assert attrs["level0_magnification"] == 20.0 and attrs["target_magnification"] == pytest.approx(20.0, abs=0.1)
    assert (attrs["level0_width"], attrs["level0_height"], attrs["overlap"]) == (2220, 2967, 0)
    assert attrs["mpp"] == 0.5 and attrs["level"] == 0 and attrs["level0_mpp"] == BASE_MPP
    # The slide has one level, so 1 um/px is read at level 0 (448 px) and downscaled to 224.
    tile_slides([slide], tmp_path, mpp=1.0, tile_size=224)
    coords, coarse = read_patches(tmp_path / "patches" / "CMU-1-Small-Region.h5")
    assert coarse["level"] == 0 and coarse["patch_size_level0"] == round(224 * 1.0 / BASE_MPP) == 449
    assert coarse["read_size"] == 449 and coarse["target_magnification"] == pytest.approx(10.0, abs=0.1)
    assert (coords % 449 == 0).all()


def test_read_level_between_pyramid_levels() -> None:
    downsamples = (1.0, 3.9998, 16.0)  # stated downsamples are rounded
    exact = resolve_read_level(0.25, 1.0, 224, downsamples)
    assert (exact.level, exact.read_size, exact.patch_size_level0) == (1, 224, 896)
    between = resolve_read_level(0.25, 2.0, 224, downsamples)  # 8x: level 1 (4x), never level 2 (16x)
    assert (between.level, between.read_size, between.patch_size_level0) == (1, 448, 1792)
    finer = resolve_read_level(0.25, 0.5, 224, downsamples)
    assert (finer.level, finer.read_size) == (0, 448)
    assert resolve_read_level(0.25, 8.0, 224, downsamples).level == 2
    assert resolve_read_level(0.499, 0.49, 224, (1.0,)).level == 0  # within rounding of level 0
    with pytest.raises(DataError, match="finer than the slide's level 0"):
        resolve_read_level(0.5, 0.25, 224, downsamples, "x.svs")


def test_missing_mpp_is_an_error_unless_overridden() -> None:
    with pytest.raises(DataError, match="no MPP metadata") as error:
        resolve_read_level(None, 0.5, 224, (1.0,), "scan.tiff")
    assert "scan.tiff" in str(error.value) and "--mpp-override" in str(error.value)
    plan = resolve_read_level(None, 0.5, 224, (1.0, 4.0), "scan.tiff", mpp_override=0.25)
    assert (plan.base_mpp, plan.patch_size_level0, plan.level) == (0.25, 448, 0)

    class NoMpp:
        properties: dict[str, str] = {}

    assert level0_mpp(NoMpp(), Path("a.svs")) is None
    assert level0_mpp(NoMpp(), Path("a.svs"), mpp_override=0.3) == 0.3


def test_mask_helpers() -> None:
    mask = np.zeros((100, 100), dtype=bool)
    mask[20:80, 20:80] = True
    mask[::3, :] = False  # stripes of glass inside tissue, as between collagen fibres
    closed = close_mask(mask, 2)
    assert closed[22:78, 22:78].all() and not closed[:10].any()  # the square's own edges may stay ragged
    corners, fractions = select_tissue_tiles(closed, (1000, 1000), 200, 0.5)
    assert len(corners) == 9 and (fractions >= 0.5).all()  # the 3 x 3 tiles over mask pixels 20-80
    assert len(select_tissue_tiles(np.zeros_like(mask), (1000, 1000), 200, 0.5)[0]) == 0
    assert thumbnail_size((2220, 2967), 224) == 1024 and thumbnail_size((100_000, 80_000), 224) == 3571
    assert thumbnail_size((1_000_000, 80_000), 224) == 8192


def test_bad_slides_are_skipped_and_the_good_one_is_done(slide: Path, tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.svs"
    data = slide.read_bytes()
    truncated.write_bytes(data[: len(data) // 3])
    picture = tmp_path / "photo.svs"
    Image.new("RGB", (64, 64), (200, 100, 150)).save(picture, format="PNG")
    out = tmp_path / "out"
    result = CliRunner().invoke(
        wsi_app, ["tile", str(truncated), str(slide), str(picture), str(tmp_path / "gone.svs"), "--out", str(out),
                  "--mpp", "1.0", "--tile", "112"]
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "tile_summary.json").read_text())
    assert [Path(d["slide"]).name for d in summary["done"]] == [slide.name]
    reasons = {Path(s["slide"]).name: s["reason"] for s in summary["skipped"]}
    assert set(reasons) == {"truncated.svs", "photo.svs", "gone.svs"}
    assert "truncated or not a WSI" in reasons["truncated.svs"] and "slide not found" in reasons["gone.svs"]
    assert "skipped" in result.output and "truncated.svs" in result.output
    assert sorted(p.name for p in (out / "patches").iterdir()) == ["CMU-1-Small-Region.h5"]  # no temp files left


def test_every_slide_failing_exits_1_and_no_tissue_is_a_reason(slide: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(wsi_app, ["tile", str(slide), "--out", str(tmp_path), "--min-tissue", "1.01"])
    assert result.exit_code == 1
    skipped = json.loads((tmp_path / "tile_summary.json").read_text())["skipped"]
    assert len(skipped) == 1 and "no tissue" in skipped[0]["reason"]


def test_dicom_slide_gets_a_clear_reason(shared_data: Path, tmp_path: Path) -> None:
    summary = tile_slides([shared_data / "wsi_samples" / "small_dicom.dcm"], tmp_path)
    assert not summary.ok and len(summary.skipped) == 1
    reason = summary.skipped[0][1]
    assert "wsidicom" in reason
    if importlib.util.find_spec("wsidicom") is None:
        assert "not installed" in reason


def test_folder_arguments_expand_to_slides(slide: Path, tmp_path: Path) -> None:
    summary = tile_slides([slide.parent], tmp_path, mpp=2.0, tile_size=64)
    # The folder holds the SVS (done) and the DICOM (skipped with its reason); README.md and MD5SUMS are ignored.
    assert [r.slide.name for r in summary.done] == [slide.name]
    assert [p.name for p, _ in summary.skipped] == ["small_dicom.dcm"]


def _whole_level_thumbnail(handle: Any, size: int) -> np.ndarray:  # noqa: ANN401 - an OpenSlide handle
    """The thumbnail as it was read before strips: the whole best level at once, then the same reduce and resize."""
    width, height = handle.dimensions
    target = (round(width * size / max(width, height)), round(height * size / max(width, height)))
    level = handle.get_best_level_for_downsample(max(width, height) / size)
    image = handle.read_region((0, 0), level, handle.level_dimensions[level]).convert("RGB")
    factor = min(image.width // target[0], image.height // target[1])
    image = image.reduce(factor) if factor > 1 else image
    return np.asarray(image.resize(target, Image.Resampling.BILINEAR) if image.size != target else image)


def test_thumbnail_is_read_in_bounded_strips_and_equals_a_whole_level_read(tmp_path: Path) -> None:
    tifffile = pytest.importorskip("tifffile")
    # 6000 x 4000 single-level slide: pink "tissue" disc with stripes on white glass, so the reduce has structure.
    yy, xx = np.mgrid[0:4000, 0:6000]
    tissue = (xx - 2500) ** 2 + (yy - 1800) ** 2 < 1500**2
    pixels = np.full((4000, 6000, 3), 240, dtype=np.uint8)
    pixels[tissue] = (200, 90, 160)
    pixels[tissue & (xx % 7 < 3)] = (120, 40, 110)
    path = tmp_path / "synthetic.tif"
    tifffile.imwrite(path, pixels, tile=(256, 256), compression="zlib", photometric="rgb")
    del pixels, yy, xx, tissue

    handle = open_slide(path)
    try:
        assert handle.level_count == 1
        requested: list[tuple[int, int]] = []
        real_read_region = handle.read_region

        def recording_read_region(location: tuple[int, int], level: int, size: tuple[int, int]) -> Image.Image:
            requested.append(tuple(size))
            return real_read_region(location, level, size)

        handle.read_region = recording_read_region  # wraps the real handle: reads still go through OpenSlide
        strip_pixels = 6000 * 5 * 20  # 100 rows (a multiple of the box size 5 for a 1024 px thumbnail)
        thumbnail = read_thumbnail(handle, 1024, path, strip_pixels=strip_pixels)
        assert len(requested) == 40 and all(w == 6000 and h <= strip_pixels // 6000 for w, h in requested)
        assert sum(h for _, h in requested) == 4000  # every row read exactly once
        # Strips are whole multiples of the box, so the result is bit-identical (tolerance 0) to the whole read.
        handle.read_region = real_read_region
        reference = _whole_level_thumbnail(handle, 1024)
    finally:
        handle.close()
    assert thumbnail.shape == (683, 1024, 3)
    np.testing.assert_array_equal(thumbnail, reference)


def test_level_with_a_fractional_downsample_is_not_read_in_shifted_strips(tmp_path: Path) -> None:
    tifffile = pytest.importorskip("tifffile")
    # Level 1 at 1/4.0012: OpenSlide would interpolate strips that start between its pixels (up to 19 grey levels
    # off, and a different mask, on a 10001 px slide), so this small level is read whole, exactly as before.
    rng = np.random.default_rng(0)
    level0 = rng.integers(0, 256, (3003, 4001, 3), dtype=np.uint8)
    path = tmp_path / "pyramid.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(level0, tile=(256, 256), compression="zlib", photometric="rgb")
        level1 = np.asarray(Image.fromarray(level0).resize((1000, 750), Image.Resampling.BOX))
        tif.write(level1, tile=(256, 256), compression="zlib", photometric="rgb", subfiletype=1)
    handle = open_slide(path)
    try:
        assert handle.level_count == 2 and handle.level_downsamples[1] % 1 > 1e-3
        requested: list[tuple[int, int]] = []
        real_read_region = handle.read_region

        def recording_read_region(location: tuple[int, int], level: int, size: tuple[int, int]) -> Image.Image:
            requested.append(tuple(size))
            return real_read_region(location, level, size)

        handle.read_region = recording_read_region
        thumbnail = read_thumbnail(handle, 512, path, strip_pixels=100 * 1000)
        handle.read_region = real_read_region
        reference = _whole_level_thumbnail(handle, 512)
    finally:
        handle.close()
    assert requested == [(1000, 750)]
    np.testing.assert_array_equal(thumbnail, reference)
