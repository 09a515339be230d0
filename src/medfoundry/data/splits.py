"""Label-fraction subsets and patient-grouped splits, both deterministic per seed."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

DEFAULT_SPLIT_NAMES = {2: ("train", "val"), 3: ("train", "val", "test")}


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
