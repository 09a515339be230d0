"""Label-fraction subsets (BreastMNIST labels) and patient-grouped splits (Kermany patient ids)."""

from __future__ import annotations

import csv
import itertools
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import expect_data_error
from PIL import Image

from medfoundry.data.registry import load_dataset
from medfoundry.data.sample import ArrayImageSet, ImageSet
from medfoundry.data.splits import SplitOverlapWarning, check_disjoint, label_fraction_indices, patient_split


@pytest.fixture(scope="module")
def breast_labels(breastmnist_npz: Path) -> np.ndarray:
    with np.load(breastmnist_npz) as data:
        return data["train_labels"].astype(np.int64)


@pytest.fixture(scope="module")
def kermany_groups(shared_data: Path) -> tuple[list[str], np.ndarray]:
    """Patient ids parsed from real Kermany file names (several images share a patient) and labels."""
    patients, labels = [], []
    for label, name in enumerate(("NORMAL", "PNEUMONIA")):
        for path in sorted((shared_data / "kermany_cxr_224_trainsubset" / name).glob("*.jpeg")):
            # person1000_bacteria_2931 -> person1000; NORMAL2-IM-1179-0001 -> NORMAL2-IM-1179
            stem = path.stem
            patients.append(stem.split("_")[0] if name == "PNEUMONIA" else stem.rsplit("-", 1)[0])
            labels.append(label)
    return patients, np.array(labels)


def test_fraction_is_stratified_and_sized(breast_labels: np.ndarray) -> None:
    indices = label_fraction_indices(breast_labels, 0.1, seed=0)
    assert len(indices) == round(0.1 * 546)
    assert np.all(np.diff(indices) > 0)
    assert np.bincount(breast_labels[indices]).tolist() == [15, 40]  # 147/399 scaled by 0.1


def test_min_per_class(breast_labels: np.ndarray) -> None:
    indices = label_fraction_indices(breast_labels, 0.005, seed=3, min_per_class=2)
    assert np.bincount(breast_labels[indices]).tolist() == [2, 2]
    few = np.array([0] * 50 + [1])
    assert np.bincount(few[label_fraction_indices(few, 0.1, seed=0, min_per_class=2)]).tolist() == [5, 1]


def test_deterministic_and_nested(breast_labels: np.ndarray) -> None:
    first = label_fraction_indices(breast_labels, 0.25, seed=7)
    np.testing.assert_array_equal(first, label_fraction_indices(breast_labels, 0.25, seed=7))
    assert not np.array_equal(first, label_fraction_indices(breast_labels, 0.25, seed=8))
    smaller = label_fraction_indices(breast_labels, 0.05, seed=7)
    assert set(smaller) <= set(first)


def test_full_fraction_and_bad_fraction(breast_labels: np.ndarray) -> None:
    np.testing.assert_array_equal(label_fraction_indices(breast_labels, 1.0, seed=0), np.arange(546))
    with pytest.raises(ValueError):
        label_fraction_indices(breast_labels, 0.0, seed=0)


def test_patient_split_separates_patients(kermany_groups: tuple[list[str], np.ndarray]) -> None:
    patients, labels = kermany_groups
    assert len(set(patients)) < len(patients)  # real repeated patients, so grouping matters
    parts = patient_split(patients, labels, fractions=(0.8, 0.2), seed=0)
    train, val = parts["train"], parts["val"]
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(len(patients)))
    train_patients = {patients[i] for i in train}
    assert train_patients.isdisjoint(patients[i] for i in val)
    assert 0.15 < len(val) / len(patients) < 0.25
    assert abs(labels[val].mean() - labels.mean()) < 0.1  # stratified


def test_patient_split_three_parts_and_determinism(kermany_groups: tuple[list[str], np.ndarray]) -> None:
    patients, labels = kermany_groups
    parts = patient_split(patients, labels, fractions=(0.7, 0.15, 0.15), seed=1)
    assert list(parts) == ["train", "val", "test"]
    owners = [{patients[i] for i in part} for part in parts.values()]
    assert all(a.isdisjoint(b) for i, a in enumerate(owners) for b in owners[i + 1 :])
    again = patient_split(patients, labels, fractions=(0.7, 0.15, 0.15), seed=1)
    assert all(np.array_equal(parts[k], again[k]) for k in parts)
    other = patient_split(patients, labels, fractions=(0.7, 0.15, 0.15), seed=2)
    assert not np.array_equal(parts["test"], other["test"])


