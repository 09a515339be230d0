"""Tiles cut from the real CMU-1 slide: tissue-only grid, lazy reads, resolution, and clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medfoundry.data.registry import load_dataset
from medfoundry.data.wsi import load_wsi_tiles
from medfoundry.errors import DataError

CMU1 = "wsi_samples/CMU-1-Small-Region.svs"


@pytest.fixture(scope="module")
def slide(shared_data: Path) -> Path:
    return shared_data / CMU1


def test_tiles_cover_tissue_only(slide: Path) -> None:
    tiles = load_dataset(slide)["train"]  # .svs is recognised without a prefix
    # The 2967 x 2220 slide holds 13 x 9 = 117 tiles of 224 px; about a third is background glass.
    assert 20 <= len(tiles) < 117
    assert set(tiles.patient_ids) == {"CMU-1-Small-Region"} and len(set(tiles.ids)) == len(tiles)
    assert tiles.grid.mpp == pytest.approx(0.499, abs=1e-3)
    image = tiles.load(0)
    assert image.shape == (3, 224, 224) and image.dtype == np.uint8
    # Tissue, not glass: H&E tiles are far from white on average and have colour.
    means = np.array([tiles.load(i).reshape(3, -1).mean(axis=1) for i in range(0, len(tiles), 5)])
    assert (means.mean(axis=1) < 215).all() and (means[:, 1] < means[:, 0]).all()  # eosin/haematoxylin: G lowest


def test_tiles_at_a_coarser_resolution(slide: Path) -> None:
    tiles = load_wsi_tiles(slide, tile_size=112, mpp=1.0)["train"]
    # 1 um/px from a 0.499 um/px slide: each 112 px tile covers 224 level-0 pixels.
    assert tiles.grid.read_size == 224 and tiles.grid.mpp == pytest.approx(0.998, abs=1e-3)
    assert tiles.load(0).shape == (3, 112, 112)


def test_truncated_and_missing_slides_name_the_file(slide: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.svs"
    broken.write_bytes(slide.read_bytes()[:4096])
    with pytest.raises(DataError, match="broken.svs") as error:
        load_dataset(broken)
    assert "truncated" in str(error.value) or "cannot read" in str(error.value)
    with pytest.raises(DataError, match="slide not found"):
        load_dataset(f"wsi:{tmp_path / 'missing.svs'}")
