"""The IDRiD grading reader on the real shared copy and on small built folders with the official CSV quirks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import expect_data_error
from PIL import Image

from medfoundry.data.fundus import FundusImageSet
from medfoundry.data.idrid import CLASS_NAMES, load_idrid, read_idrid_labels
from medfoundry.data.registry import load_dataset, resolve_reader

IDRID = "idrid_dr_grading"
# The official CSV header, with its trailing space and (in the training CSV) empty trailing columns.
HEADER = "Image name,Retinopathy grade,Risk of macular edema "


@pytest.fixture(scope="module")
def idrid(shared_data: Path) -> Path:
    return shared_data / IDRID


def _disc_jpeg(path: Path) -> None:
    yy, xx = np.mgrid[:120, :160]
    inside = (xx - 80) ** 2 + (yy - 60) ** 2 <= 55**2
    pixels = np.zeros((120, 160, 3), np.uint8)
    pixels[inside] = (170, 80, 30)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def _build(root: Path, train: dict[str, str], test: dict[str, str], images: dict[str, list[str]]) -> Path:
    """An IDRiD-like folder: CRLF CSVs (train with empty trailing columns) and small disc JPEGs."""
    (root / "labels").mkdir(parents=True)
    train_rows = [HEADER + ",,,"] + [f"{name},{grades},,," for name, grades in train.items()]
    test_rows = [HEADER] + [f"{name},{grades}" for name, grades in test.items()]
    (root / "labels" / "train_labels.csv").write_bytes(("\r\n".join(train_rows) + "\r\n\r\n").encode())
    (root / "labels" / "test_labels.csv").write_bytes(("\r\n".join(test_rows) + "\r\n").encode())
    for split, names in images.items():
        for name in names:
            _disc_jpeg(root / f"{split}_images" / f"{name}.jpg")
    return root


def test_real_counts_and_grades(idrid: Path) -> None:
    splits = load_idrid(idrid, image_size=64)
    assert list(splits) == ["train", "test"]
    train, test = splits["train"], splits["test"]
    assert isinstance(test, FundusImageSet) and len(train) == 50 and len(test) == 103
    assert np.bincount(test.labels).tolist() == [34, 5, 32, 19, 13]
    assert np.bincount(train.labels).tolist() == [10, 10, 10, 10, 10]
    assert test.class_names == ["no DR", "mild NPDR", "moderate NPDR", "severe NPDR", "proliferative DR"]
    # Both splits start at IDRiD_001; the split prefix keeps ids and patient ids unique across them.
    assert train.ids[0] == "train/IDRiD_001" and test.ids[0] == "test/IDRiD_001"
    assert len(set(train.ids) | set(test.ids)) == 153
    assert len(set(train.patient_ids) | set(test.patient_ids)) == 153
    image = test.load(0)
    assert image.shape == (3, 64, 64) and image.dtype == np.uint8


def test_real_first_test_row_matches_csv(idrid: Path) -> None:
    labels = read_idrid_labels(idrid / "labels" / "test_labels.csv")
    assert len(labels) == 103 and labels["IDRiD_001"] == (4, 0)
    assert len(read_idrid_labels(idrid / "labels" / "train_labels.csv")) == 413


def test_real_referable_and_dme_targets(idrid: Path) -> None:
    referable = load_idrid(idrid, target="referable_dr")
    # Referable = DR grade 2 or more: test 32 + 19 + 13 = 64, train 30 of 50.
    assert np.bincount(referable["test"].labels).tolist() == [39, 64]
    assert np.bincount(referable["train"].labels).tolist() == [20, 30]
    assert referable["test"].class_names == ["non-referable", "referable"]
    dme = load_idrid(idrid, target="dme")
    assert np.bincount(dme["test"].labels).tolist() == [45, 10, 48]
    assert np.bincount(dme["train"].labels).tolist() == [24, 5, 21]


def test_registry_prefix_only(idrid: Path) -> None:
    splits = load_dataset(f"idrid:{idrid}", target="referable_dr", image_size=32)
    assert len(splits["test"]) == 103 and splits["test"].load(0).shape == (3, 32, 32)
    # An unprefixed folder stays the image-folder reader's.
    assert resolve_reader(idrid)[0].prefix == "folder"


def test_built_folder_with_csv_quirks(tmp_path: Path) -> None:
    root = _build(
        tmp_path / "idrid",
        train={"IDRiD_001": "3,2", "IDRiD_002": "0,0", "IDRiD_003": "1,1"},
        test={"IDRiD_001": "4,1"},
        images={"train": ["IDRiD_001", "IDRiD_002"], "test": ["IDRiD_001"]},
    )
    splits = load_idrid(root, image_size=32)
    # A CSV row without an image (IDRiD_003) is fine: the folder may hold a subset of the official images.
    assert splits["train"].ids == ["train/IDRiD_001", "train/IDRiD_002"]
    assert splits["train"].labels.tolist() == [3, 0] and splits["test"].labels.tolist() == [4]
    assert load_idrid(root, target="dme")["train"].labels.tolist() == [2, 0]
    assert load_idrid(root, target="referable_dr")["test"].labels.tolist() == [1]
    assert splits["test"].load(0).shape == (3, 32, 32)
    before = splits["train"].fingerprint()
    assert load_idrid(root, image_size=32)["train"].fingerprint() == before
    assert load_idrid(root, image_size=32, local_contrast=True)["train"].fingerprint() != before
    assert load_idrid(root, image_size=32, target="dme")["train"].fingerprint() != before


def test_official_release_layout(tmp_path: Path) -> None:
    root = tmp_path / "B. Disease Grading"
    for split, letter, name in (("Training", "a", "IDRiD_001"), ("Testing", "b", "IDRiD_001")):
        _disc_jpeg(root / "1. Original Images" / f"{letter}. {split} Set" / f"{name}.jpg")
        csv_path = root / "2. Groundtruths" / f"{letter}. IDRiD_Disease Grading_{split} Labels.csv"
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        csv_path.write_bytes(f"{HEADER}\r\n{name},2,0\r\n".encode())
    splits = load_idrid(root, image_size=16)
    assert [len(s) for s in splits.values()] == [1, 1] and splits["train"].labels.tolist() == [2]


def test_image_without_label_row(tmp_path: Path) -> None:
    root = _build(tmp_path / "idrid", {"IDRiD_001": "1,0"}, {"IDRiD_001": "0,0"}, {"train": ["IDRiD_001"]})
    _disc_jpeg(root / "test_images" / "IDRiD_001.jpg")
    _disc_jpeg(root / "test_images" / "IDRiD_077.jpg")
    expect_data_error(lambda: load_idrid(root), root / "test_images" / "IDRiD_077.jpg", "no row")


def test_image_removed_after_loading_names_it(tmp_path: Path) -> None:
    root = _build(tmp_path / "idrid", {"IDRiD_001": "1,0"}, {"IDRiD_001": "0,0"}, {"train": ["IDRiD_001"]})
    _disc_jpeg(root / "test_images" / "IDRiD_001.jpg")
    test = load_idrid(root)["test"]
    gone = root / "test_images" / "IDRiD_001.jpg"
    gone.unlink()
    expect_data_error(lambda: test.load(0), gone, "not found")
    expect_data_error(test.fingerprint, gone, "missing")


def test_bad_grade_and_missing_column(tmp_path: Path) -> None:
    root = _build(tmp_path / "idrid", {"IDRiD_001": "7,0"}, {"IDRiD_001": "0,0"}, {"train": ["IDRiD_001"]})
    _disc_jpeg(root / "test_images" / "IDRiD_001.jpg")
    csv_path = root / "labels" / "train_labels.csv"
    expect_data_error(lambda: load_idrid(root), csv_path, "row 2", "0-4", "'7'")
    csv_path.write_bytes(b"Image name,Retinopathy grade\r\nIDRiD_001,1\r\n")
    expect_data_error(lambda: load_idrid(root), csv_path, "missing column 'Risk of macular edema'")


def test_missing_split_folder_and_bad_target(tmp_path: Path) -> None:
    root = _build(tmp_path / "idrid", {"IDRiD_001": "1,0"}, {"IDRiD_001": "0,0"}, {"train": ["IDRiD_001"]})
    expect_data_error(lambda: load_idrid(root), root, "no IDRiD test split", "test_images")
    expect_data_error(lambda: load_idrid(root, target="glaucoma"), root, "unknown IDRiD target 'glaucoma'")  # type: ignore[arg-type]
    expect_data_error(lambda: load_idrid(tmp_path / "none"), tmp_path / "none", "not found")
    assert set(CLASS_NAMES) == {"dr_grade", "referable_dr", "dme", "multilabel"}
