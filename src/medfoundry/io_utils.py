"""Atomic writes: a file or folder is either complete or absent, never half-written."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from medfoundry.errors import MedfoundryError, OutputError


def ensure_writable_dir(path: Path) -> Path:
    """Create ``path`` if needed and check it can be written, with one clear error otherwise."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as error:
        raise OutputError(f"output folder is not writable ({error.strerror or error})", path) from None
    return path


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; on success rename it over ``final`` in one step."""
    final = Path(final)
    ensure_writable_dir(final.parent)
    fd, tmp_name = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp creates 0600 files; results and reports are meant to be shared like any file the user writes.
        os.chmod(tmp, 0o666 & ~_current_umask())
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def _current_umask() -> int:
    # os.umask can only be read by setting it; it is set straight back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``final``; on success it replaces ``final``."""
    final = Path(final)
    ensure_writable_dir(final.parent)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        yield tmp
        if final.exists():
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_text_atomic(path: Path, text: str) -> Path:
    """Write ``text`` via a synced temporary file and a rename; ``OutputError`` naming ``path`` if it cannot."""
    try:
        with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
    except OutputError as error:
        raise OutputError(f"cannot write file: {error}", path) from None
    except OSError as error:
        raise OutputError(f"cannot write file: {error.strerror or error}", path) from None
    return Path(path)


def write_json_atomic(path: Path, data: Any) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def hash_json(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_training_state(path: Path) -> dict[str, Any]:
    """A resumable training state written with ``torch.save``, read without pickle (``weights_only=True``)."""
    import torch  # here: the rest of this module is used where torch is not needed

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable checkpoint gets the same clear message
        raise MedfoundryError(f"cannot read training state ({error}); delete it to start over", path) from None
