"""Macenko stain normalisation on real H&E tiles (NCT-CRC-HE-100K samples, TCIA osteosarcoma)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from medfoundry.errors import DataError
from medfoundry.transforms.stain import MacenkoNormalizer, MacenkoTransform, estimate_stains, tissue_fraction


def _tile(path: Path) -> np.ndarray:
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def nct(shared_data: Path) -> Path:
    return shared_data / "nct_crc_he_100k_samples" / "Sample_Data"


@pytest.fixture(scope="module")
def reference(nct: Path) -> np.ndarray:
    return _tile(nct / "NORM-AAAWMSFI.tif")


@pytest.fixture(scope="module")
def lymphocytes(nct: Path) -> np.ndarray:
    return _tile(nct / "LYM-AATTSRNN.tif")


@pytest.fixture(scope="module")
def osteosarcoma(shared_data: Path) -> np.ndarray:
    # Another lab and another stain: its eosin vector is the furthest from NCT-CRC's among these tiles.
    tile = _tile(shared_data / "osteosarcoma_tcia_tiles_60" / "test" / "Viable___Case-48-P5-C20-15162-19423_103.jpg")
    return np.ascontiguousarray(tile[256:768, 256:768])


@pytest.fixture()
def normalizer(reference: np.ndarray) -> MacenkoNormalizer:
    return MacenkoNormalizer().fit(reference)


def _stain_cosines(tile: np.ndarray, normalizer: MacenkoNormalizer) -> np.ndarray:
    """Cosine of the tile's re-estimated H and E vectors with the reference's."""
    ours = estimate_stains(tile).stain_matrix
    theirs = normalizer.reference.stain_matrix
    return (ours * theirs).sum(0) / np.linalg.norm(ours, axis=0) / np.linalg.norm(theirs, axis=0)


def _tissue_mean(tile: np.ndarray) -> np.ndarray:
    """Mean colour of the stained pixels: the glass share differs between tiles and would swamp a whole-tile mean."""
    density = -np.log((tile.reshape(-1, 3).astype(np.float64) + 1.0) / 240.0)
    return tile.reshape(-1, 3)[np.all(density >= 0.15, axis=1)].mean(0)


@pytest.mark.parametrize("source", ["lymphocytes", "osteosarcoma"])
def test_tile_takes_the_reference_stains(
    source: str, request: pytest.FixtureRequest, reference: np.ndarray, normalizer: MacenkoNormalizer
) -> None:
    tile = request.getfixturevalue(source)
    out = normalizer.transform(tile)
    assert out.shape == tile.shape and out.dtype == np.uint8
    before, after = _stain_cosines(tile, normalizer), _stain_cosines(out, normalizer)
    assert (after > 0.95).all(), after
    assert after.min() > before.min()
    target = _tissue_mean(reference)
    assert np.linalg.norm(_tissue_mean(out) - target) < np.linalg.norm(_tissue_mean(tile) - target)
    assert normalizer.passed_through == 0


def test_other_lab_eosin_is_corrected(osteosarcoma: np.ndarray, normalizer: MacenkoNormalizer) -> None:
    # The check above would hold trivially if the source already matched; this one starts below 0.95.
    assert _stain_cosines(osteosarcoma, normalizer)[1] < 0.95
    assert _stain_cosines(normalizer.transform(osteosarcoma), normalizer)[1] > 0.99


def test_reference_is_nearly_unchanged(reference: np.ndarray, normalizer: MacenkoNormalizer) -> None:
    # Not exact: the rebuild keeps only the OD component in the H-E plane, and glass brighter than Io is clipped.
    out = normalizer.transform(reference)
    assert np.abs(out.astype(np.int16) - reference).mean() < 3.0


def test_blank_tile_raises_or_passes_through(reference: np.ndarray, nct: Path) -> None:
    white = np.full((224, 224, 3), 245, dtype=np.uint8)
    background = _tile(nct / "BACK-AAQSHYMA.tif")
    flat_pink = np.broadcast_to(np.array([200, 120, 170], dtype=np.uint8), (64, 64, 3)).copy()
    strict = MacenkoNormalizer(on_failure="raise").fit(reference)
    for tile in (white, background, flat_pink):
        with pytest.raises(DataError, match="tissue|stains"):
            strict.transform(tile)
    assert strict.passed_through == 0
    lenient = MacenkoNormalizer().fit(reference)
    for tile in (white, background, flat_pink):
        assert np.array_equal(lenient.transform(tile), tile)
    assert lenient.passed_through == 3
    assert tissue_fraction(white) == 0.0


def test_fit_on_blank_reference_raises() -> None:
    with pytest.raises(DataError, match="too little tissue"):
        MacenkoNormalizer().fit(np.full((32, 32, 3), 255, dtype=np.uint8))
    with pytest.raises(DataError, match="not fitted"):
        MacenkoNormalizer().transform(np.zeros((8, 8, 3), dtype=np.uint8))
    with pytest.raises(DataError, match="uint8"):
        MacenkoNormalizer().fit(np.zeros((8, 8, 3), dtype=np.float32))


def test_save_load_round_trip(
    tmp_path: Path, normalizer: MacenkoNormalizer, lymphocytes: np.ndarray, osteosarcoma: np.ndarray
) -> None:
    path = tmp_path / "reference.json"
    normalizer.save(path)
    data = json.loads(path.read_text())
    assert data["format"] == "medfoundry.macenko" and set(data["stain_vectors_od"]) == {"haematoxylin", "eosin"}
    loaded = MacenkoNormalizer.load(path, on_failure="raise")
    assert loaded.on_failure == "raise"
    np.testing.assert_array_equal(loaded.reference.stain_matrix, normalizer.reference.stain_matrix)
    for tile in (lymphocytes, osteosarcoma):
        assert np.array_equal(loaded.transform(tile), normalizer.transform(tile))


def test_load_rejects_bad_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="bad.json"):
        MacenkoNormalizer.load(bad)
    bad.write_text(json.dumps({"format": "medfoundry.macenko", "version": 1, "io": 240}))
    with pytest.raises(DataError, match="malformed"):
        MacenkoNormalizer.load(bad)
    with pytest.raises(DataError, match="cannot read"):
        MacenkoNormalizer.load(tmp_path / "missing.json")


def test_torchvision_step_on_tensor_and_pil(normalizer: MacenkoNormalizer, lymphocytes: np.ndarray) -> None:
    expected = normalizer.transform(lymphocytes)
    step = MacenkoTransform(normalizer)

    chw = torch.from_numpy(lymphocytes.copy()).permute(2, 0, 1).contiguous()
    out = v2.Compose([step])(chw)
    assert out.dtype == torch.uint8 and out.shape == chw.shape
    assert np.array_equal(out.permute(1, 2, 0).numpy(), expected)

    batch = step(torch.stack([chw, chw]))
    assert batch.shape == (2, *chw.shape) and torch.equal(batch[1], out)

    image = v2.Compose([step, v2.CenterCrop(200)])(Image.fromarray(lymphocytes))
    assert isinstance(image, Image.Image)
    assert np.array_equal(np.asarray(image), expected[12:212, 12:212])

    # In a joint sample only the image is re-stained; the mask passes through untouched.
    mask = tv_tensors.Mask(torch.ones(224, 224, dtype=torch.uint8))
    wrapped, kept = step(tv_tensors.Image(chw), mask)
    assert isinstance(wrapped, tv_tensors.Image) and torch.equal(wrapped.as_subclass(torch.Tensor), out)
    assert kept is mask

    with pytest.raises(DataError, match="uint8"):
        step(chw.float() / 255)
    with pytest.raises(DataError, match="fitted"):
        MacenkoTransform(MacenkoNormalizer())
