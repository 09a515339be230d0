"""A task's labelled splits: opened from one dataset with splits (missing ones carved by patient) or from separate
train / val / test datasets, checked, and described the same way for every entry point (run, eval, probe)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medfoundry.config import DatasetSpec, TaskConfig
from medfoundry.data.registry import load_dataset
from medfoundry.data.sample import ArrayImageSet, ImageSet, Splits
from medfoundry.data.splits import check_disjoint, has_patient_ids, patient_split
from medfoundry.errors import DataError
from medfoundry.io_utils import hash_json
from medfoundry.models.features import read_embeddings

ROLES = ("train", "val", "test")


@dataclass
class Task:
    """A task's three labelled splits and how it is scored (``kind`` names a registered task kind)."""

    config: TaskConfig
    train: ImageSet
    val: ImageSet
    test: ImageSet
    kind: str
    n_classes: int
    metrics: list[str]
    carved: list[str] = field(default_factory=list)
    # Features already extracted (``.h5`` from ``medfoundry embed``): probed as they are, no encoder runs.
    precomputed: bool = False

    @property
    def name(self) -> str:
        return self.config.name

    def split(self, role: str) -> ImageSet:
        return {"train": self.train, "val": self.val, "test": self.test}[role]

    def grouping(self) -> str:
        """How the splits were made, in words, for the report (patients never cross a split)."""
        if not any(has_patient_ids(self.split(role)) for role in ROLES):
            # MedMNIST and many folders name no patients: saying "grouped by patient" there would overstate what
            # the split guarantees, and every bootstrap resamples images, not patients.
            carved = f"; {' and '.join(self.carved)} carved from train image by image" if self.carved else ""
            counts = "/".join(str(len(self.split(role))) for role in ROLES)
            return (
                f"the data names no patients, so each image counts as one ({counts} images in train/val/test, "
                f"none in two splits; confidence intervals resample images){carved}"
            )
        carved = f"; {' and '.join(self.carved)} carved from train by patient id" if self.carved else ""
        n_patients = {role: len(set(self.split(role).patient_ids)) for role in ROLES}
        counts = "/".join(str(n_patients[r]) for r in ROLES)
        return f"grouped by patient id ({counts} patients in train/val/test, none in two splits){carved}"

    def fingerprint(self) -> str:
        """Changes whenever any case, label or split changes: part of every cell's fingerprint."""
        return hash_json([self.train.fingerprint(), self.val.fingerprint(), self.test.fingerprint()])

    def metadata(self) -> dict[str, Any]:
        """The task's entry in results.json metadata (sizes, grouping; never ids)."""
        return {
            "kind": self.kind,
            "n_classes": self.n_classes,
            "splits": {role: len(self.split(role)) for role in ROLES},
            "patients": {role: len(set(self.split(role).patient_ids)) for role in ROLES},
            "carved_from_train": self.carved,
            "grouping": self.grouping(),
            "precomputed_features": self.precomputed,
        }

    def describe(self) -> str:
        carved = f" ({', '.join(self.carved)} carved from train by patient)" if self.carved else ""
        unit = "labels" if self.kind == "multilabel" else "classes"
        return (
            f"{self.name}: {self.kind}, {self.n_classes} {unit}, train/val/test "
            f"{len(self.train)}/{len(self.val)}/{len(self.test)}{carved}; headline metric {self.metrics[0]}"
        )


def labels_of(images: ImageSet, task: str, split: str) -> np.ndarray:
    if images.labels is None:
        raise DataError(f"task '{task}': split '{split}' has no labels", images.source)
    labels = np.asarray(images.labels)
    if labels.ndim == 2 and not np.isin(labels, (0, 1)).all():
        raise DataError(f"task '{task}': multi-label targets must be 0/1 columns (split '{split}')", images.source)
    if labels.ndim not in (1, 2):
        raise DataError(f"task '{task}': labels of shape {labels.shape} (split '{split}')", images.source)
    return labels


