"""Reader for MedMNIST-style ``.npz`` files (official MedMNIST v2/v3 layout).

The file holds ``{split}_images`` and ``{split}_labels`` for any of the splits ``train``, ``val`` and
``test``. Images are returned channels first:

* ``(N, H, W)`` grayscale -> ``(N, 1, H, W)``
* ``(N, H, W, C)`` with ``C`` in (1, 3) -> ``(N, C, H, W)``
* ``(N, D, H, W)`` volume -> ``(N, 1, D, H, W)``
* ``(N, D, H, W, C)`` with ``C`` in (1, 3) -> ``(N, C, D, H, W)``

A 4-axis array is ambiguous (2D channels-last or 3D volume). The rule, in order: an explicit ``ndim``
(2 or 3 spatial axes) wins; otherwise a dataset name ending in ``3d`` (``organmnist3d``,
``nodulemnist3d_64``) means 3D; otherwise a last axis of 1 or 3 means 2D channels-last (a real volume
is never 1 or 3 voxels wide), and anything else is a 3D volume.
"""

from __future__ import annotations

import re
import zipfile
import zlib
from pathlib import Path

import numpy as np

from medfoundry.data.sample import ArrayImageSet, Splits
from medfoundry.errors import DataError

SPLITS = ("train", "val", "test")
_CHANNEL_SIZES = (1, 3)
# The size suffix ("_64") is stripped before looking for "3d", so official sized files are recognised.
_NAME_3D = re.compile(r"3d(_\d+)?$", re.IGNORECASE)
# How many offending indices an error message lists before it stops.
_MAX_LISTED = 5


def load_medmnist_npz(
    path: str | Path,
    name: str | None = None,
    *,
    ndim: int | None = None,
    allow_constant_images: bool = False,
) -> Splits:
    """Load a MedMNIST ``.npz`` file into ``{"train": ImageSet, "val": ..., "test": ...}``.

    Only the splits present in the file are returned (at least one must be). Labels ``(N,)`` or
    ``(N, 1)`` become ``(N,)`` int64; ``(N, K)`` with ``K > 1`` stays a multi-label ``(N, K)`` int64 array.

    MedMNIST has no patient ids, so ``patient_ids`` equals the sample ids ``"{split}_{i:05d}"``. A
    patient-level split is therefore impossible with these files; the official splits are used as given.
    ``load_dataset`` compares them pixel for pixel and warns about images found in two splits (the official
    BreastMNIST has one: ``train_00115``, label 0, is ``test_00076``, label 1).

    Args:
        path: the ``.npz`` file.
        name: dataset name (default: the file stem, e.g. ``breastmnist``); a name ending in ``3d``
            makes 4-axis images 3D volumes.
        ndim: number of spatial axes (2 or 3) when the image shape is ambiguous.
        allow_constant_images: accept images whose pixels are all equal; by default they raise,
            because they usually mean a broken export and silently poison training.

    Raises:
        DataError: missing, corrupt or malformed file; NaN/inf values; negative labels; complex-valued images or
            labels; constant images.
    """
    path = Path(path)
    if ndim not in (None, 2, 3):
        raise DataError(f"ndim must be 2 or 3 spatial axes, got {ndim}", path)
    name = name or path.stem
    archive = _open_npz(path)
    with archive:
        present = [split for split in SPLITS if f"{split}_images" in archive.files]
        if not present:
            expected = ", ".join(f"{s}_images/{s}_labels" for s in SPLITS)
            found = ", ".join(archive.files) or "none"
            raise DataError(f"no MedMNIST keys ({expected}) found; keys in the file: {found}", path)
        is_3d = _declared_3d(name, ndim)
        splits: Splits = {}
        for split in present:
            images, labels = _read_split(archive, split, path)
            images = _channels_first(images, is_3d, split, path)
            _check_images(images, split, path, allow_constant_images)
            ids = [f"{split}_{i:05d}" for i in range(len(images))]
            splits[split] = ArrayImageSet(
                name=f"{name}:{split}",
                source=path,
                images=images,
                ids=ids,
                patient_ids=list(ids),
                labels=labels,
            )
    return splits


def _declared_3d(name: str, ndim: int | None) -> bool | None:
    """True/False when ``ndim`` or the name settles 2D vs 3D; None leaves it to the shape heuristic."""
    if ndim is not None:
        return ndim == 3
    if _NAME_3D.search(name):
        return True
    return None


def _open_npz(path: Path) -> np.lib.npyio.NpzFile:
    if not path.is_file():
        raise DataError("file not found" if not path.exists() else "is not a file", path)
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"not a readable .npz archive ({_short(exc)})", path) from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError("is a single .npy array, not an .npz archive with split keys", path)
    return archive


