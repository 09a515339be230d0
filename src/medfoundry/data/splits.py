"""Label-fraction subsets and patient-grouped splits, both deterministic per seed, and the check that the splits a
dataset arrives with share no patient and no image (:func:`check_disjoint`, run by every ``load_dataset``)."""

from __future__ import annotations

import hashlib
import warnings
from collections import Counter
from collections.abc import Sequence
from itertools import combinations
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from medfoundry.data.sample import ImageSet, Splits
from medfoundry.errors import DataError

DEFAULT_SPLIT_NAMES = {2: ("train", "val"), 3: ("train", "val", "test")}
_OVERRIDE = "pass allow_split_overlap=True to accept it"


class SplitOverlapWarning(UserWarning):
    """Splits share images or patients: refused by default, a warning only when the user allowed the overlap, or
    when the only evidence is identical pixels or bytes under different ids (see :func:`check_disjoint`)."""


def check_disjoint(
    splits: Splits, source: str | Path, *, allow_overlap: bool = False, separate_datasets: bool = False
) -> None:
    """Refuse splits that would leak: a patient id, a sample id or an image file in two splits, or a sample id
    twice within one split.

    Evaluation on a test split is only honest when nothing of a test patient was seen in training, so each of
    these raises one :class:`DataError` line naming ``source``, the split(s), the count and an example;
    ``allow_overlap=True`` (the ``allow_split_overlap`` load option) turns them into :class:`SplitOverlapWarning`
    for a user who knows the overlap is intended.

    The images themselves are compared too: in-memory arrays (e.g. MedMNIST, whose files carry no patient ids and
    whose sample ids differ across splits by construction) pixel for pixel, image files byte for byte (only those
    whose size also occurs in the other split are read). Identical images in two splits are only warned about:
    official splits contain such pairs (BreastMNIST: train_00115, label 0, is test_00076, label 1; IDRiD: train
    IDRiD_118, DR grade 0, is test IDRiD_064, grade 3), and refusing would make the published benchmarks
    impossible to load.

    ``separate_datasets``: the splits come from different datasets (a train folder and a test folder), whose sample
    ids are paths inside each dataset and may coincide without being the same image; then sample ids are not
    compared, and patient ids only where both datasets carry real ones (not their sample ids). Files and image
    contents are compared as always.
    """
    source = Path(source)
    # Resolved once per split: both the shared-file and the identical-content checks use them.
    files = {name: _file_keys(images) for name, images in splits.items()}
    problems = [*_duplicates_within(splits), *_shared_across(splits, files, separate_datasets)]
    if problems and not allow_overlap:
        more = f" (and {len(problems) - 1} more finding(s))" if len(problems) > 1 else ""
        raise DataError(f"{problems[0]}{more}; {_OVERRIDE}", source)
    for problem in problems:
        warnings.warn(f"{source}: {problem} (allowed by allow_split_overlap)", SplitOverlapWarning, stacklevel=2)
    for problem in _identical_images_across(splits, files):
        warnings.warn(f"{source}: {problem}", SplitOverlapWarning, stacklevel=2)


def _duplicates_within(splits: Splits) -> list[str]:
    problems = []
    for name, images in splits.items():
        repeated = [sid for sid, count in Counter(images.ids).items() if count > 1]
        if repeated:
            problems.append(
                f"split {name!r} has {len(repeated)} sample id(s) more than once, e.g. {repeated[0]!r} "
                "(the same image listed twice, or ids that do not tell files apart)"
            )
    return problems


def has_patient_ids(images: ImageSet) -> bool:
    """Whether the data names patients: where it does not, every image is its own patient (its sample id)."""
    return list(images.patient_ids) != list(images.ids)


def _shared_across(splits: Splits, files: dict[str, list[str]], separate_datasets: bool = False) -> list[str]:
    problems = []
    for (first, a), (second, b) in combinations(splits.items(), 2):
        # Patients first: the broadest leak, and the one a grouped split exists to prevent.
        checks = [
            ("patient id(s)", a.patient_ids, b.patient_ids),
            ("sample id(s)", a.ids, b.ids),
            ("image file(s)", files[first], files[second]),
        ]
        if separate_datasets:
            real_patients = has_patient_ids(a) and has_patient_ids(b)
            checks = checks[:1] * real_patients + checks[2:]
        for what, values_a, values_b in checks:
            shared = sorted(set(values_a) & set(values_b))
            if shared:
                problems.append(f"splits {first!r} and {second!r} share {len(shared)} {what}, e.g. {shared[0]!r}")
    return problems


