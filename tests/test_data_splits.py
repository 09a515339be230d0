"""Label-fraction subsets (BreastMNIST labels) and patient-grouped splits (Kermany patient ids)."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest

from medfoundry.data.splits import label_fraction_indices, patient_split


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
