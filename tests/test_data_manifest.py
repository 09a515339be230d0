"""CSV manifests and image folders over real Kermany chest X-rays and osteosarcoma tiles."""

from __future__ import annotations

import csv
import os
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from helpers import expect_data_error
from PIL import Image

from medfoundry.data import manifest
from medfoundry.data.manifest import CropFileImageSet, FileImageSet, load_image_folder, load_manifest
from medfoundry.data.splits import patient_split
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
    expect_data_error(lambda: load_manifest(csv_path), csv_path, "['path', 'label']", "['file', 'diagnosis']")


def test_missing_image_names_path_and_row(tmp_path: Path, kermany: dict[str, list[Path]]) -> None:
    rows = [[str(kermany["NORMAL"][0]), "0"], ["gone.png", "1"]]
    csv_path = _write_csv(tmp_path / "gone.csv", ["path", "label"], rows)
    expect_data_error(lambda: load_manifest(csv_path), csv_path, "row 3", str(tmp_path / "gone.png"), "does not exist")


def test_missing_label_names_row(tmp_path: Path, kermany: dict[str, list[Path]]) -> None:
    rows = [[str(kermany["NORMAL"][0]), "NORMAL"], [str(kermany["NORMAL"][1]), " "]]
    csv_path = _write_csv(tmp_path / "nolabel.csv", ["path", "label"], rows)
    expect_data_error(lambda: load_manifest(csv_path), csv_path, "row 3", "missing label")


def test_unreadable_image_names_file(tmp_path: Path) -> None:
    fake = tmp_path / "fake.jpg"
    fake.write_text("this is not a JPEG")
    csv_path = _write_csv(tmp_path / "fake.csv", ["path", "label"], [["fake.jpg", "0"]])
    train = load_manifest(csv_path)["train"]
    expect_data_error(lambda: train.load(0), fake, "cannot read image")


def test_missing_csv_and_empty_folders(tmp_path: Path) -> None:
    expect_data_error(lambda: load_manifest(tmp_path / "none.csv"), tmp_path / "none.csv", "not found")
    (tmp_path / "cls").mkdir()
    expect_data_error(lambda: load_image_folder(tmp_path), tmp_path, "no images")
    expect_data_error(lambda: load_image_folder(tmp_path / "nothing"), tmp_path / "nothing", "not found")


def test_mixed_split_and_class_folders(tmp_path: Path) -> None:
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "b").mkdir()
    expect_data_error(lambda: load_image_folder(tmp_path), tmp_path, "mixes split folders")


def test_channels_option_converts_rgb_xrays_to_grey(kermany: dict[str, list[Path]]) -> None:
    root = kermany["NORMAL"][0].parents[1]
    rgb = load_image_folder(root)["train"]
    grey = load_image_folder(root, channels=1, image_size=64)["train"]
    assert rgb.load(0).shape == (3, 224, 224) and grey.load(0).shape == (1, 64, 64)
    assert grey.fingerprint() != load_image_folder(root, image_size=64)["train"].fingerprint()
    with pytest.raises(DataError, match="channels must be 1"):
        load_image_folder(root, channels=2)


OSTEO_OPTIONS = dict(path_column="file", label_column="label_index", patient_column="source_image_id")
# One Kermany patient per id: personN for pneumonia, (NORMAL2-)IM-NNNN for normal (IM-0115-0001, IM-0119-0001-0002).
KERMANY_PATIENT = r"^(person\d+|(?:NORMAL2-)?IM-\d+)[-_]"


def test_osteosarcoma_tiles_as_grid_crops(shared_data: Path) -> None:
    csv_path = shared_data / "osteosarcoma_tcia_tiles_60" / "labels.csv"
    train = load_manifest(csv_path, **OSTEO_OPTIONS, class_name_column="label", crop_size=224)["train"]
    # 1024 px tiles: 4 x 4 crops at stride 224, the last 128 px dropped.
    assert isinstance(train, CropFileImageSet) and len(train) == 960
    assert train.class_names == ["Non-Tumor", "Non-Viable-Tumor", "Viable"]
    assert np.bincount(train.labels).tolist() == [320, 320, 320]
    with csv_path.open() as handle:
        rows = list(csv.DictReader(handle))
    first = Path(rows[0]["file"]).stem
    assert train.ids[:5] == [f"{first}@0_0", f"{first}@224_0", f"{first}@448_0", f"{first}@672_0", f"{first}@0_224"]
    assert train.ids[15] == f"{first}@672_672" and len(set(train.ids)) == 960
    # All crops of a tile share its group id and label, and no two tiles share one.
    for tile, row in enumerate(rows):
        block = slice(16 * tile, 16 * (tile + 1))
        assert set(train.patient_ids[block]) == {row["source_image_id"]}
        assert set(train.labels[block].tolist()) == {int(row["label_index"])}
    assert len(set(train.patient_ids)) == 60
    crop = train.load(5)  # tile 0, corner (224, 224)
    assert crop.shape == (3, 224, 224) and crop.dtype == np.uint8
    tile = np.asarray(Image.open(csv_path.parent / rows[0]["file"]))
    np.testing.assert_array_equal(crop.transpose(1, 2, 0), tile[224:448, 224:448])