def _file_keys(images: ImageSet) -> list[str]:
    # File-backed sets (manifest, folder, fundus) keep one path per sample; crops of one file repeat it, which is
    # fine within a split. resolve() makes "a/x.png" and "./a/../a/x.png" the same file.
    paths = getattr(images, "paths", None)
    if not isinstance(paths, list):
        return []
    return [str(Path(p).resolve()) for p in paths]


def _identical_images_across(splits: Splits, files: dict[str, list[str]]) -> list[str]:
    arrays = {name: _content_hashes(images) for name, images in splits.items()}
    problems = []
    for first, second in combinations(splits, 2):
        a, b = splits[first], splits[second]
        hashes_a, hashes_b = arrays[first], arrays[second]
        if hashes_a is not None and hashes_b is not None:
            where = {digest: index for index, digest in enumerate(hashes_b)}
            pairs, how = [(i, where[d]) for i, d in enumerate(hashes_a) if d in where], "pixel for pixel"
        else:
            pairs, how = _identical_files(files[first], files[second]), "byte for byte"
        if pairs:
            i, j = pairs[0]
            problems.append(
                f"splits {first!r} and {second!r} hold {len(pairs)} identical image(s) ({how}), e.g. "
                f"{a.ids[i]!r}{_label_note(a, i)} = {b.ids[j]!r}{_label_note(b, j)}; "
                "kept, as in the data (drop them from one split for a clean test)"
            )
    return problems


def _content_hashes(images: ImageSet) -> list[bytes] | None:
    array = getattr(images, "images", None)
    if not isinstance(array, np.ndarray) or len(array) != len(images.ids):
        return None
    # The shape and dtype go into the hash so that equal bytes of differently shaped images never match.
    header = f"{array.shape[1:]}{array.dtype}".encode()
    return [hashlib.blake2b(header + np.ascontiguousarray(image).tobytes(), digest_size=16).digest() for image in array]


def _identical_files(files_a: list[str], files_b: list[str]) -> list[tuple[int, int]]:
    """(index in a, index in b) of byte-identical files under different paths (same paths are refused above).

    Only files whose size also occurs on the other side are read, so a folder of compressed images (JPEG, PNG)
    costs one stat per file and almost no reading: identical files have identical sizes, different ones rarely do.
    Uncompressed images of one shape all share a size, and are then read once each.
    """
    first_a, first_b = _first_index_by_path(files_a), _first_index_by_path(files_b)
    by_size_b: dict[int, list[str]] = {}
    for path in first_b:
        if (size := _size(path)) is not None:
            by_size_b.setdefault(size, []).append(path)
    content_b: dict[int, dict[bytes, str]] = {}  # per size, filled when an a file of that size first needs it
    pairs = []
    for path_a, index_a in first_a.items():
        size = _size(path_a)
        if size is None or size not in by_size_b:
            continue
        if size not in content_b:
            hashed = ((_file_digest(path), path) for path in by_size_b[size])
            content_b[size] = {key: path for key, path in hashed if key is not None}
        key = _file_digest(path_a)
        match = content_b[size].get(key) if key is not None else None
        if match is not None and match != path_a:
            pairs.append((index_a, first_b[match]))
    return pairs


def _first_index_by_path(files: list[str]) -> dict[str, int]:
    first: dict[str, int] = {}
    for index, key in enumerate(files):
        first.setdefault(key, index)
    return first


def _size(path: str) -> int | None:
    try:
        return Path(path).stat().st_size
    except OSError:
        return None  # a missing file is the reader's error to report, when the image is loaded


def _file_digest(path: str) -> bytes | None:
    try:
        with open(path, "rb") as handle:
            return hashlib.file_digest(handle, "blake2b").digest()
    except OSError:
        return None


def _label_note(images: ImageSet, index: int) -> str:
    if images.labels is None:
        return ""
    label = np.asarray(images.labels)[index]
    return f" (label {label.tolist()})"


