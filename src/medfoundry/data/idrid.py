"""IDRiD disease grading (colour fundus photographs with DR and DME grades) as ``train`` and ``test`` splits.

Expected layout (the shared copy's), or the official release's folder names::

    root/train_images/IDRiD_001.jpg ...     root/1. Original Images/a. Training Set/...
    root/test_images/IDRiD_001.jpg ...      root/1. Original Images/b. Testing Set/...
    root/labels/train_labels.csv            root/2. Groundtruths/a. IDRiD_Disease Grading_Training Labels.csv
    root/labels/test_labels.csv             root/2. Groundtruths/b. IDRiD_Disease Grading_Testing Labels.csv

The label CSVs are read as published: CRLF line endings, a trailing space in ``Risk of macular edema ``, and
empty trailing columns. The images in each split folder are the samples, so a folder holding a subset of the
official images (the shared copy has 50 of the 413 training images) is fine, while an image without a label row
is an error. Train and test both start at ``IDRiD_001`` but are different photographs, so ids (and patient ids:
IDRiD gives no patient) are prefixed with the split, e.g. ``train/IDRiD_001``. There is no validation split.
One photograph is in both official splits: training ``IDRiD_118`` (DR grade 0) and test ``IDRiD_064`` (grade 3) are
the same file byte for byte; ``load_dataset`` warns about it and keeps the official splits.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Literal

import numpy as np

from medfoundry.data.fundus import FundusImageSet
from medfoundry.data.sample import Splits
from medfoundry.errors import DataError

Target = Literal["dr_grade", "referable_dr", "dme", "multilabel"]

CLASS_NAMES: dict[str, list[str]] = {
    "dr_grade": ["no DR", "mild NPDR", "moderate NPDR", "severe NPDR", "proliferative DR"],
    # Referable DR (moderate NPDR or worse) is the usual screening end point.
    "referable_dr": ["non-referable", "referable"],
    "dme": ["no hard exudates", "exudates beyond 1 DD of macula", "exudates within 1 DD of macula"],
    # Two findings an image can have at once: (N, 2) 0/1 columns.
    "multilabel": ["referable DR", "DME risk"],
}
_LAYOUTS = {
    "train": [
        ("train_images", "labels/train_labels.csv"),
        ("1. Original Images/a. Training Set", "2. Groundtruths/a. IDRiD_Disease Grading_Training Labels.csv"),
    ],
    "test": [
        ("test_images", "labels/test_labels.csv"),
        ("1. Original Images/b. Testing Set", "2. Groundtruths/b. IDRiD_Disease Grading_Testing Labels.csv"),
    ],
}
_NAME_COLUMN = "Image name"
_DR_COLUMN = "Retinopathy grade"
_DME_COLUMN = "Risk of macular edema"
_IMAGE_SUFFIXES = (".jpg", ".jpeg")


def load_idrid(
    root: str | Path,
    *,
    target: Target = "dr_grade",
    image_size: int = 224,
    local_contrast: bool = False,
) -> Splits:
    """Load IDRiD grading as ``{"train", "test"}`` :class:`FundusImageSet` splits, cropped to the FOV when loaded.

    ``target`` picks the label: ``dr_grade`` (0-4), ``referable_dr`` (1 when the DR grade is 2 or more) or
    ``dme`` (risk of macular edema, 0-2), or ``multilabel``: two 0/1 columns, referable DR and any DME risk (grade
    1 or 2), which an image can have together. ``image_size`` and ``local_contrast`` go to
    :func:`medfoundry.data.fundus.fundus_crop`.

    Raises:
        DataError: a missing folder or CSV, a bad CSV, an image without a label row, an unknown target.
    """
    root = Path(root)
    if target not in CLASS_NAMES:
        raise DataError(f"unknown IDRiD target {target!r}; choose one of {sorted(CLASS_NAMES)}", root)
    if not root.is_dir():
        raise DataError("IDRiD folder not found" if not root.exists() else "is not a folder", root)
    splits: Splits = {}
    for split, layouts in _LAYOUTS.items():
        images_dir, labels_csv = _find_layout(root, split, layouts)
        grades = read_idrid_labels(labels_csv)
        paths = _images(images_dir)
        labels = np.array([_target(_label_row(grades, path), target) for path in paths], dtype=np.int64)
        ids = [f"{split}/{path.stem}" for path in paths]
        splits[split] = FundusImageSet(
            f"{root.name}:{split}",
            root,
            paths,
            ids,
            list(ids),
            labels,
            list(CLASS_NAMES[target]),
            image_size=image_size,
            local_contrast=local_contrast,
        )
    return splits


def read_idrid_labels(csv_path: Path) -> dict[str, tuple[int, int]]:
    """``{image name: (DR grade, DME risk)}`` from an official IDRiD grading CSV."""
    try:
        # newline="" lets the csv module take the CRLF endings; utf-8-sig drops a byte-order mark if present.
        with csv_path.open(newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.reader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read CSV ({' '.join(str(exc).split())[:200]})", csv_path) from exc
    if not rows:
        raise DataError("CSV is empty", csv_path)
    header = [cell.strip() for cell in rows[0]]
    columns = {}
    for name in (_NAME_COLUMN, _DR_COLUMN, _DME_COLUMN):
        if name not in header:
            raise DataError(f"missing column {name!r}; columns found: {[c for c in header if c]}", csv_path)
        columns[name] = header.index(name)
    labels: dict[str, tuple[int, int]] = {}
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue  # blank lines at the end of spreadsheet exports
        name = _cell(row, columns[_NAME_COLUMN])
        dr = _grade(_cell(row, columns[_DR_COLUMN]), 4, _DR_COLUMN, line, csv_path)
        dme = _grade(_cell(row, columns[_DME_COLUMN]), 2, _DME_COLUMN, line, csv_path)
        if not name:
            raise DataError(f"row {line}: empty {_NAME_COLUMN!r}", csv_path)
        if name in labels:
            raise DataError(f"row {line}: image {name} is listed twice", csv_path)
        labels[name] = (dr, dme)
    return labels


def _find_layout(root: Path, split: str, layouts: list[tuple[str, str]]) -> tuple[Path, Path]:
    for images_dir, labels_csv in layouts:
        if (root / images_dir).is_dir() and (root / labels_csv).is_file():
            return root / images_dir, root / labels_csv
    expected = " or ".join(f"{images} with {labels}" for images, labels in layouts)
    raise DataError(f"no IDRiD {split} split: expected {expected}", root)


def _images(folder: Path) -> list[Path]:
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES and not p.name.startswith("."))
    if not paths:
        raise DataError("no fundus images (.jpg) in this folder", folder)
    return paths


def _label_row(labels: dict[str, tuple[int, int]], path: Path) -> tuple[int, int]:
    if path.stem not in labels:
        raise DataError("image has no row in its split's label CSV", path)
    return labels[path.stem]


def _target(grades: tuple[int, int], target: Target) -> int | list[int]:
    dr, dme = grades
    if target == "multilabel":
        return [int(dr >= 2), int(dme >= 1)]
    if target == "referable_dr":
        return int(dr >= 2)
    return dr if target == "dr_grade" else dme


def _cell(row: list[str], index: int) -> str:
    return row[index].strip() if index < len(row) else ""


def _grade(value: str, highest: int, column: str, line: int, csv_path: Path) -> int:
    try:
        grade = int(value)
    except ValueError:
        grade = -1
    if not 0 <= grade <= highest:
        raise DataError(f"row {line}: {column!r} must be an integer 0-{highest}, got {value!r}", csv_path)
    return grade