def test_crops_never_straddle_a_patient_split(shared_data: Path) -> None:
    csv_path = shared_data / "osteosarcoma_tcia_tiles_60" / "labels.csv"
    train = load_manifest(csv_path, **OSTEO_OPTIONS, crop_size=224, image_size=32)["train"]
    assert train.load(17).shape == (3, 32, 32)
    parts = patient_split(train.patient_ids, train.labels, fractions=(0.8, 0.2), seed=0)
    tiles = [{train.ids[i].split("@")[0] for i in part} for part in parts.values()]
    assert not tiles[0] & tiles[1] and len(tiles[0] | tiles[1]) == 60


def test_crop_stride_grid_and_errors(tmp_path: Path) -> None:
    Image.fromarray(np.arange(70 * 100, dtype=np.uint32).reshape(70, 100).astype(np.uint8)).save(tmp_path / "a.png")
    csv_path = _write_csv(tmp_path / "c.csv", ["path", "label", "split"], [["a.png", "1", "test"]])
    test = load_manifest(csv_path, crop_size=32, crop_stride=16)["test"]
    # x in 0, 16, 32, 48, 64 and y in 0, 16, 32.
    assert len(test) == 15 and test.ids[-1] == "a@64_32" and test.patient_ids == ["a"] * 15
    pixels = np.asarray(Image.open(tmp_path / "a.png"))
    np.testing.assert_array_equal(test.load(6)[0], pixels[16:48, 16:48])
    plain = load_manifest(csv_path)["test"]
    assert plain.fingerprint() != test.fingerprint()
    assert load_manifest(csv_path, crop_size=32)["test"].fingerprint() != test.fingerprint()
    expect_data_error(lambda: load_manifest(csv_path, crop_size=80), tmp_path / "a.png", "100x70", "crop_size 80")
    expect_data_error(lambda: load_manifest(csv_path, crop_stride=8), csv_path, "crop_stride needs crop_size")
    expect_data_error(lambda: load_manifest(csv_path, crop_size=0), csv_path, "must be positive")


def test_crop_cache_decodes_each_file_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("a", "b"):
        Image.fromarray(np.full((64, 64), ord(name), np.uint8)).save(tmp_path / f"{name}.png")
    csv_path = _write_csv(tmp_path / "c.csv", ["path", "label"], [["a.png", "0"], ["b.png", "1"]])
    train = load_manifest(csv_path, crop_size=32)["train"]
    decoded: list[Path] = []
    real = manifest.decode_image
    monkeypatch.setattr(manifest, "decode_image", lambda path, channels=None: decoded.append(path) or real(path))
    assert [int(train.load(i)[0, 0, 0]) for i in range(8)] == [ord("a")] * 4 + [ord("b")] * 4
    assert decoded == [tmp_path / "a.png", tmp_path / "b.png"]
    assert pickle.loads(pickle.dumps(train))._last is None


def test_class_name_column_checks(tmp_path: Path, kermany: dict[str, list[Path]]) -> None:
    paths = [str(p) for p in kermany["NORMAL"][:3]]
    rows = [[paths[0], "0", "normal"], [paths[1], "2", "pneumonia"], [paths[2], "0", "normal"]]
    csv_path = _write_csv(tmp_path / "n.csv", ["path", "label", "name"], rows)
    # Index 1 has no rows: it keeps its number as its name.
    assert load_manifest(csv_path, class_name_column="name")["train"].class_names == ["normal", "1", "pneumonia"]
    rows[2][2] = "healthy"
    clash = _write_csv(tmp_path / "clash.csv", ["path", "label", "name"], rows)
    expect_data_error(lambda: load_manifest(clash, class_name_column="name"), clash, "row 4", "'healthy'", "'normal'")
    text = _write_csv(tmp_path / "t.csv", ["path", "label", "name"], [[paths[0], "a", "x"]])
    expect_data_error(lambda: load_manifest(text, class_name_column="name"), text, "integer label column")
    expect_data_error(lambda: load_manifest(csv_path, class_name_column="nope"), csv_path, "['nope']")


def test_named_patient_column_must_exist(tmp_path: Path, kermany: dict[str, list[Path]]) -> None:
    csv_path = _write_csv(tmp_path / "p.csv", ["path", "label"], [[str(kermany["NORMAL"][0]), "0"]])
    expect_data_error(lambda: load_manifest(csv_path, patient_column="subject"), csv_path, "['subject']")


def test_kermany_patients_from_file_names(shared_data: Path) -> None:
    train = load_image_folder(shared_data / KERMANY, patient_regex=KERMANY_PATIENT)["train"]
    patients = dict(zip(train.ids, train.patient_ids, strict=True))
    assert patients["NORMAL/IM-0115-0001"] == "IM-0115"
    assert patients["NORMAL/NORMAL2-IM-0395-0001-0001"] == "NORMAL2-IM-0395"
    assert patients["PNEUMONIA/person1000_bacteria_2931"] == "person1000"
    assert patients["PNEUMONIA/person447_virus_921_1"] == "person447"
    # Every name matches; 600 images of 598 patients (person23 and person441 have two images each).
    assert all(patient != sample for sample, patient in patients.items())
    counts = Counter(train.patient_ids)
    assert len(counts) == 598 and sorted(p for p, n in counts.items() if n > 1) == ["person23", "person441"]
    assert len({p for p, label in zip(train.patient_ids, train.labels, strict=True) if label == 0}) == 300


