"""Image-text pairs from a CSV, a JSON file or VQA-RAD, split by image (or patient) into train and test.

Formats (``load_pairs(spec)``):

* ``pairs.csv`` / ``csv:PATH``: columns ``image`` (path, relative to the CSV's folder) and ``text``; optional
  ``patient_id`` (split unit; default: the image) and ``split`` (``train`` / ``test``; default: a seeded split).
* ``pairs.json`` / ``json:PATH``: a list of objects with the same keys, or ``{"pairs": [...]}``.
* ``vqa_rad:PATH``: the VQA-RAD folder (MEVF layout: ``data_RAD/{trainset,testset}.json`` and ``images/``).

An image may have several texts (several rows): training draws one of them per epoch, retrieval counts a hit
when any of them is retrieved. Bad rows (no image path, image file not found, empty text) and, when images are
decoded, unreadable images are skipped with one warning line each naming the file, and counted in
``PairSet.skipped``; the rest goes on.

**VQA-RAD pairs** (several texts per image): the organ, then three of the image's questions each followed by
its answer, in question-id order, e.g. ``"chest. is there a pneumothorax? no. where is the mass? left upper
lobe. is this a pa film? yes."``; an image with 11 questions has 4 such texts. Why: VQA-RAD has no reports. A
single question with its answer is often generic ("is this a ct? yes" fits dozens of images), which makes
in-batch negatives false negatives; all of an image's questions in one text (about 110 tokens) let a text tower
trained on 250 images memorise each image's unique wording instead of learning what generalises (an early trial:
training loss 1.3, held-out recall close to chance). Three at a time is specific enough to be mostly unique,
short (about 35 tokens), and a different text each epoch acts as text augmentation. Closed questions keep their yes/no
answer after the question instead of being rewritten as statements: a rule-based rewrite of free-form
clinician questions would be wrong as often as right. The official MEVF train/test files split *questions*,
and all 203 test images also appear in the train file, so both files are pooled and split again by image.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.model_selection import GroupShuffleSplit

from medfoundry.data.manifest import read_image
from medfoundry.errors import DataError
from medfoundry.io_utils import hash_json

log = logging.getLogger("medfoundry.vlm")

_PREFIX = re.compile(r"^(?P<prefix>[A-Za-z][A-Za-z0-9_-]+):(?P<path>.+)$")
VQA_RAD_ORGANS = {"HEAD": "head", "CHEST": "chest", "ABD": "abdomen"}


@dataclass
class SkipReport:
    """What was skipped and why: one entry per skipped pair or image, plus counts by reason."""

    entries: list[tuple[str, str, str]] = field(default_factory=list)  # (where, reason, detail)

    def add(self, where: str | Path, reason: str, detail: str = "") -> None:
        self.entries.append((str(where), reason, detail))
        log.warning("%s: %s%s; skipped", where, reason, f" ({detail})" if detail else "")

    def __len__(self) -> int:
        return len(self.entries)

    def counts(self) -> dict[str, int]:
        return dict(Counter(reason for _, reason, _ in self.entries))

    def summary(self, what: str = "pairs") -> str:
        if not self.entries:
            return f"no {what} skipped"
        parts = ", ".join(f"{n} {reason}" for reason, n in sorted(self.counts().items()))
        return f"skipped {len(self.entries)} {what}: {parts}"


@dataclass
class PairSet:
    """Images, each with one or more texts; ``patient_ids`` is the split unit (the image itself by default)."""

    name: str
    source: Path
    image_paths: list[Path]
    image_ids: list[str]
    patient_ids: list[str]
    captions: list[list[str]]
    splits: list[str | None]
    skipped: SkipReport = field(default_factory=SkipReport)

    def __len__(self) -> int:
        return len(self.image_ids)

    @property
    def n_texts(self) -> int:
        return sum(len(c) for c in self.captions)

    def texts(self) -> tuple[list[str], np.ndarray]:
        """All texts flattened, and the index of the image each belongs to."""
        flat = [text for caps in self.captions for text in caps]
        owner = np.repeat(np.arange(len(self)), [len(c) for c in self.captions])
        return flat, owner

    def subset(self, indices: np.ndarray | list[int], name: str | None = None) -> PairSet:
        idx = [int(i) for i in indices]
        return PairSet(
            name or self.name,
            self.source,
            [self.image_paths[i] for i in idx],
            [self.image_ids[i] for i in idx],
            [self.patient_ids[i] for i in idx],
            [self.captions[i] for i in idx],
            [self.splits[i] for i in idx],
            self.skipped,
        )

    def fingerprint(self, images: np.ndarray) -> str:
        """The pairs' ids, captions and decoded ``images`` (from :func:`load_pair_images`), never their file paths:
        a copied or moved pairs folder is the same data, an image rewritten in place is not."""
        pixels = hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()
        return hash_json([self.image_ids, self.patient_ids, self.captions, pixels])


def load_pairs(spec: str | Path) -> PairSet:
    """Read image-text pairs named by ``spec`` (see the module docstring); bad rows are skipped and counted."""
    prefix, path = _resolve(spec)
    if not path.exists():
        raise DataError("pairs file or folder not found", path)
    if prefix == "vqa_rad":
        return load_vqa_rad(path)
    if prefix == "csv":
        return _from_rows(_csv_rows(path), path, path.stem)
    if prefix == "json":
        return _from_rows(_json_rows(path), path, path.stem)
    raise DataError(f"unknown pairs format '{prefix}:'; use a .csv or .json file, csv:, json: or vqa_rad:", path)


def _resolve(spec: str | Path) -> tuple[str, Path]:
    if isinstance(spec, str) and (match := _PREFIX.match(spec)):
        return match["prefix"].lower().replace("-", "_"), Path(match["path"]).expanduser()
    path = Path(spec).expanduser()
    suffix = path.suffix.lower().lstrip(".")
    if suffix in ("csv", "json"):
        return suffix, path
    if path.is_dir() and (_vqa_rad_root(path) is not None):
        return "vqa_rad", path
    raise DataError("cannot tell the pairs format; give a .csv or .json file, or vqa_rad:FOLDER", path)


def _csv_rows(path: Path) -> list[tuple[str, dict[str, Any]]]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = [c.strip() for c in reader.fieldnames or []]
            rows = [
                (f"{path}:{line}", {k.strip(): v for k, v in row.items() if k is not None})
                for line, row in enumerate(reader, start=2)
            ]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"cannot read pairs CSV ({error})", path) from None
    missing = [c for c in ("image", "text") if c not in columns]
    if missing:
        raise DataError(f"pairs CSV lacks column(s) {', '.join(missing)} (found: {', '.join(columns)})", path)
    return rows


def _json_rows(path: Path) -> list[tuple[str, dict[str, Any]]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"cannot read pairs JSON ({error})", path) from None
    except json.JSONDecodeError as error:
        raise DataError(f"not valid JSON (line {error.lineno}: {error.msg})", path) from None
    items = data.get("pairs") if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise DataError('pairs JSON must be a list of {"image": ..., "text": ...} or {"pairs": [...]}', path)
    rows = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise DataError(f"pairs[{i}] must be an object with image and text, got {type(item).__name__}", path)
        rows.append((f"{path}:pairs[{i}]", item))
    return rows


def _from_rows(rows: list[tuple[str, dict[str, Any]]], source: Path, name: str) -> PairSet:
    root = source.parent
    skipped = SkipReport()
    by_image: dict[Path, dict[str, Any]] = {}
    for where, row in rows:
        image = str(row.get("image") or "").strip()
        text = " ".join(str(row.get("text") or "").split())
        if not image:
            skipped.add(where, "no image path")
            continue
        path = Path(image).expanduser()
        path = path if path.is_absolute() else root / path
        if not path.is_file():
            skipped.add(path, "image file not found", where)
            continue
        if not text:
            skipped.add(path, "empty text", where)
            continue
        entry = by_image.setdefault(path, {"texts": [], "patient": None, "split": None})
        entry["texts"].append(text)
        for key, column in (("patient", "patient_id"), ("split", "split")):
            value = str(row.get(column) or "").strip()
            if value:
                entry[key] = value
    if not by_image:
        raise DataError(f"no usable image-text pairs ({skipped.summary()})", source)
    paths = list(by_image)
    ids = [_relative_id(p, root) for p in paths]
    patients = [by_image[p]["patient"] or sid for p, sid in zip(paths, ids, strict=True)]
    return PairSet(
        name,
        source,
        paths,
        ids,
        patients,
        [by_image[p]["texts"] for p in paths],
        [by_image[p]["split"] for p in paths],
        skipped,
    )


def _relative_id(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).with_suffix("").as_posix()
    except ValueError:
        return path.with_suffix("").as_posix()


def _vqa_rad_root(path: Path) -> Path | None:
    for candidate in (path, path / "data_RAD"):
        if (candidate / "trainset.json").is_file() and (candidate / "images").is_dir():
            return candidate
    return None


def vqa_rad_captions(organ: str, qa: list[tuple[str, str]], per_text: int = 3) -> list[str]:
    """Texts of one image: the organ, then ``per_text`` of its questions each followed by its answer, in order
    (exact repeats dropped, first wording kept). An image with 11 questions gets 4 texts."""
    sentences, seen = [], set()
    for question, answer in qa:
        question, answer = " ".join(question.split()), " ".join(answer.split())
        if not question or not answer:
            continue
        sentence = f"{question} {answer}".rstrip(".") + "."
        if sentence.lower() not in seen:
            seen.add(sentence.lower())
            sentences.append(sentence)
    head = VQA_RAD_ORGANS.get(organ.strip().upper(), organ.strip().lower()) + "."
    return [" ".join([head, *sentences[i : i + per_text]]) for i in range(0, len(sentences), per_text)]


def load_vqa_rad(path: Path, per_text: int = 3) -> PairSet:
    """VQA-RAD as image-text pairs (see the module docstring for how the texts are formed and why)."""
    root = _vqa_rad_root(Path(path))
    if root is None:
        raise DataError("not a VQA-RAD folder (expected data_RAD/trainset.json and data_RAD/images/)", path)
    questions: list[tuple[dict[str, Any], str]] = []
    for file in ("trainset.json", "testset.json"):
        if (root / file).is_file():
            questions += [(q, str(root / file)) for q in _json_list(root / file)]
    skipped = SkipReport()
    per_image: dict[str, dict[str, Any]] = {}
    for question, where in questions:
        name = str(question.get("image_name") or "").strip()
        if not name:
            skipped.add(where, "no image path", f"qid {question.get('qid')}")
            continue
        entry = per_image.setdefault(name, {"organ": str(question.get("image_organ") or ""), "qa": []})
        entry["qa"].append(
            (int(question.get("qid") or 0), str(question.get("question") or ""), str(question.get("answer") or ""))
        )
    paths, ids, captions = [], [], []
    for name in sorted(per_image):
        image = root / "images" / name
        if not image.is_file():
            skipped.add(image, "image file not found")
            continue
        qa = [(q, a) for _, q, a in sorted(per_image[name]["qa"])]
        texts = vqa_rad_captions(per_image[name]["organ"], qa, per_text)
        if not texts:  # every question or answer of the image was empty
            skipped.add(image, "empty text")
            continue
        paths.append(image)
        ids.append(Path(name).stem)
        captions.append(texts)
    unused = len(list((root / "images").glob("*.jpg"))) - len(per_image)
    if unused > 0:
        log.info("%d VQA-RAD image(s) have no questions and are not used", unused)
    return PairSet("vqa_rad", root, paths, ids, list(ids), captions, [None] * len(ids), skipped)


def _json_list(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"cannot read VQA-RAD questions ({error})", path) from None
    if not isinstance(data, list):
        raise DataError("VQA-RAD questions file must be a JSON list", path)
    return [q for q in data if isinstance(q, dict)]


def split_pairs(pairs: PairSet, test_fraction: float = 0.2, seed: int = 0) -> dict[str, PairSet]:
    """``{"train", "test"}`` by the ``split`` column when every image has one, else a seeded split of
    patients (images without a patient id are their own patient), so no patient is in both."""
    given = [s for s in pairs.splits if s]
    if given and len(given) < len(pairs):
        raise DataError(
            f"{len(pairs) - len(given)} of {len(pairs)} images have no split; give all or none", pairs.source
        )
    if given:
        return {
            s: pairs.subset([i for i, v in enumerate(pairs.splits) if v == s], f"{pairs.name}:{s}")
            for s in sorted(set(given))
        }
    if len(set(pairs.patient_ids)) < 2:
        raise DataError("need images of at least 2 patients to split into train and test", pairs.source)
    splitter = GroupShuffleSplit(n_splits=1, test_size=test_fraction, random_state=seed)
    train, test = next(splitter.split(np.zeros(len(pairs)), groups=pairs.patient_ids))
    return {
        "train": pairs.subset(np.sort(train), f"{pairs.name}:train"),
        "test": pairs.subset(np.sort(test), f"{pairs.name}:test"),
    }


def load_pair_images(pairs: PairSet, size: int, channels: int, workers: int = 2) -> tuple[np.ndarray, PairSet]:
    """Decode and resize every image once into a uint8 array (N, C, size, size); unreadable images are skipped
    (one line each, counted in ``skipped``) and the returned PairSet holds only the images that were read.

    In memory: fine for tens of thousands of images at CLIP-on-CPU sizes (64 px: 12 kB per RGB image).
    """

    def read(path: Path) -> np.ndarray | str:
        try:
            return read_image(path, (size, size), channels)
        except DataError as error:
            return str(error).removeprefix(f"{path}: ")

    # Threads: Pillow releases the GIL while decoding.
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        decoded = list(pool.map(read, pairs.image_paths))
    keep = []
    for i, (path, item) in enumerate(zip(pairs.image_paths, decoded, strict=True)):
        if isinstance(item, str):
            pairs.skipped.add(path, "unreadable image", item)
        else:
            keep.append(i)
    if not keep:
        raise DataError(f"none of the {len(pairs)} images could be read ({pairs.skipped.summary()})", pairs.source)
    kept = pairs.subset(keep) if len(keep) < len(pairs) else pairs
    return np.stack([decoded[i] for i in keep]), kept  # type: ignore[misc]
