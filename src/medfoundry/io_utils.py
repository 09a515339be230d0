"""Atomic writes: a file or folder is either complete or absent, never half-written."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import glob
import hashlib
import json
import os
import re
import shlex
import shutil
import socket
import stat
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime
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


# Temporary names carry the writer's host and pid (".NAME.HOST-PID.RANDOM.tmp"), so a later writer of the same
# target can tell a killed writer's leftovers from a live writer's work in progress.
_HOST = socket.gethostname().replace(".", "_").replace("/", "_") or "host"
# Leftovers from other hosts (a shared file system) or without a parsable owner are removed only when this old.
_FOREIGN_STALE_S = 24 * 3600


def _temp_prefix(final: Path) -> str:
    return f".{final.name}.{_HOST}-{os.getpid()}."


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _temp_pattern(final: Path) -> re.Pattern[str]:
    # Only names this module makes: ".NAME.HOST-PID.RANDOM.tmp|old", and ".NAME.RANDOM.tmp" from before owners
    # were recorded (RANDOM: tempfile's 8 characters). Another target's temporaries (".NAME.json.....tmp") and
    # other tools' fixed names (the feature cache's resumable ".NAME.tmp") never match.
    return re.compile(rf"\.{re.escape(final.name)}\.(?:(?P<host>[^.]+)-(?P<pid>\d+)\.)?[a-z0-9_]{{8}}\.(?:tmp|old)")


def _is_stale(path: Path, match: re.Match[str]) -> bool:
    if match["host"] == _HOST:
        return not _pid_alive(int(match["pid"]))
    try:
        return time.time() - path.lstat().st_mtime > _FOREIGN_STALE_S
    except OSError:
        return False


def remove_stale_temps(final: Path) -> list[Path]:
    """Remove what killed writers of ``final`` left beside it (``.NAME.*.tmp`` files and folders, ``.NAME.*.old``
    folders); a live writer's temporaries stay. Returns what was removed."""
    final = Path(final)
    pattern = _temp_pattern(final)
    removed: list[Path] = []
    try:
        candidates = [(p, pattern.fullmatch(p.name)) for p in final.parent.glob(f".{glob.escape(final.name)}.*")]
    except OSError:
        return removed
    for path, match in candidates:
        if match is None or not _is_stale(path, match):
            continue
        with contextlib.suppress(OSError):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
    return removed


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; on success rename it over ``final`` in one step."""
    final = Path(final)
    ensure_writable_dir(final.parent)
    remove_stale_temps(final)
    fd, tmp_name = tempfile.mkstemp(dir=final.parent, prefix=_temp_prefix(final), suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp creates 0600 files; results and reports are meant to be shared like any file the user writes.
        # A missing tmp (a caller that renamed or removed it) is left to os.replace to report.
        with contextlib.suppress(FileNotFoundError):
            os.chmod(tmp, 0o666 & ~_current_umask())
        os.replace(tmp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _current_umask() -> int:
    # os.umask can only be read by setting it; it is set straight back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _share_like_umask(folder: Path) -> None:
    """Give ``folder`` and what is in it the permissions the user's umask allows: mkdtemp makes 0700 and
    safetensors writes 0600, which would hide a checkpoint from the colleagues the umask shares files with."""
    mask = _current_umask()
    os.chmod(folder, 0o777 & ~mask)
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            path = os.path.join(root, name)
            os.chmod(path, stat.S_IMODE(os.lstat(path).st_mode) | (0o777 & ~mask))
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):  # chmod would follow the link to a file that is not ours
                os.chmod(path, stat.S_IMODE(os.lstat(path).st_mode) | (0o666 & ~mask))


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where the system or the file
    system does not offer it."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):  # glibc before 2.28, musl
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``final``; on success it replaces ``final``.

    ``final`` is never missing: an existing folder is swapped with the new one in one step where the system allows
    (Linux), so a reader (or a kill) between two renames cannot find it gone. Elsewhere the old folder is moved
    aside under a unique name first, and a kill in between leaves it there, complete, for the user.
    """
    final = Path(final)
    ensure_writable_dir(final.parent)
    remove_stale_temps(final)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=_temp_prefix(final), suffix=".tmp"))
    try:
        yield tmp
        _share_like_umask(tmp)
        if final.exists() and _exchange(tmp, final):
            shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the previous folder
        elif final.exists():
            old = Path(tempfile.mkdtemp(dir=final.parent, prefix=_temp_prefix(final), suffix=".old"))
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


