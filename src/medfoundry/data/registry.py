"""Open any supported dataset from one spec string: ``"medmnist:PATH"``, ``"csv:PATH"``, ``"idrid:PATH"``, ...

Without a prefix the reader is chosen from the path: a registered file suffix (``.npz``, ``.csv``) or a
directory. New formats (DICOM, NIfTI, WSI tiles) plug in with :func:`register_reader`::

    @register_reader("nifti", suffixes=(".nii", ".nii.gz"))
    def _read_nifti(path: Path, **kwargs: Any) -> Splits: ...
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medfoundry.data.dicom import load_dicom_crops
from medfoundry.data.idrid import load_idrid
from medfoundry.data.manifest import load_image_folder, load_manifest
from medfoundry.data.medmnist import load_medmnist_npz
from medfoundry.data.nifti import SUFFIXES as NIFTI_SUFFIXES
from medfoundry.data.nifti import load_nifti_crops
from medfoundry.data.sample import Splits
from medfoundry.data.wsi import SLIDE_SUFFIXES, load_wsi_tiles
from medfoundry.errors import DataError

Reader = Callable[..., Splits]

# Two or more characters before the colon, so a Windows drive letter ("C:\\data") is never a prefix.
_PREFIX = re.compile(r"^(?P<prefix>[A-Za-z][A-Za-z0-9_-]+):(?P<path>.+)$")


@dataclass(frozen=True)
class ReaderSpec:
    """A registered reader: its prefix, the function, and how to recognise its inputs without a prefix."""

    prefix: str
    read: Reader
    suffixes: tuple[str, ...] = ()
    directories: bool = False


READERS: dict[str, ReaderSpec] = {}


def register_reader(
    prefix: str, *, suffixes: tuple[str, ...] = (), directories: bool = False
) -> Callable[[Reader], Reader]:
    """Decorator registering ``reader(path, **kwargs) -> Splits`` under ``prefix``.

    ``suffixes`` (lower case, with the dot, may be compound like ``.nii.gz``) and ``directories`` let
    :func:`load_dataset` pick this reader for unprefixed paths.
    """

    def decorate(reader: Reader) -> Reader:
        if prefix in READERS:
            raise ValueError(f"a reader for prefix {prefix!r} is already registered")
        READERS[prefix] = ReaderSpec(prefix, reader, tuple(s.lower() for s in suffixes), directories)
        return reader

    return decorate


def load_dataset(spec: str | Path, **kwargs: Any) -> Splits:
    """Load the dataset named by ``spec`` (``"prefix:PATH"`` or a plain path); kwargs go to the reader."""
    reader, path = resolve_reader(spec)
    return reader.read(path, **kwargs)


def resolve_reader(spec: str | Path) -> tuple[ReaderSpec, Path]:
    """The reader and path for ``spec``; DataError listing the known prefixes when none fits."""
    if isinstance(spec, str) and (match := _PREFIX.match(spec)):
        prefix = match["prefix"].lower()
        if prefix not in READERS:
            raise DataError(f"unknown dataset prefix {prefix!r} in {spec!r}; known prefixes: {_known()}")
        return READERS[prefix], Path(match["path"]).expanduser()
    path = Path(spec).expanduser()
    return _infer_reader(path), path


def _infer_reader(path: Path) -> ReaderSpec:
    if not path.exists():
        raise DataError("dataset not found (no such file or folder)", path)
    for reader in READERS.values():
        if path.is_dir() and reader.directories:
            return reader
        if path.is_file() and reader.suffixes and path.name.lower().endswith(reader.suffixes):
            return reader
    raise DataError(f"cannot tell the dataset format; name it with a prefix, one of: {_known()}", path)


def _known() -> str:
    return ", ".join(f"{p}:" for p in sorted(READERS))


@register_reader("medmnist", suffixes=(".npz",))
def _read_medmnist(path: Path, **kwargs: Any) -> Splits:
    return load_medmnist_npz(path, **kwargs)


@register_reader("csv", suffixes=(".csv",))
def _read_csv(path: Path, **kwargs: Any) -> Splits:
    return load_manifest(path, **kwargs)


@register_reader("folder", directories=True)
def _read_folder(path: Path, **kwargs: Any) -> Splits:
    return load_image_folder(path, **kwargs)


@register_reader("wsi", suffixes=SLIDE_SUFFIXES)
def _read_wsi(path: Path, **kwargs: Any) -> Splits:
    return load_wsi_tiles(path, **kwargs)


# Folders of volumes need the prefix ("nifti:scans/"): an unprefixed folder stays the image-folder reader's.
@register_reader("nifti", suffixes=NIFTI_SUFFIXES)
def _read_nifti(path: Path, **kwargs: Any) -> Splits:
    return load_nifti_crops(path, **kwargs)


# Needs the prefix ("dicom:FOLDER"): a folder of slices or of series folders.
@register_reader("dicom")
def _read_dicom(path: Path, **kwargs: Any) -> Splits:
    return load_dicom_crops(path, **kwargs)


# Needs the prefix ("idrid:PATH"): an unprefixed folder stays the image-folder reader's.
@register_reader("idrid")
def _read_idrid(path: Path, **kwargs: Any) -> Splits:
    return load_idrid(path, **kwargs)
