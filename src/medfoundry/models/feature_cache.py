"""The one cache of encoder features, for images and slides: HDF5 files keyed by weights, preprocessing and data.

Image embeddings (:func:`medfoundry.models.features.embed`) and slide embeddings
(:func:`medfoundry.wsi.embedding.embed_slide`) both read, check and write their files here.

* **Key**: the attributes ``weights_hash`` (the encoder's tensors), ``preprocessing_hash`` (how pixels become the
  encoder's input) and ``data_hash`` (which samples or tiles, in order). A file is reused only when all three
  match and ``features`` and every required row-aligned dataset hold one row per sample. Anything else (other
  weights or data, a file of an older layout without these attributes, a damaged or short file) is recomputed,
  with a log line saying why; a cache is never an error.
* **Layout**: ``features`` (N x D float32) beside row-aligned datasets: ``ids``, ``patient_ids`` and ``labels``
  for images; ``coords`` for slides (the names TRIDENT and CLAM use); the key and descriptive attributes
  (``preprocessing`` as JSON, ``embed_dim``, ...) on the file.
* **Writing**: rows stream into ``.<name>.tmp`` beside the output, which is synced and renamed only once every
  row is there, so no half-written file is ever read as a result. The temp name is fixed, so one left by a killed
  run is found and replaced by the next write instead of piling up.
* **Shards** (torchrun): each rank writes ``<name>.part<rank>-of-<world>`` keyed with its row range, so a part
  left by an interrupted run is reused; rank 0 concatenates the parts in rank order into the very file one
  process writes, then removes them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from medfoundry.distributed import DistEnv
from medfoundry.errors import DataError
from medfoundry.io_utils import ensure_writable_dir, hash_json

log = logging.getLogger("medfoundry.features")

KEY_ATTRS = ("weights_hash", "preprocessing_hash", "data_hash")
#: Row-aligned datasets: a column is a numeric array or a list of strings, one entry per row of ``features``.
Columns = Mapping[str, np.ndarray | Sequence[str] | None]


def cache_key(weights_hash: str, preprocessing: Mapping[str, Any], data_hash: str) -> dict[str, str]:
    """The attributes a file must carry to be reused for these weights, preprocessing and data."""
    return {"weights_hash": weights_hash, "preprocessing_hash": hash_json(preprocessing), "data_hash": data_hash}


def describe(preprocessing: Mapping[str, Any], embed_dim: int) -> dict[str, Any]:
    """Attributes that say what the key hashes, for people and other tools (never compared)."""
    return {"preprocessing": json.dumps(preprocessing, sort_keys=True), "embed_dim": int(embed_dim)}


def array_hash(*arrays: np.ndarray, extra: Any = None) -> str:
    """A 16-hex-digit hash of arrays' dtypes, shapes and bytes (and of ``extra``, any JSON value)."""
    digest = hashlib.sha256()
    for array in arrays:
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.tobytes())
    digest.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def temp_path(final: Path) -> Path:
    """The one temp name per output (see the module docstring)."""
    return final.with_name(f".{final.name}.tmp")


def part_path(out_path: Path, env: DistEnv) -> Path:
    """Where rank ``env.rank`` writes its shard of ``out_path`` before rank 0 merges the parts."""
    return out_path.with_name(f"{out_path.name}.part{env.rank}-of-{env.world_size}")