def _carve(images: ImageSet, fractions: tuple[float, ...], names: tuple[str, ...], seed: int) -> dict[str, ImageSet]:
    parts = patient_split(images.patient_ids, np.asarray(images.labels), fractions, seed, names)
    return {name: images.subset(indices, name=f"{images.name}-{name}") for name, indices in parts.items()}


def is_feature_set(images: ImageSet) -> bool:
    """Whether ``images`` holds feature vectors (read from an embeddings file) rather than images."""
    return isinstance(images, ArrayImageSet) and np.asarray(images.images).ndim == 2


def _features_file(spec: DatasetSpec, role: str) -> ImageSet:
    embeddings, _ = read_embeddings(Path(spec.source))
    return ArrayImageSet(
        name=role,
        source=Path(spec.source),
        images=np.asarray(embeddings.features, dtype=np.float32),
        ids=list(embeddings.ids),
        patient_ids=list(embeddings.patient_ids),
        labels=embeddings.labels,
    )


def _open(spec: DatasetSpec, role: str) -> ImageSet:
    """The one split of ``spec`` that plays ``role``: the named split, the role's own, or the only one."""
    if spec.source.lower().endswith((".h5", ".hdf5")):
        return _features_file(spec, role)
    splits: Splits = load_dataset(spec.source, **spec.options)
    wanted = spec.split or (role if role in splits or len(splits) != 1 else next(iter(splits)))
    if wanted not in splits:
        raise DataError(f"no split '{wanted}' for the task's {role} cases (found {sorted(splits)})", spec.source)
    return splits[wanted]


def _explicit_splits(config: TaskConfig) -> dict[str, ImageSet]:
    assert config.train is not None
    given = {role: getattr(config, role) for role in ROLES if getattr(config, role) is not None}
    opened = {role: _open(spec, role) for role, spec in given.items()}
    # load_dataset checked each dataset's own splits; datasets given separately are checked against each other here.
    separate = len({spec.source for spec in given.values()}) > 1
    allow = any(spec.options.get("allow_split_overlap", False) for spec in given.values())
    check_disjoint(opened, given["train"].source, allow_overlap=allow, separate_datasets=separate)
    kinds = {role: is_feature_set(images) for role, images in opened.items()}
    if len(set(kinds.values())) > 1:
        raise DataError(f"task '{config.name}': mix of feature files and images; give all roles as one or the other")
    _same_classes(config, opened)
    return opened


def _same_classes(config: TaskConfig, opened: dict[str, ImageSet]) -> None:
    # Readers number classes by sorted class name: two folders with different class sets would number them apart.
    names = {role: getattr(images, "class_names", None) for role, images in opened.items()}
    reference = names["train"]
    for role, found in names.items():
        if reference is not None and found is not None and list(found) != list(reference):
            raise DataError(
                f"task '{config.name}': the {role} data's classes {list(found)} differ from train's {list(reference)}",
                opened[role].source,
            )


def open_splits(config: TaskConfig) -> tuple[dict[str, ImageSet], list[str]]:
    """The task's train, val and test splits, carving any that is missing from train by patient id."""
    if config.train is not None:
        opened = _explicit_splits(config)
        train, val, test = opened["train"], opened.get("val"), opened.get("test")
    else:
        assert config.source is not None
        splits = load_dataset(config.source, **config.options)
        if "train" not in splits:
            raise DataError(f"task '{config.name}' needs a 'train' split; found {sorted(splits)}", config.source)
        train, val, test = splits["train"], splits.get(config.val_split), splits.get(config.test_split)
    labels_of(train, config.name, "train")
    carved: list[str] = []
    if test is None:
        parts = _carve(train, (1.0 - config.test_fraction, config.test_fraction), ("train", "test"), config.split_seed)
        train, test = parts["train"], parts["test"]
        carved.append("test")
    if val is None:
        share = config.val_fraction / (1.0 - config.test_fraction) if "test" in carved else config.val_fraction
        parts = _carve(train, (1.0 - share, share), ("train", "val"), config.split_seed)
        train, val = parts["train"], parts["val"]
        carved.append("val")
    splits = {"train": train, "val": val, "test": test}
    return splits, carved