LOCK_FILE = ".medfoundry.lock"
# Folders this process holds, with how many nested output_lock calls hold each: a run that pre-trains and then
# evaluates into the same folder takes the lock at both levels.
_HELD: dict[Path, int] = {}


class FolderInUseError(OutputError):
    """Another live process writes into the same output folder."""

    def __init__(self, folder: Path, holder: dict[str, Any]) -> None:
        pid, command, host = (
            holder.get("pid", "?"),
            holder.get("command") or holder.get("what") or "?",
            holder.get("host"),
        )
        where = f" on {host}" if host and host != socket.gethostname() else ""
        since = f" since {holder['since']}" if holder.get("since") else ""
        super().__init__(
            f"{folder} is in use by pid {pid}{where} ({command}){since}; wait for it, stop it, or choose another "
            "output folder"
        )
        self.path = Path(folder)
        self.holder = holder


@contextlib.contextmanager
def output_lock(folder: Path | str, what: str) -> Iterator[Path]:
    """Hold an exclusive lock on output ``folder`` for the block: a second process (or job on a shared file system)
    writing into the same folder gets :class:`FolderInUseError` at once, naming the holder's pid, command and
    start time, instead of both running fully and interleaving their files.

    The lock is ``fcntl.flock`` on ``folder/.medfoundry.lock``, which the kernel releases when the holder dies, so
    a killed run never leaves the folder locked; the file (pid, host, command, ``what``, start time as JSON) is
    removed on release. Nested calls on the same folder in one process share the lock. Yields the folder.
    """
    folder = Path(folder)
    ensure_writable_dir(folder)
    key = folder.resolve()
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield folder
        finally:
            _HELD[key] -= 1
        return
    path = folder / LOCK_FILE
    handle = _acquire(path, folder)
    _HELD[key] = 1
    try:
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv and sys.argv[0] else what,
            "what": what,
            "since": datetime.now().astimezone().isoformat(timespec="seconds"),
        }
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(info) + "\n")
        handle.flush()
        yield folder
    finally:
        del _HELD[key]
        # Unlink while still holding the lock: a process that opens the name afterwards makes a new file and
        # takes the lock on that one (_acquire checks it locked the file the name points to).
        with contextlib.suppress(OSError):
            path.unlink()
        handle.close()


def _acquire(path: Path, folder: Path) -> Any:
    for _ in range(100):
        try:
            handle = path.open("a+", encoding="utf-8")
        except OSError as error:
            raise OutputError(f"cannot create the lock file ({error.strerror or error})", path) from None
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            text = handle.read()
            handle.close()
            try:
                holder = json.loads(text) if text.strip() else {}
            except json.JSONDecodeError:
                holder = {}
            raise FolderInUseError(folder, holder if isinstance(holder, dict) else {}) from None
        except OSError as error:  # a file system without locks
            handle.close()
            raise OutputError(f"cannot lock the output folder ({error.strerror or error})", path) from None
        try:
            same = os.fstat(handle.fileno()).st_ino == path.stat().st_ino
        except FileNotFoundError:
            same = False
        if same:
            return handle
        handle.close()  # the holder released and removed the file between our open and flock: try the new one
    raise OutputError("cannot take the output folder's lock (its lock file keeps changing)", path)


@contextlib.contextmanager
def output_folder(folder: Path | str, what: str) -> Iterator[Path]:
    """An output folder for one job: created if needed, checked writable, locked against a second job (see
    :func:`output_lock`), and removed again if the job fails before writing anything into a folder it created."""
    folder = Path(folder)
    created = not folder.exists()
    ensure_writable_dir(folder)
    try:
        with output_lock(folder, what):
            yield folder
    except BaseException:
        # A failed first attempt must not leave an empty folder that looks like a run to the next reader.
        if created and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
        raise
