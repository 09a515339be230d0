"""Fundus field-of-view crops on real IDRiD photographs, non-fundus images, and small built discs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import expect_data_error
from PIL import Image

from medfoundry.data.fundus import FundusImageSet, FundusInfo, fundus_crop

IDRID = "idrid_dr_grading"


@pytest.fixture(scope="module")
def idrid_images(shared_data: Path) -> list[Path]:
    return sorted((shared_data / IDRID).glob("*_images/*.jpg"))


def _disc_photo(path: Path, size: tuple[int, int] = (300, 200), radius: int = 90, seed: int = 0) -> Path:
    """A fundus-like JPEG: a textured orange disc on black, centred."""
    rng = np.random.default_rng(seed)
    width, height = size
    yy, xx = np.mgrid[:height, :width]
    inside = (xx - width / 2) ** 2 + (yy - height / 2) ** 2 <= radius**2
    pixels = np.zeros((height, width, 3), np.uint8)
    texture = rng.integers(0, 40, size=(height, width))
    pixels[..., 0] = np.where(inside, 150 + texture, 0)
    pixels[..., 1] = np.where(inside, 60 + texture // 2, 0)
    Image.fromarray(pixels).save(path, quality=95)
    return path


def test_fov_found_and_kept_on_every_idrid_image(idrid_images: list[Path]) -> None:
    assert len(idrid_images) == 153
    for path in idrid_images:
        image, info = fundus_crop(path, 64)
        assert image.shape == (3, 64, 64) and image.dtype == np.uint8, path
        width, height = info.image_size
        left, top, right, bottom = info.bbox
        assert (width, height) == (4288, 2848) and info.decode_scale == 8, path
        assert 0 <= left < right <= width and 0 <= top < bottom <= height, (path, info)
        # IDRiD's aperture is clipped by the top and bottom of the frame and spans about 80% of its width.
        assert top == 0 and bottom == height and 0.75 < (right - left) / width < 0.85, (path, info)
        assert 0.6 < info.fov_fraction < 0.8 and info.quality_ok, (path, info)
        # The crop is the FOV's bounding box: the disc reaches the left and right edges of the middle row,
        # and only the padding bands above and below and the corners are black.
        lit = image.max(axis=0) > 0
        middle = np.nonzero(lit[32])[0]
        assert middle[0] <= 1 and middle[-1] >= 62, path
        assert not lit[0, 0] and not lit[-1, -1], path
        assert 0.65 < lit.mean() < 0.8, path


def test_sizes_agree_across_decode_scales(idrid_images: list[Path]) -> None:
    small, info_small = fundus_crop(idrid_images[0], 64)
    large, info_large = fundus_crop(idrid_images[0], 512)
    assert large.shape == (3, 512, 512) and info_large.decode_scale == 4
    # The same FOV found at 1/8 and 1/4 scale: boxes within two decoded pixels of each other.
    assert np.allclose(info_small.bbox, info_large.bbox, atol=16)
    shrunk = np.asarray(Image.fromarray(large.transpose(1, 2, 0)).resize((64, 64), Image.Resampling.BILINEAR))
    assert np.abs(shrunk.astype(int) - small.transpose(1, 2, 0)).mean() < 6


def test_local_contrast_centres_the_fov_on_grey(idrid_images: list[Path]) -> None:
    plain, _ = fundus_crop(idrid_images[0], 128)
    contrast, info = fundus_crop(idrid_images[0], 128, local_contrast=True)
    fov = plain.max(axis=0) > 0
    assert info.quality_ok
    # Ben Graham's filter removes the slow background: the FOV averages near mid-grey, outside stays black.
    assert abs(contrast[:, fov].mean() - 128) < 20
    assert contrast[:, ~fov].max() == 0
    assert not np.array_equal(plain, contrast)


def test_chest_xray_is_not_a_fundus(shared_data: Path) -> None:
    xray = next((shared_data / "kermany_cxr_224_trainsubset" / "NORMAL").glob("*.jpeg"))
    expect_data_error(lambda: fundus_crop(xray, 64), xray, "no fundus field of view found")


@pytest.mark.parametrize("value", [0, 255])
def test_blank_images_are_not_a_fundus(tmp_path: Path, value: int) -> None:
    path = tmp_path / f"blank{value}.png"
    Image.fromarray(np.full((120, 160, 3), value, np.uint8)).save(path)
    expect_data_error(lambda: fundus_crop(path, 32), path, "no fundus field of view found")


def test_square_is_not_a_disc(tmp_path: Path) -> None:
    pixels = np.zeros((200, 200, 3), np.uint8)
    pixels[50:150, 50:150] = 200
    path = tmp_path / "square.png"
    Image.fromarray(pixels).save(path)
    expect_data_error(lambda: fundus_crop(path, 32), path, "not a disc")


def test_built_disc_box_fraction_and_quality(tmp_path: Path) -> None:
    path = _disc_photo(tmp_path / "disc.jpg")
    image, info = fundus_crop(path, 128)
    assert image.shape == (3, 128, 128)
    assert info.image_size == (300, 200) and info.decode_scale == 1
    assert np.allclose(info.bbox, (60, 10, 240, 190), atol=2)
    assert info.fov_fraction == pytest.approx(np.pi * 90**2 / (300 * 200), rel=0.03)
    assert info.quality_ok
    assert not fundus_crop(path, 128, min_fov_fraction=0.5)[1].quality_ok
    # A PIL image works too, with the same result.
    same, same_info = fundus_crop(Image.open(path), 128)
    assert np.array_equal(same, image) and same_info == info
    # A smaller target lets libjpeg decode at half scale (both sides still >= 90); the box stays in full-size pixels.
    _, half = fundus_crop(path, 90)
    assert half.decode_scale == 2 and np.allclose(half.bbox, info.bbox, atol=3)


def test_small_disc_is_poor_quality(tmp_path: Path) -> None:
    _, info = fundus_crop(_disc_photo(tmp_path / "small.jpg", radius=40), 32)
    assert isinstance(info, FundusInfo) and not info.quality_ok and info.fov_fraction < 0.1


def test_missing_and_broken_files(tmp_path: Path) -> None:
    expect_data_error(lambda: fundus_crop(tmp_path / "gone.jpg", 32), tmp_path / "gone.jpg", "not found")
    broken = tmp_path / "broken.jpg"
    broken.write_text("not a JPEG")
    expect_data_error(lambda: fundus_crop(broken, 32), broken, "cannot read image")


def test_fundus_image_set_loads_and_fingerprints(tmp_path: Path) -> None:
    paths = [_disc_photo(tmp_path / f"eye{i}.jpg", seed=i) for i in range(2)]
    ids = ["a", "b"]
    images = FundusImageSet("eyes", tmp_path, paths, ids, ids, np.array([0, 1]), ["x", "y"], image_size=48)
    assert len(images) == 2 and images.load(1).shape == (3, 48, 48)
    assert images.crop(0)[1].quality_ok
    contrast = FundusImageSet("eyes", tmp_path, paths, ids, ids, np.array([0, 1]), image_size=48, local_contrast=True)
    assert contrast.fingerprint() != images.fingerprint()
    assert contrast.content_fingerprint() != images.content_fingerprint()
    assert images.subset([1]).load(0).shape == (3, 48, 48)
    # Copied elsewhere: the quick fingerprint (paths, times) changes, the content fingerprint does not.
    (tmp_path / "copy").mkdir()
    copies = [tmp_path / "copy" / path.name for path in paths]
    for path, copy in zip(paths, copies, strict=True):
        copy.write_bytes(path.read_bytes())
    moved = FundusImageSet("eyes", tmp_path, copies, ids, ids, np.array([0, 1]), ["x", "y"], image_size=48)
    assert moved.fingerprint() != images.fingerprint()
    assert moved.content_fingerprint() == images.content_fingerprint()
    assert moved.subset([1]).content_fingerprint() == images.subset([1]).content_fingerprint()
