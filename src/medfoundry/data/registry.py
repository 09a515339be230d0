"""Open any supported dataset from one spec string: ``"medmnist:PATH"``, ``"csv:PATH"``, ``"idrid:PATH"``, ...

Without a prefix the reader is chosen from the path: a registered file suffix (``.npz``, ``.csv``) or a
directory. New formats (DICOM, NIfTI, WSI tiles) plug in with :func:`register_reader`::

    @register_reader("nifti", suffixes=(".nii", ".nii.gz"))
    def _read_nifti(path: Path, **kwargs: Any) -> Splits: ...
"""

from __future__ import annotations

import inspect
import re
import typing
from collections.abc import Callable, Mapping
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
from medfoundry.data.splits import check_disjoint
from medfoundry.data.wsi import SLIDE_SUFFIXES, load_wsi_tiles
from medfoundry.errors import DataError, one_line

Reader = Callable[..., Splits]

# Two or more characters before the colon, so a Windows drive letter ("C:\\data") is never a prefix.
_PREFIX = re.compile(r"^(?P<prefix>[A-Za-z][A-Za-z0-9_-]+):(?P<path>.+)$")
_UNEXPECTED = re.compile(r"unexpected keyword argument '(?P<key>\w+)'")


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


def load_dataset(spec: str | Path, *, allow_split_overlap: bool = False, **kwargs: Any) -> Splits:
    """Load the dataset named by ``spec`` (``"prefix:PATH"`` or a plain path); kwargs go to the reader.

    Every entry point (CLI, suites, ``run``, probes) comes through here, so the input rules live here:

    * an option the reader does not take, or a value of the wrong type, is a one-line DataError naming the option
      and the reader's known options, before anything is read (:func:`check_reader_options`);
    * whatever the reader raises on a malformed file (OSError, ValueError, Pillow / nibabel / pydicom errors)
      becomes one line naming the file (:func:`medfoundry.errors.one_line`);
    * every dataset goes through :func:`~medfoundry.data.splits.check_disjoint`: splits sharing a patient, a
      sample id or an image file are refused unless ``allow_split_overlap=True`` (then a warning).
    """
    reader, path = resolve_reader(spec)
    declared, declaring = check_reader_options(reader, kwargs)
    with one_line(path, f"{reader.prefix} dataset"):
        try:
            splits = reader.read(path, **kwargs)
        except TypeError as error:
            # An open **kwargs is checked only where it ends up, when called (e.g. dicom's crop options).
            match = _UNEXPECTED.search(str(error))
            if match is None or match["key"] not in kwargs:
                raise
            raise _unknown_option(match["key"], reader.prefix, declared, declaring) from None
    check_disjoint(splits, path, allow_overlap=allow_split_overlap)
    return splits


def check_reader_options(reader: ReaderSpec, options: Mapping[str, Any]) -> tuple[dict[str, Any], Callable[..., Any]]:
    """DataError for an option ``reader`` does not take or a value that does not fit its type hint.

    Returns the declared options (name -> type hint) and the function that declares them. A reader whose options
    end in an open ``**kwargs`` has the rest checked when called.
    """
    declaring, complete = declaring_function(reader.read)
    declared = {**_keyword_options(load_dataset), **_keyword_options(declaring)}
    for key, value in options.items():
        if key not in declared and complete:
            raise _unknown_option(key, reader.prefix, declared, None)
        if key in declared and (problem := _type_problem(value, declared[key])):
            raise DataError(f"option {key} for reader {reader.prefix}: {value!r} {problem}")
    return declared, declaring


def declaring_function(read: Callable[..., Any]) -> tuple[Callable[..., Any], bool]:
    """The function whose signature lists a reader's options, and whether that list is complete (no ``**kwargs``).

    The registered readers are one-line ``(path, **kwargs)`` forwarders to the loader that declares the
    options, so a forwarder is followed to the one module-level function it calls.
    """
    for _ in range(3):
        params = list(inspect.signature(read).parameters.values())[1:]  # [0] is the path
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            return read, True
        if any(p.kind is not p.VAR_KEYWORD for p in params):
            return read, False  # named options plus **kwargs that go on to other functions
        callees = [
            f
            for name in getattr(getattr(read, "__code__", None), "co_names", ())
            if inspect.isfunction(f := getattr(read, "__globals__", {}).get(name))
        ]
        if len(callees) != 1:
            return read, False
        read = callees[0]
    return read, False


def _keyword_options(function: Callable[..., Any]) -> dict[str, Any]:
    """Name -> type hint (``Any`` when unresolvable) of the parameters after the first that take a keyword."""
    try:
        hints = typing.get_type_hints(function)
    except (NameError, TypeError):  # a hint imported only for type checkers
        hints = {}
    params = list(inspect.signature(function).parameters.values())[1:]
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name: hints.get(p.name, Any) for p in params if p.kind in kinds}


def _type_problem(value: Any, hint: Any) -> str | None:
    """Why ``value`` does not fit ``hint`` (e.g. "is not a valid integer"), or None when it fits."""
    from pydantic import TypeAdapter, ValidationError
    from pydantic.errors import PydanticUserError

    if hint is Any:
        return None
    try:
        TypeAdapter(hint).validate_python(value)
    except ValidationError as error:
        return f"does not fit {_hint_text(hint)} ({error.errors()[0]['msg']})"
    except PydanticUserError:  # a hint pydantic cannot check: left to the reader
        return None
    return None


def _hint_text(hint: Any) -> str:
    return re.sub(
        r"\b(typing|pathlib|collections\.abc)\.",
        "",
        str(hint) if typing.get_origin(hint) else getattr(hint, "__name__", str(hint)),
    )


def _unknown_option(key: str, prefix: str, known: dict[str, Any], passes_on: Callable[..., Any] | None) -> DataError:
    listed = ", ".join(known)
    if passes_on is not None:
        listed += f", and those that {passes_on.__name__} passes on (see its docstring)"
    return DataError(f"unknown option {key} for reader {prefix}; known: {listed}")


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
