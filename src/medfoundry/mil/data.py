"""Slide bags from cached tile features: one HDF5 per slide plus a CSV of slide-level labels.

Feature files follow the TRIDENT/CLAM layout written by ``medfoundry wsi embed``: ``<slide_id>.h5`` holding
``features`` (N x D float32) and ``coords`` (N x 2 level-0 top-left x, y), with the tiling parameters as
attributes. The labels CSV has the columns ``slide_id,patient_id,label`` and, optionally, ``split`` (train, val or
test: the slide's fixed split; without the column a task carves splits by patient).

A slide the CSV names but whose file is missing, unreadable or empty is skipped with one warning line naming
it (the other slides still train) and listed in ``BagSet.skipped``; anything that would silently corrupt
training (a missing label, NaN features, mismatched feature widths) is a ``DataError`` naming the file.
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medfoundry.errors import DataError

log = logging.getLogger("medfoundry.mil")

REQUIRED_COLUMNS = ("slide_id", "patient_id", "label")
SPLIT_COLUMN = "split"
SPLITS = ("train", "val", "test")


@dataclass
class Bag:
    """One slide: its tile features (N, D), level-0 tile corners (N, 2) and the HDF5 attributes."""

    slide_id: str
    patient_id: str
    label: int
    features: np.ndarray
    coords: np.ndarray
    attrs: dict[str, Any] = field(default_factory=dict)
    split: str | None = None  # from the CSV's split column, when it has one


@dataclass
class BagSet:
    """Bags in CSV order, the class names behind the integer labels, and (slide_id, reason) skipped."""

    bags: list[Bag]
    classes: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def features(self) -> list[np.ndarray]:
        return [b.features for b in self.bags]

    @property
    def labels(self) -> np.ndarray:
        return np.asarray([b.label for b in self.bags], dtype=np.int64)

    @property
    def patient_ids(self) -> list[str]:
        return [b.patient_id for b in self.bags]

    @property
    def slide_ids(self) -> list[str]:
        return [b.slide_id for b in self.bags]

    @property
    def splits(self) -> list[str | None]:
        return [b.split for b in self.bags]


@dataclass(frozen=True)
class LabelRow:
    slide_id: str
    patient_id: str
    label: str
    split: str | None = None


def is_plain_slide_id(slide_id: str) -> bool:
    """Whether ``slide_id`` can stand as a file name inside a folder and name nothing outside it."""
    return (
        bool(slide_id)
        and not slide_id.startswith(".")
        and not any(c in slide_id for c in "/\\\0")
        and Path(slide_id).name == slide_id
    )


def read_label_rows(labels_csv: str | Path) -> list[LabelRow]:
    """Rows of the labels CSV; a missing column, empty field or repeated slide is a ``DataError``."""
    path = Path(labels_csv)
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise DataError(f"missing column(s) {', '.join(missing)}; need {','.join(REQUIRED_COLUMNS)}", path)
            raw_rows = list(reader)
            has_split = SPLIT_COLUMN in (reader.fieldnames or [])
    except FileNotFoundError:
        raise DataError("labels CSV not found", path) from None
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"cannot read labels CSV ({error})", path) from None
    rows, seen = [], set()
    for line, raw in enumerate(raw_rows, start=2):
        values = {c: (raw.get(c) or "").strip() for c in REQUIRED_COLUMNS}
        empty = [c for c, v in values.items() if not v or v.lower() == "nan"]
        if empty:
            raise DataError(f"line {line}: empty {', '.join(empty)} for slide {values['slide_id']!r}", path)
        if not is_plain_slide_id(values["slide_id"]):
            # Slide ids become file names (features/<id>.h5, heatmaps/<id>.png): a path in one would read or write
            # outside the folders the user named.
            raise DataError(
                f"line {line}: slide id {values['slide_id']!r} is not a plain file name (no /, \\, .. or leading dot)",
                path,
            )
        if values["slide_id"] in seen:
            raise DataError(f"line {line}: slide {values['slide_id']!r} is listed twice", path)
        seen.add(values["slide_id"])
        split = (raw.get(SPLIT_COLUMN) or "").strip().lower() if has_split else None
        if has_split and split not in SPLITS:
            raise DataError(f"line {line}: split {split!r} for slide {values['slide_id']!r}; use one of {SPLITS}", path)
        rows.append(LabelRow(**values, split=split))
    if not rows:
        raise DataError("labels CSV has no rows", path)
    return rows


def encode_labels(raw: Sequence[str]) -> tuple[list[int], list[str]]:
    """Integer labels and class names: integers stay as they are (0..K-1), strings are sorted into classes."""
    try:
        numbers = [float(v) for v in raw]
    except ValueError:
        classes = sorted(set(raw))
        return [classes.index(v) for v in raw], classes
    if all(math.isfinite(n) and n == int(n) and n >= 0 for n in numbers):
        ints = [int(n) for n in numbers]
        return ints, [str(k) for k in range(max(ints) + 1)]
    classes = sorted(set(raw))
    return [classes.index(v) for v in raw], classes


def read_bag_file(path: str | Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """``features`` (N, D) float32, ``coords`` (N, 2) int64 and the attributes of one slide's HDF5 file.

    Raises ``DataError`` naming the file when it cannot be read, lacks a dataset, has mismatched shapes or
    holds non-finite features.
    """
    import h5py

    path = Path(path)
    try:
        with h5py.File(path, "r") as handle:
            for name in ("features", "coords"):
                if name not in handle:
                    raise DataError(f"no {name!r} dataset in feature file", path)
            features = np.asarray(handle["features"][()], dtype=np.float32)
            coords = np.asarray(handle["coords"][()])
            attrs = {k: _plain(v) for k, v in handle["coords"].attrs.items()}
            attrs.update({k: _plain(v) for k, v in handle.attrs.items()})
    except OSError as error:
        raise DataError(f"cannot read feature file ({error}); is it truncated or still being written?", path) from None
    _check_shapes(features, coords, path)
    return features, coords.astype(np.int64), attrs


def _plain(value: Any) -> Any:
    # h5py hands attributes back as numpy scalars or bytes; plain Python values serialise and compare simply.
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def _check_shapes(features: np.ndarray, coords: np.ndarray, path: Path) -> None:
    if features.ndim != 2:
        raise DataError(f"features must be (N, D), got shape {features.shape}", path)
    if coords.ndim != 2 or coords.shape[1] != 2 or coords.shape[0] != features.shape[0]:
        raise DataError(f"coords must be ({features.shape[0]}, 2) to match features, got {coords.shape}", path)
    if not np.isfinite(features).all():
        bad = int((~np.isfinite(features)).any(axis=1).sum())
        raise DataError(f"features contain NaN or infinite values in {bad} of {features.shape[0]} tiles", path)


def load_bags(features_dir: str | Path, labels_csv: str | Path) -> BagSet:
    """Read every slide the CSV names from ``features_dir/<slide_id>.h5``.

    Missing, unreadable or empty feature files are skipped with a warning and listed in ``skipped``;
    labels that are not all integers are sorted into class names (``BagSet.classes``).
    """
    features_dir = Path(features_dir)
    if not features_dir.is_dir():
        raise DataError("features folder not found", features_dir)
    rows = read_label_rows(labels_csv)
    labels, classes = encode_labels([r.label for r in rows])
    bags, skipped = [], []
    for row, label in zip(rows, labels, strict=True):
        path = features_dir / f"{row.slide_id}.h5"
        reason = _skip_reason(path)
        if reason is None:
            features, coords, attrs = read_bag_file(path)
            if features.shape[0] == 0:
                reason = "feature file holds no tiles"
            else:
                bags.append(Bag(row.slide_id, row.patient_id, label, features, coords, attrs, row.split))
        if reason is not None:
            log.warning("skipping slide %s: %s (%s)", row.slide_id, reason, path)
            skipped.append((row.slide_id, reason))
    _check_widths(bags, features_dir)
    if not bags:
        raise DataError(f"none of the {len(rows)} slides in {labels_csv} has a feature file here", features_dir)
    return BagSet(bags, classes, skipped)


def _skip_reason(path: Path) -> str | None:
    if not path.is_file():
        return "no feature file"
    import h5py

    try:
        with h5py.File(path, "r"):
            return None
    except OSError as error:
        return f"unreadable feature file ({error})"


def _check_widths(bags: list[Bag], features_dir: Path) -> None:
    widths = {b.features.shape[1] for b in bags}
    if len(widths) > 1:
        first = bags[0]
        odd = next(b for b in bags if b.features.shape[1] != first.features.shape[1])
        raise DataError(
            f"feature width {odd.features.shape[1]} differs from {first.features.shape[1]} of slide "
            f"{first.slide_id}; were the slides embedded with different encoders?",
            features_dir / f"{odd.slide_id}.h5",
        )