def label_fraction_indices(labels: np.ndarray, fraction: float, seed: int, min_per_class: int = 2) -> np.ndarray:
    """Sorted indices of a stratified subset holding ``fraction`` of the samples.

    The total is ``round(fraction * N)``, shared out between classes in proportion to their size (largest
    remainders get the leftover samples); every class then gets at least ``min_per_class`` samples, or all
    of them when it has fewer, so the total can exceed the target slightly for tiny fractions. Each class
    is shuffled once per seed and its first samples are taken, so for one seed a smaller fraction is
    always a subset of a larger one (learning curves compare nested label sets).

    Multi-label ``(N, K)`` labels are sampled without stratification. ``fraction == 1`` returns all.
    """
    labels = np.asarray(labels)
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    n = len(labels)
    if fraction == 1 or n == 0:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(seed)
    if labels.ndim != 1:
        return np.sort(rng.permutation(n)[: max(1, round(fraction * n))]).astype(np.int64)
    classes, inverse = np.unique(labels, return_inverse=True)
    members = [np.flatnonzero(inverse == c) for c in range(len(classes))]
    counts = _allocate([len(m) for m in members], round(fraction * n), min_per_class)
    chosen = [rng.permutation(m)[:k] for m, k in zip(members, counts, strict=True)]
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def _allocate(class_sizes: list[int], total: int, min_per_class: int) -> list[int]:
    sizes = np.asarray(class_sizes)
    exact = sizes * total / sizes.sum()
    counts = np.floor(exact).astype(np.int64)
    # Largest-remainder rounding keeps the sum equal to the target total.
    leftover = total - int(counts.sum())
    counts[np.argsort(-(exact - counts), kind="stable")[:leftover]] += 1
    counts = np.maximum(counts, np.minimum(sizes, min_per_class))
    return [int(c) for c in np.minimum(counts, sizes)]


def patient_split(
    patient_ids: Sequence[str],
    labels: np.ndarray | None = None,
    fractions: Sequence[float] = (0.8, 0.2),
    seed: int = 0,
    names: Sequence[str] | None = None,
) -> dict[str, np.ndarray]:
    """Split sample indices into parts of roughly ``fractions`` so that no patient is in two parts.

    Uses scikit-learn's ``StratifiedGroupKFold``: the data are cut into ``k ≈ 1 / min(fractions)``
    patient-grouped, label-stratified folds and whole folds are assigned to each part, so the achieved
    fractions are multiples of ``1/k`` (exact for 0.8/0.2, 0.6/0.2/0.2; close for 0.7/0.15/0.15).
    Without labels (or with multi-label labels) folds are grouped but not stratified.

    Returns ``{name: sorted indices}``; names default to train/val (2 parts) or train/val/test (3 parts).
    """
    groups = np.asarray([str(p) for p in patient_ids])
    fractions = [float(f) for f in fractions]
    names = list(names) if names is not None else list(DEFAULT_SPLIT_NAMES.get(len(fractions), ()))
    _validate_split_args(groups, labels, fractions, names)
    n_groups = len(np.unique(groups))
    k = min(max(len(fractions), round(1 / min(fractions))), n_groups)
    folds_per_part = _folds_per_part(fractions, k)
    y = _stratification_target(labels, len(groups))
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # sklearn warns when a class has fewer members than folds; the split is still grouped and valid.
        warnings.simplefilter("ignore", UserWarning)
        fold_indices = [test for _, test in splitter.split(np.zeros(len(groups)), y, groups)]
    result, start = {}, 0
    for name, n_folds in zip(names, folds_per_part, strict=True):
        part = fold_indices[start : start + n_folds]
        result[name] = np.sort(np.concatenate(part)).astype(np.int64)
        start += n_folds
    return result


def _validate_split_args(
    groups: np.ndarray, labels: np.ndarray | None, fractions: list[float], names: list[str]
) -> None:
    if len(fractions) < 2 or any(f <= 0 for f in fractions) or not np.isclose(sum(fractions), 1.0):
        raise ValueError(f"fractions must be 2 or more positive numbers summing to 1, got {fractions}")
    if len(names) != len(fractions):
        raise ValueError(f"need one name per fraction, got names {names} for fractions {fractions}")
    if labels is not None and len(labels) != len(groups):
        raise ValueError(f"{len(groups)} patient ids but {len(labels)} labels")
    n_groups = len(np.unique(groups))
    if n_groups < len(fractions):
        raise ValueError(f"cannot split {n_groups} patient(s) into {len(fractions)} parts")


def _folds_per_part(fractions: list[float], k: int) -> list[int]:
    # Every part except the first gets round(f * k) folds (at least one); the first takes the rest.
    others = [max(1, round(f * k)) for f in fractions[1:]]
    while sum(others) > k - 1:
        others[int(np.argmax(others))] -= 1
    return [k - sum(others), *others]


def _stratification_target(labels: np.ndarray | None, n: int) -> np.ndarray:
    if labels is None or np.asarray(labels).ndim != 1:
        return np.zeros(n, dtype=np.int64)
    return np.unique(np.asarray(labels), return_inverse=True)[1]