def is_current(path: Path, key: Mapping[str, Any], rows: int, required: Sequence[str] = ()) -> bool:
    """Whether ``path`` is a complete features file for ``key``, with ``rows`` rows in ``features`` and in each
    dataset of ``required``; logs why a file that exists is not."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        with h5py.File(path, "r") as h5:
            changed = [name for name, value in key.items() if not _same(h5.attrs.get(name), value)]
            if changed:
                log.info("%s: stale cache (%s changed or absent), recomputing", path, ", ".join(changed))
                return False
            short = [name for name in ("features", *required) if name not in h5 or len(h5[name]) != rows]
    except (OSError, KeyError, TypeError) as error:
        log.warning("%s: unreadable features file (%s), recomputing", path, error)
        return False
    if short:
        log.warning("%s: %s missing or not %d rows long, recomputing", path, ", ".join(short), rows)
        return False
    return True


def _same(stored: Any, wanted: Any) -> bool:
    if isinstance(stored, bytes):
        stored = stored.decode()
    if isinstance(wanted, float):
        return stored is not None and abs(float(stored) - wanted) < 1e-9
    return bool(stored == wanted)


class RowWriter:
    """Appends feature rows to an open ``features`` dataset, in order."""

    def __init__(self, dataset: h5py.Dataset) -> None:
        self.dataset = dataset
        self.row = 0

    def append(self, values: np.ndarray) -> None:
        self.dataset[self.row : self.row + len(values)] = values
        self.row += len(values)


@contextlib.contextmanager
def writing(
    path: Path, rows: int, dim: int, attrs: Mapping[str, Any], columns: Columns | None = None
) -> Iterator[RowWriter]:
    """Open ``path``'s temp file with ``features`` (rows x dim) and ``columns``; yield a writer for the features;
    on a clean exit with every row written, set ``attrs``, sync and rename onto ``path``."""
    path = Path(path)
    ensure_writable_dir(path.parent)
    tmp = temp_path(path)
    tmp.unlink(missing_ok=True)
    try:
        with h5py.File(tmp, "w") as h5:
            writer = RowWriter(h5.create_dataset("features", shape=(rows, dim), dtype=np.float32))
            for name, values in (columns or {}).items():
                if values is not None:
                    _put(h5, name, values)
            yield writer
            if writer.row != rows:
                raise DataError(f"{writer.row} feature rows written, {rows} expected", path)
            for name, value in attrs.items():
                h5.attrs[name] = value
        with open(tmp, "rb+") as handle:  # noqa: PTH123 - fsync needs a file descriptor
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write(path: Path, features: np.ndarray, attrs: Mapping[str, Any], columns: Columns | None = None) -> None:
    """Write a whole features array (and its columns) atomically."""
    with writing(path, len(features), int(features.shape[1]), attrs, columns) as writer:
        writer.append(features)


def _put(h5: h5py.File, name: str, values: np.ndarray | Sequence[str]) -> None:
    # Sequences are string columns even when empty (an empty shard), where numpy would guess float.
    if not isinstance(values, np.ndarray) or values.dtype.kind in "USO":
        strings = np.asarray([str(v) for v in values], dtype=object)
        h5.create_dataset(name, data=strings, shape=(len(strings),), dtype=h5py.string_dtype())
    else:
        h5.create_dataset(name, data=values)


def read(path: Path, required: Sequence[str] = ("features",)) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every dataset and the attributes of a features file; string datasets as lists of str.

    Raises:
        DataError: not an HDF5 file, or a ``required`` dataset is missing (a file of another layout).
    """
    try:
        with h5py.File(path, "r") as h5:
            missing = [name for name in required if name not in h5]
            if missing:
                raise DataError(
                    f"features file lacks dataset(s) {', '.join(missing)} (has {', '.join(sorted(h5)) or 'none'}); "
                    "it was written by another tool or an older layout: delete it to recompute",
                    path,
                )
            datasets = {name: _value(h5[name]) for name in h5 if isinstance(h5[name], h5py.Dataset)}
            attrs = dict(h5.attrs)
    except (OSError, KeyError) as error:
        raise DataError(f"not a readable features file ({error})", path) from None
    return datasets, attrs


def _value(dataset: h5py.Dataset) -> Any:
    values = dataset[()]
    if h5py.check_string_dtype(dataset.dtype) is not None or values.dtype.kind in "SO":
        return [v.decode() if isinstance(v, bytes) else str(v) for v in values]
    return values


def merge_parts(
    out_path: Path,
    env: DistEnv,
    attrs: Mapping[str, Any],
    check: Callable[[dict[str, Any], Path], None] | None = None,
) -> None:
    """Rank 0: every rank's part, in rank order, into the one file a single process writes; then the parts go.

    ``check`` sees the merged datasets before anything is written and raises if they are not what was asked for.
    """
    parts = [part_path(out_path, DistEnv(rank, env.world_size)) for rank in range(env.world_size)]
    shards = [read(path)[0] for path in parts]
    merged: dict[str, Any] = {}
    for name in shards[0]:
        pieces = [shard[name] for shard in shards]
        merged[name] = [v for piece in pieces for v in piece] if isinstance(pieces[0], list) else np.concatenate(pieces)
    if check is not None:
        check(merged, parts[0])
    features = merged.pop("features")
    write(out_path, features, attrs, merged)
    for path in parts:
        path.unlink()