def _read_array(archive: np.lib.npyio.NpzFile, key: str, path: Path) -> np.ndarray:
    # Members are decompressed lazily, so corruption inside the zip only shows up here.
    try:
        return archive[key]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise DataError(f"cannot read array {key!r}, the file is corrupt ({_short(exc)})", path) from exc


def _read_split(archive: np.lib.npyio.NpzFile, split: str, path: Path) -> tuple[np.ndarray, np.ndarray]:
    if f"{split}_labels" not in archive.files:
        raise DataError(f"has {split}_images but no {split}_labels", path)
    images = _read_array(archive, f"{split}_images", path)
    labels = _read_array(archive, f"{split}_labels", path)
    if len(images) != len(labels):
        raise DataError(f"split {split!r} has {len(images)} images but {len(labels)} labels", path)
    if len(images) == 0:
        raise DataError(f"split {split!r} has no images", path)
    return images, _normalise_labels(labels, split, path)


def _normalise_labels(labels: np.ndarray, split: str, path: Path) -> np.ndarray:
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim not in (1, 2):
        raise DataError(f"{split}_labels has shape {labels.shape}; expected (N,), (N, 1) or (N, K)", path)
    if (not np.issubdtype(labels.dtype, np.number) and labels.dtype != np.bool_) or np.iscomplexobj(labels):
        raise DataError(f"{split}_labels has non-numeric or complex dtype {labels.dtype}", path)
    if np.issubdtype(labels.dtype, np.floating):
        _check_finite(labels, f"{split}_labels", path)
        if not np.array_equal(labels, np.round(labels)):
            bad = _first_indices(np.any((labels != np.round(labels)).reshape(len(labels), -1), axis=1))
            raise DataError(f"{split}_labels are not whole numbers (first at index {bad})", path)
    # Class indices and 0/1 label columns are never negative; a -1 (a common "unknown" marker) would index the
    # last class, and a negative count breaks every per-class tally downstream.
    negative = (labels < 0).reshape(len(labels), -1).any(axis=1)
    if negative.any():
        first = int(np.flatnonzero(negative)[0])
        raise DataError(
            f"{split}_labels has {int(negative.sum())} negative label(s), first {labels[first].tolist()} at "
            f"index {first}; labels must be class indices 0, 1, ... (or 0/1 columns)",
            path,
        )
    return labels.astype(np.int64)


def _channels_first(images: np.ndarray, is_3d: bool | None, split: str, path: Path) -> np.ndarray:
    shape = images.shape
    if images.ndim == 3 and not is_3d:
        return images[:, None]
    if images.ndim == 4:
        if is_3d is None:
            # Heuristic: a volume is never 1 or 3 voxels wide, a 2D image often has 1 or 3 channels.
            is_3d = shape[-1] not in _CHANNEL_SIZES
        if is_3d:
            return images[:, None]
        if shape[-1] in _CHANNEL_SIZES:
            return np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    if images.ndim == 5 and is_3d is not False and shape[-1] in _CHANNEL_SIZES:
        return np.ascontiguousarray(images.transpose(0, 4, 1, 2, 3))
    kind = {None: "", True: " for 3D data", False: " for 2D data"}[is_3d]
    raise DataError(
        f"{split}_images has unsupported shape {shape}{kind}; expected (N,H,W), (N,H,W,1|3), "
        "(N,D,H,W) or (N,D,H,W,1|3)",
        path,
    )


def _check_images(images: np.ndarray, split: str, path: Path, allow_constant: bool) -> None:
    if images.dtype == np.bool_ or not np.issubdtype(images.dtype, np.number):
        raise DataError(f"{split}_images has non-numeric dtype {images.dtype}", path)
    if np.iscomplexobj(images):
        # Casting to float would silently drop the imaginary part (e.g. raw k-space saved instead of magnitudes).
        raise DataError(f"{split}_images is complex-valued ({images.dtype}); save magnitudes (np.abs) instead", path)
    if np.issubdtype(images.dtype, np.floating):
        _check_finite(images, f"{split}_images", path)
    if allow_constant:
        return
    flat = images.reshape(len(images), -1)
    constant = flat.min(axis=1) == flat.max(axis=1)
    if constant.any():
        raise DataError(
            f"{split}_images has {int(constant.sum())} constant image(s) (all pixels equal), first at "
            f"indices {_first_indices(constant)}; pass allow_constant_images=True to accept them",
            path,
        )


def _check_finite(values: np.ndarray, key: str, path: Path) -> None:
    finite = np.isfinite(values).reshape(len(values), -1).all(axis=1)
    if not finite.all():
        first = int(np.flatnonzero(~finite)[0])
        raise DataError(f"{key} contains NaN or inf values (first at index {first})", path)


def _first_indices(mask: np.ndarray) -> list[int]:
    return [int(i) for i in np.flatnonzero(mask)[:_MAX_LISTED]]


def _short(exc: BaseException) -> str:
    # Keep error messages on one line even when the underlying exception text spans several.
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:200]
