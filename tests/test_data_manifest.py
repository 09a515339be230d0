"""CSV manifests and image folders over real Kermany chest X-rays and osteosarcoma tiles."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medfoundry.data.manifest import FileImageSet, load_image_folder, load_manifest
from medfoundry.errors import DataError

KERMANY = "kermany_cxr_224_trainsubset"


@pytest.fixture(scope="module")
def kermany(shared_data: Path) -> dict[str, list[Path]]:
    root = shared_data / KERMANY
    return {name: sorted((root / name).glob("*.jpeg"))[:4] for name in ("NORMAL", "PNEUMONIA")}


def _patient(path: Path) -> str:
    # Kermany names: IM-0115-0001.jpeg (NORMAL) or person1000_bacteria_2931.jpeg (PNEUMONIA).
    return path.stem.split("_")[0] if path.stem.startswith("person") else "-".join(path.stem.split("-")[:2])


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _kermany_rows(kermany: dict[str, list[Path]]) -> list[list[str]]:
    rows = []
    for label, paths in kermany.items():
        for i, path in enumerate(paths):
            rows.append([str(path), label, _patient(path), "val" if i == 0 else "train"])
    return rows


def _expect_error(call: object, path: Path, *fragments: str) -> None:
    with pytest.raises(DataError) as info:
        call()  # type: ignore[operator]
    message = str(info.value)
    assert str(path) in message and "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message


def test_manifest_with_patients_and_splits(tmp_path: Path, kermany: dict[str, list[Path]]) -> None:
    header = ["path", "label", "patient_id", "split"]
    csv_path = _write_csv(tmp_path / "cxr.csv", header, _kermany_rows(kermany))
    splits = load_manifest(csv_path)
    assert list(splits) == ["train", "val"]
    train = splits["train"]
    assert isinstance(train, FileImageSet)
    assert len(train) == 6 and len(splits["val"]) == 2
    assert train.class_names == ["NORMAL", "PNEUMONIA"]
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert train.ids[0] == kermany["NORMAL"][1].stem
    assert train.patient_ids[-1] == _patient(kermany["PNEUMONIA"][3])
    image = train.load(0)
    assert image.shape == (3, 224, 224) and image.dtype == np.uint8
    np.testing.assert_array_equal(image.transpose(1, 2, 0), np.asarray(Image.open(kermany["NORMAL"][1])))


def test_relative_paths_defaults_and_resize(tmp_path: Path, kermany: dict[str, list[Path]]) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for path in kermany["NORMAL"][:2]:
        (images / path.name).symlink_to(path)
    rows = [[f"images/{p.name}", "3"] for p in kermany["NORMAL"][:2]]
    csv_path = _write_csv(tmp_path / "rel.csv", ["path", "label"], rows)
    splits = load_manifest(csv_path, image_size=(32, 48))
    assert list(splits) == ["train"]
    train = splits["train"]
    assert train.labels.tolist() == [3, 3] and train.class_names is None
    assert train.patient_ids == train.ids == [p.stem for p in kermany["NORMAL"][:2]]
    assert train.load(1).shape == (3, 32, 48)
    # An explicit root replaces the CSV's folder for relative paths.
    moved = _write_csv(tmp_path / "elsewhere.csv", ["path", "label"], [[p.name, "0"] for p in kermany["NORMAL"][:2]])
    assert len(load_manifest(moved, root=images)["train"]) == 2


def test_grayscale_and_16_bit_images(tmp_path: Path, kermany: dict[str, list[Path]]) -> None:
    gray = np.asarray(Image.open(kermany["NORMAL"][0]).convert("L"))
    Image.fromarray(gray).save(tmp_path / "gray.png")
    Image.fromarray(gray.astype(np.uint16) * 200).save(tmp_path / "deep.png")
    csv_path = _write_csv(tmp_path / "g.csv", ["path", "label"], [["gray.png", "a"], ["deep.png", "b"]])
    train = load_manifest(csv_path)["train"]
    loaded = train.load(0)
    assert loaded.shape == (1, 224, 224)
    np.testing.assert_array_equal(loaded[0], gray)
    deep = train.load(1)
    assert deep.shape == (1, 224, 224) and deep.dtype == np.uint8
    assert deep.min() == 0 and deep.max() == 255


def test_fingerprint_tracks_labels_and_files(tmp_path: Path, kermany: dict[str, list[Path]]) -> None:
    local = tmp_path / "x.jpeg"
    local.write_bytes(kermany["NORMAL"][0].read_bytes())
    first = _write_csv(tmp_path / "a.csv", ["path", "label"], [["x.jpeg", "0"]])
    second = _write_csv(tmp_path / "b.csv", ["path", "label"], [["x.jpeg", "1"]])
    before = load_manifest(first)["train"].fingerprint()
    assert load_manifest(first)["train"].fingerprint() == before
    assert load_manifest(second)["train"].fingerprint() != before
    stat = local.stat()
    os.utime(local, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    assert load_manifest(first)["train"].fingerprint() != before


def test_osteosarcoma_labels_csv(shared_data: Path) -> None:
    csv_path = shared_data / "osteosarcoma_tcia_tiles_60" / "labels.csv"
    train = load_manifest(csv_path, path_column="file", image_size=32)["train"]
    assert len(train) == 60
    assert train.class_names == ["Non-Tumor", "Non-Viable-Tumor", "Viable"]
    assert np.bincount(train.labels).tolist() == [20, 20, 20]
    with csv_path.open() as handle:
        official = [int(row["label_index"]) for row in csv.DictReader(handle)]
    assert train.labels.tolist() == official
    assert train.load(0).shape == (3, 32, 32)


def test_image_folder_by_class(tmp_path: Path, kermany: dict[str, list[Path]]) -> None:
    for label, paths in kermany.items():
        (tmp_path / label).mkdir()
        for path in paths[:3]:
            (tmp_path / label / path.name).symlink_to(path)
    (tmp_path / "NORMAL" / ".DS_Store").write_text("junk")
    (tmp_path / "notes.txt").write_text("ignored")
    splits = load_image_folder(tmp_path)
    train = splits["train"]
    assert list(splits) == ["train"] and len(train) == 6
    assert train.class_names == ["NORMAL", "PNEUMONIA"]
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert train.ids[0] == f"NORMAL/{kermany['NORMAL'][0].stem}" and train.patient_ids == train.ids
    assert train.load(5).shape == (3, 224, 224)


def test_image_folder_with_splits(tmp_path: Path, kermany: dict[str, list[Path]]) -> None:
    layout = {"train": slice(0, 3), "test": slice(3, 4)}
    for split, part in layout.items():
        for label, paths in kermany.items():
            folder = tmp_path / split / label
            folder.mkdir(parents=True)
            for path in paths[part]:
                (folder / path.name).symlink_to(path)
    (tmp_path / "test" / "PNEUMONIA" / kermany["PNEUMONIA"][3].name).unlink()
    splits = load_image_folder(tmp_path)
    assert list(splits) == ["train", "test"]
    assert len(splits["train"]) == 6 and splits["test"].labels.tolist() == [0]
    assert splits["test"].class_names == ["NORMAL", "PNEUMONIA"]


def test_whole_kermany_folder(shared_data: Path) -> None:
    train = load_image_folder(shared_data / KERMANY)["train"]
    assert len(train) == 600 and np.bincount(train.labels).tolist() == [300, 300]


def test_missing_column_lists_found(tmp_path: Path) -> None:
    csv_path = _write_csv(tmp_path / "cols.csv", ["file", "diagnosis"], [["a.png", "x"]])
    _expect_error(lambda: load_manifest(csv_path), csv_path, "['path', 'label']", "['file', 'diagnosis']")


def test_missing_image_names_path_and_row(tmp_path: Path, kermany: dict[str, list[Path]]) -> None:
    rows = [[str(kermany["NORMAL"][0]), "0"], ["gone.png", "1"]]
    csv_path = _write_csv(tmp_path / "gone.csv", ["path", "label"], rows)
    _expect_error(lambda: load_manifest(csv_path), csv_path, "row 3", str(tmp_path / "gone.png"), "does not exist")


def test_missing_label_names_row(tmp_path: Path, kermany: dict[str, list[Path]]) -> None:
    rows = [[str(kermany["NORMAL"][0]), "NORMAL"], [str(kermany["NORMAL"][1]), " "]]
    csv_path = _write_csv(tmp_path / "nolabel.csv", ["path", "label"], rows)
    _expect_error(lambda: load_manifest(csv_path), csv_path, "row 3", "missing label")


def test_unreadable_image_names_file(tmp_path: Path) -> None:
    fake = tmp_path / "fake.jpg"
    fake.write_text("this is not a JPEG")
    csv_path = _write_csv(tmp_path / "fake.csv", ["path", "label"], [["fake.jpg", "0"]])
    train = load_manifest(csv_path)["train"]
    _expect_error(lambda: train.load(0), fake, "cannot read image")


def test_missing_csv_and_empty_folders(tmp_path: Path) -> None:
    _expect_error(lambda: load_manifest(tmp_path / "none.csv"), tmp_path / "none.csv", "not found")
    (tmp_path / "cls").mkdir()
    _expect_error(lambda: load_image_folder(tmp_path), tmp_path, "no images")
    _expect_error(lambda: load_image_folder(tmp_path / "nothing"), tmp_path / "nothing", "not found")


def test_mixed_split_and_class_folders(tmp_path: Path) -> None:
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "b").mkdir()
    _expect_error(lambda: load_image_folder(tmp_path), tmp_path, "mixes split folders")


def test_channels_option_converts_rgb_xrays_to_grey(kermany: dict[str, list[Path]]) -> None:
    root = kermany["NORMAL"][0].parents[1]
    rgb = load_image_folder(root)["train"]
    grey = load_image_folder(root, channels=1, image_size=64)["train"]
    assert rgb.load(0).shape == (3, 224, 224) and grey.load(0).shape == (1, 64, 64)
    assert grey.fingerprint() != load_image_folder(root, image_size=64)["train"].fingerprint()
    with pytest.raises(DataError, match="channels must be 1"):
        load_image_folder(root, channels=2)