def test_patient_split_without_labels_and_errors() -> None:
    patients = [f"p{i // 3}" for i in range(30)]
    parts = patient_split(patients, None, fractions=(0.5, 0.5), seed=0)
    assert {len(parts["train"]), len(parts["val"])} == {15}
    with pytest.raises(ValueError):
        patient_split(["a", "a"], None, fractions=(0.5, 0.5))
    with pytest.raises(ValueError):
        patient_split(patients, None, fractions=(0.5, 0.4))


def test_patient_split_with_large_patient_groups(shared_data: Path) -> None:
    """Osteosarcoma tiles come from 4 patients only (Case-3, Case-4, Case-48, P9), 8 to 19 tiles each."""
    with (shared_data / "osteosarcoma_tcia_tiles_60" / "labels.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    patients = [re.match(r"Case-\d+|P\d+", row["source_image_id"])[0] for row in rows]
    labels = np.array([int(row["label_index"]) for row in rows])
    assert len(set(patients)) == 4
    for seed in range(3):
        parts = patient_split(patients, labels, fractions=(0.5, 0.5), seed=seed)
        train, val = ({patients[i] for i in part} for part in parts.values())
        assert train.isdisjoint(val) and len(train | val) == 4
        assert len(parts["train"]) + len(parts["val"]) == 60


# --- check_disjoint: what every load_dataset refuses (issue 15) ---------------------------------------------------


def _array_set(name: str, ids: list[str], patients: list[str]) -> ArrayImageSet:
    # Distinct random pixels per split, so that only the ids and patients under test overlap.
    rng = np.random.default_rng(list(name.encode()))
    pixels = rng.integers(0, 256, (len(ids), 1, 4, 4), dtype=np.uint8)
    return ArrayImageSet(name, Path("made.npz"), pixels, ids, patients, np.zeros(len(ids), dtype=np.int64))


def test_check_disjoint_refuses_a_patient_in_two_splits() -> None:
    splits = {
        "train": _array_set("train", ["a1", "a2", "b1"], ["A", "A", "B"]),
        "test": _array_set("test", ["a3", "c1"], ["A", "C"]),
    }
    expect_data_error(
        lambda: check_disjoint(splits, "made.npz"), Path("made.npz"), "'train' and 'test'", "1 patient id", "'A'"
    )
    splits["test"] = _array_set("test", ["c1"], ["C"])
    check_disjoint(splits, "made.npz")  # disjoint: accepted


def test_check_disjoint_refuses_shared_and_repeated_sample_ids() -> None:
    shared = {"train": _array_set("train", ["x", "y"], ["P", "Q"]), "val": _array_set("val", ["y"], ["R"])}
    expect_data_error(lambda: check_disjoint(shared, "m.npz"), Path("m.npz"), "'train' and 'val'", "1 sample id", "'y'")
    repeated = {"train": _array_set("train", ["x", "y", "x"], ["P", "Q", "P"])}
    expect_data_error(lambda: check_disjoint(repeated, "m.npz"), Path("m.npz"), "'train'", "more than once", "'x'")


def test_allow_overlap_downgrades_to_a_warning() -> None:
    splits = {"train": _array_set("train", ["a1"], ["A"]), "test": _array_set("test", ["a2"], ["A"])}
    with pytest.warns(SplitOverlapWarning, match="share 1 patient id"):
        check_disjoint(splits, "made.npz", allow_overlap=True)


def _image_csv(folder: Path, rows: list[tuple[str, str, str]]) -> Path:
    """A manifest over tiny real PNGs written here, one per distinct file name in ``rows`` (path, label, split)."""
    for index, name in enumerate(sorted({path for path, _, _ in rows})):
        Image.fromarray(np.full((4, 4), 10 * index + 5, dtype=np.uint8)).save(folder / name)
    path = folder / "manifest.csv"
    with path.open("w", newline="") as handle:
        csv.writer(handle).writerows([("path", "label", "split"), *rows])
    return path


def test_load_dataset_refuses_one_image_in_train_and_test(tmp_path: Path) -> None:
    # The same file with label 0 in train and label 1 in test used to load as two honest samples.
    csv_path = _image_csv(tmp_path, [("a.png", "0", "train"), ("b.png", "1", "train"), ("a.png", "1", "test")])
    expect_data_error(lambda: load_dataset(csv_path), csv_path, "'train' and 'test'", "share 1", "'a'")
    with pytest.warns(SplitOverlapWarning):
        assert sorted(load_dataset(csv_path, allow_split_overlap=True)) == ["test", "train"]


def test_load_dataset_refuses_one_file_under_two_names(tmp_path: Path) -> None:
    # Two spellings of one file: different sample ids and patients, but the same image file on both sides.
    csv_path = _image_csv(tmp_path, [("a.png", "0", "train"), ("b.png", "1", "train")])
    (tmp_path / "sub").mkdir()
    with csv_path.open("a", newline="") as handle:
        csv.writer(handle).writerow(("sub/../a.png", "1", "test"))
    expect_data_error(lambda: load_dataset(csv_path), csv_path, "'train' and 'test'", "1 image file", "a.png")


def test_load_dataset_refuses_a_file_listed_twice_in_one_split(tmp_path: Path) -> None:
    csv_path = _image_csv(tmp_path, [("a.png", "0", "train"), ("b.png", "1", "train"), ("a.png", "0", "train")])
    expect_data_error(lambda: load_dataset(csv_path), csv_path, "split 'train'", "more than once", "'a'")


def test_pixel_identical_npz_images_across_splits_are_reported(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    train = rng.integers(0, 255, (5, 8, 8), dtype=np.uint8)
    test = np.concatenate([rng.integers(0, 255, (3, 8, 8), dtype=np.uint8), train[[2]]])
    path = tmp_path / "dup.npz"
    np.savez(path, train_images=train, train_labels=np.zeros(5), test_images=test, test_labels=np.ones(4))
    expected = r"1 identical image\(s\) \(pixel for pixel\), e.g. 'train_00002' \(label 0\) = 'test_00003'"
    with pytest.warns(SplitOverlapWarning, match=expected):
        splits = load_dataset(path)
    assert len(splits["test"]) == 4  # reported, not dropped: the official splits stay as published


def test_bundled_breastmnist_has_one_image_in_train_and_test(breastmnist_npz: Path) -> None:
    """Measured on the official BreastMNIST splits: train 115 (label 0) is test 76 (label 1), pixel for pixel; no
    other pair among the 780 images. Reported by every load, kept (refusing would break the official benchmark)."""
    with pytest.warns(SplitOverlapWarning) as caught:
        splits = load_dataset(breastmnist_npz)
    messages = [str(w.message) for w in caught if issubclass(w.category, SplitOverlapWarning)]
    assert len(messages) == 1 and "'train' and 'test' hold 1 identical image(s) (pixel for pixel)" in messages[0], (
        messages
    )
    assert "'train_00115' (label 0) = 'test_00076' (label 1)" in messages[0]
    np.testing.assert_array_equal(splits["train"].load(115), splits["test"].load(76))


def test_byte_identical_files_across_splits_are_reported(tmp_path: Path) -> None:
    csv_path = _image_csv(tmp_path, [("a.png", "0", "train"), ("b.png", "1", "train"), ("c.png", "1", "test")])
    (tmp_path / "c.png").write_bytes((tmp_path / "a.png").read_bytes())  # a copy under another name
    with pytest.warns(
        SplitOverlapWarning, match=r"1 identical image\(s\) \(byte for byte\), e.g. 'a' \(label 0\) = 'c'"
    ):
        splits = load_dataset(csv_path)
    assert {name: len(images) for name, images in splits.items()} == {"train": 2, "test": 1}  # kept


def test_bundled_idrid_has_one_photograph_in_train_and_test(shared_data: Path) -> None:
    """Measured on the shared IDRiD copy (official release files): training image IDRiD_118 (DR grade 0) and test
    image IDRiD_064 (DR grade 3) are the same file, byte for byte; the only pair among the 153 photographs."""
    with pytest.warns(SplitOverlapWarning) as caught:
        load_dataset(f"idrid:{shared_data / 'idrid_dr_grading'}", image_size=32)
    messages = [str(w.message) for w in caught if issubclass(w.category, SplitOverlapWarning)]
    assert len(messages) == 1 and "hold 1 identical image(s) (byte for byte)" in messages[0], messages
    assert "'train/IDRiD_118' (label 0) = 'test/IDRiD_064' (label 3)" in messages[0]


SUITES = sorted((Path(__file__).resolve().parents[1] / "configs" / "suites").glob("*.yaml"))


@pytest.mark.parametrize("suite", SUITES, ids=[path.stem for path in SUITES])
def test_bundled_suites_split_without_patient_overlap(suite: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each bundled suite's tasks load (every load_dataset runs check_disjoint) and the train/val/test the engine
    ends up with, given or carved, share no patient and no sample."""
    repo = suite.parents[2]
    monkeypatch.chdir(repo)  # suite sources are relative to the repository root
    config = yaml.safe_load(suite.read_text())
    for task in config["tasks"]:
        source = task["source"]
        local = Path(source.split(":", 1)[1] if ":" in source.split("/")[0] else source)
        if not local.exists():
            pytest.skip(f"{suite.name}: {local} is absent (the shared data folder is not here)")
        with warnings.catch_warnings():
            # BreastMNIST's and IDRiD's one identical pair each, tested above
            warnings.simplefilter("ignore", SplitOverlapWarning)
            parts = _task_splits(task)
        assert set(parts) == {"train", "val", "test"}
        for first, second in itertools.combinations(parts, 2):
            a, b = parts[first], parts[second]
            assert not set(a.patient_ids) & set(b.patient_ids), (task["name"], first, second)
            assert not set(a.ids) & set(b.ids), (task["name"], first, second)


def _task_splits(task: dict) -> dict[str, ImageSet]:
    """The engine's train/val/test for a suite task when the engine can be imported, else load_dataset's splits with
    the missing ones carved by patient as the engine does."""
    try:
        from medfoundry.bench.engine import load_task
        from medfoundry.config import TaskConfig

        loaded = load_task(TaskConfig(**task))
        return {name: getattr(loaded, name) for name in ("train", "val", "test")}
    except ImportError:
        pass
    splits = dict(load_dataset(task["source"], **task.get("options", {})))
    test_fraction, val_fraction = task.get("test_fraction", 0.2), task.get("val_fraction", 0.2)
    for name, fraction in (("test", test_fraction), ("val", val_fraction)):
        if name not in splits:
            train = splits["train"]
            share = fraction / (1 - test_fraction) if name == "val" and "test" not in splits else fraction
            parts = patient_split(train.patient_ids, np.asarray(train.labels), (1 - share, share), 0, ("train", name))
            splits.update({key: train.subset(indices) for key, indices in parts.items()})
    return splits


def test_osteosarcoma_suite_leaves_patients_out(shared_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The suite once grouped by tile id: all 4 patients were in train and in test. Now each is in one split."""
    suite = Path(__file__).resolve().parents[1] / "configs" / "suites" / "osteosarcoma.yaml"
    task = yaml.safe_load(suite.read_text())["tasks"][0]
    options = task["options"]
    splits = load_dataset(shared_data / "osteosarcoma_tcia_tiles_60" / "labels.csv", **options)
    patients = {name: sorted(set(images.patient_ids)) for name, images in splits.items()}
    assert patients == {"train": ["Case-3", "Case-48"], "val": ["P9"], "test": ["Case-4"]}
    assert {name: len(images) for name, images in splits.items()} == {"train": 592, "val": 128, "test": 240}
    assert np.bincount(splits["test"].labels).tolist() == [48, 96, 96]  # all three classes in the test patient
    assert np.bincount(splits["train"].labels).tolist() == [144, 224, 224]


def test_report_line_says_when_the_data_names_no_patients(breastmnist_npz: Path, shared_data: Path) -> None:
    """BreastMNIST has no patient ids, so its splits are not 'grouped by patient'; Kermany's file names give them."""
    from medfoundry.bench.engine import load_task
    from medfoundry.config import TaskConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SplitOverlapWarning)  # BreastMNIST's one identical pair, tested above
        breast = load_task(TaskConfig(name="breastmnist", source=str(breastmnist_npz)))
    assert breast.grouping() == (
        "the data names no patients, so each image counts as one (546/78/156 images in train/val/test, "
        "none in two splits; confidence intervals resample images)"
    )
    kermany = load_task(
        TaskConfig(
            name="kermany",
            source=f"folder:{shared_data / 'kermany_cxr_224_trainsubset'}",
            options={"image_size": 32, "patient_regex": r"^(person\d+|(?:NORMAL2-)?IM-\d+)[-_]"},
            test_fraction=0.2,
            val_fraction=0.16,
        )
    )
    line = kermany.grouping()
    assert line.startswith("grouped by patient id (")
    assert line.endswith("; test and val carved from train by patient id")
    n_patients = [int(n) for n in line.split("(")[1].split(" ")[0].split("/")]
    assert sum(n_patients) < len(kermany.train) + len(kermany.val) + len(kermany.test)  # patients, not images