def test_patient_regex_groups_and_fallback(tmp_path: Path, kermany: dict[str, list[Path]]) -> None:
    (tmp_path / "cls").mkdir()
    for name in ("s01_a", "s01_b", "s02_a", "other"):
        (tmp_path / "cls" / f"{name}.jpeg").symlink_to(kermany["NORMAL"][0])
    named = load_image_folder(tmp_path, patient_regex=r"^(?P<site>s)(?P<patient>\d+)_")["train"]
    assert named.patient_ids == ["cls/other", "01", "01", "02"]
    # With alternatives, the first group that took part in the match is the patient id.
    either = load_image_folder(tmp_path, patient_regex=r"^(s\d+)_|^(oth)")["train"]
    assert either.patient_ids == ["oth", "s01", "s01", "s02"]
    expect_data_error(lambda: load_image_folder(tmp_path, patient_regex=r"^s\d+"), tmp_path, "needs a group")
    expect_data_error(lambda: load_image_folder(tmp_path, patient_regex=r"(s"), tmp_path, "not a valid regular")


# --- issue 15: missing-value labels, ids that tell files apart, patients out of a tile id --------------------------


def _tiny_pngs(folder: Path, names: list[str]) -> None:
    for index, name in enumerate(names):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((4, 4), 20 * index + 5, dtype=np.uint8)).save(folder / name)


@pytest.mark.parametrize("cell", ["nan", "NaN", "NA", "N/A", "null", "None", ""])
def test_missing_value_label_names_file_column_and_row(tmp_path: Path, cell: str) -> None:
    # Before: "nan" became a third class sorted between "benign" and "malignant", silently.
    _tiny_pngs(tmp_path, ["a.png", "b.png", "c.png"])
    rows = [["a.png", "benign"], ["b.png", cell], ["c.png", "malignant"]]
    csv_path = _write_csv(tmp_path / "labels.csv", ["path", "diagnosis"], rows)
    expect_data_error(
        lambda: load_manifest(csv_path, label_column="diagnosis"), csv_path, "row 3", "missing label", "'diagnosis'"
    )
    assert load_manifest(csv_path, label_column=None)["train"].labels is None  # read unlabelled on request


def test_same_stem_with_two_suffixes_gets_two_ids(tmp_path: Path) -> None:
    # x.png and x.jpg used to both become sample "x": two images, one id.
    _tiny_pngs(tmp_path, ["x.png", "x.jpg", "y.png"])
    csv_path = _write_csv(tmp_path / "m.csv", ["path", "label"], [["x.png", "0"], ["x.jpg", "1"], ["y.png", "0"]])
    assert load_manifest(csv_path)["train"].ids == ["x.png", "x.jpg", "y.png"]
    csv_path = _write_csv(tmp_path / "n.csv", ["path", "label"], [["x.png", "0"], ["y.png", "1"]])
    assert load_manifest(csv_path)["train"].ids == ["x", "y"]  # stems when they are unique


def test_patient_regex_and_patient_splits(tmp_path: Path) -> None:
    names = [f"t{i}.png" for i in range(6)]
    _tiny_pngs(tmp_path, names)
    tiles = ["Case-3-A1-0-0", "Case-3-A2-5-5", "Case-48-P5-C1-1-1", "P9-B1-2-2", "Case-4-C1-3-3", "odd"]
    rows = [[name, str(i % 2), tile] for i, (name, tile) in enumerate(zip(names, tiles, strict=True))]
    csv_path = _write_csv(tmp_path / "m.csv", ["path", "label", "tile"], rows)
    options = dict(patient_column="tile", patient_regex=r"^(Case-\d+|P\d+)-")
    assert load_manifest(csv_path, **options)["train"].patient_ids == [
        "Case-3",
        "Case-3",
        "Case-48",
        "P9",
        "Case-4",
        "odd",  # no match: the value is kept whole
    ]
    splits = load_manifest(csv_path, **options, patient_splits={"test": ["Case-4"], "val": ["P9", "odd"]})
    assert {name: images.ids for name, images in splits.items()} == {
        "train": ["t0", "t1", "t2"],
        "val": ["t3", "t5"],
        "test": ["t4"],
    }
    expect_data_error(
        lambda: load_manifest(csv_path, **options, patient_splits={"test": ["Case-5"]}), csv_path, "['Case-5']"
    )
    twice = {"test": ["P9"], "val": ["P9"]}
    expect_data_error(lambda: load_manifest(csv_path, **options, patient_splits=twice), csv_path, "both 'test'")
    with_split = _write_csv(tmp_path / "s.csv", ["path", "label", "split"], [["t0.png", "0", "train"]])
    expect_data_error(lambda: load_manifest(with_split, patient_splits={"test": ["t0"]}), with_split, "not both")
