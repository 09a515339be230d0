"""Atomic writes and the output-folder lock: never a missing folder, no leftovers from killed writers, one clear
line when another process writes into the same folder."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from medfoundry import io_utils
from medfoundry.errors import MedfoundryError
from medfoundry.io_utils import LOCK_FILE, FolderInUseError, atomic_dir, output_lock, write_text_atomic


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_atomic_dir_never_leaves_the_folder_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    final = tmp_path / "ckpt"
    with atomic_dir(final) as tmp:
        (tmp / "weights").write_text("old")
    # Every rename atomic_dir makes must leave the final folder in place (a reader or a kill can come at any time).
    replace = os.replace

    def checked_replace(src: str | os.PathLike, dst: str | os.PathLike) -> None:
        replace(src, dst)
        assert final.is_dir(), f"{final} missing after renaming {src} -> {dst}"

    monkeypatch.setattr(io_utils.os, "replace", checked_replace)
    with atomic_dir(final) as tmp:
        (tmp / "weights").write_text("new")
    assert (final / "weights").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no .ckpt.old or temporary left


def test_atomic_dir_follows_the_umask(tmp_path: Path) -> None:
    previous = os.umask(0o027)
    try:
        with atomic_dir(tmp_path / "out") as tmp:
            fd = os.open(tmp / "weights", os.O_WRONLY | os.O_CREAT, 0o600)  # as safetensors creates its file
            os.close(fd)
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o750
    assert stat.S_IMODE((tmp_path / "out" / "weights").stat().st_mode) == 0o640


def test_writes_remove_what_killed_writers_left(tmp_path: Path) -> None:
    target = tmp_path / "results.json"
    host = io_utils._HOST
    dead = tmp_path / f".results.json.{host}-{_dead_pid()}.abcd1234.tmp"
    empty = tmp_path / ".results.json.zz9xk2p1.tmp"  # the old naming, 0 bytes, from a run a day ago
    live = tmp_path / f".results.json.{host}-{os.getpid()}.live0001.tmp"  # a writer still at work
    other = tmp_path / f".other.json.{host}-{_dead_pid()}.abcd1234.tmp"  # another target's: not ours to judge
    resumable = tmp_path / ".results.json.tmp"  # the feature cache's fixed, resumable partial file
    for path in (dead, empty, live, other, resumable):
        path.write_text("" if path is empty else "partial")
    day_ago = time.time() - 2 * 24 * 3600
    for path in (empty, resumable):
        os.utime(path, (day_ago, day_ago))
    write_text_atomic(target, "{}")
    assert target.read_text() == "{}"
    assert not dead.exists() and not empty.exists()
    assert live.exists() and other.exists() and resumable.exists()

    folder = tmp_path / "ckpt"
    stale_dir = tmp_path / f".ckpt.{host}-{_dead_pid()}.x1y2z3w4.tmp"
    stale_dir.mkdir()
    (stale_dir / "model.safetensors").write_text("half")
    with atomic_dir(folder) as tmp:
        (tmp / "a").write_text("1")
    assert not stale_dir.exists()


_HOLDER = textwrap.dedent(
    """
    import sys
    from medfoundry.io_utils import output_lock
    with output_lock(sys.argv[1], "pretrain"):
        print("locked", flush=True)
        sys.stdin.readline()
    """
)


def test_output_lock_refuses_a_second_process_and_names_the_holder(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(FolderInUseError) as info, output_lock(folder, "suite"):
            pytest.fail("a second writer must not get the folder")
        message = str(info.value)
        assert message.startswith(f"{folder} is in use by pid {holder.pid} (")
        assert " since " in message and "\n" not in message
        assert isinstance(info.value, MedfoundryError) and info.value.path == folder
    finally:
        holder.communicate("\n", timeout=60)
    assert holder.returncode == 0
    assert not (folder / LOCK_FILE).exists()  # released and removed
    with output_lock(folder, "suite"):  # free again
        assert (folder / LOCK_FILE).is_file()


def test_output_lock_is_released_when_the_holder_is_killed(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    holder.kill()
    holder.wait(timeout=60)
    with output_lock(folder, "resume") as locked:  # the kernel dropped the dead process's lock
        assert locked == folder


def test_output_lock_nests_in_one_process(tmp_path: Path) -> None:
    with output_lock(tmp_path, "run"), output_lock(tmp_path, "pretrain"):
        info = (tmp_path / LOCK_FILE).read_text()
        assert str(os.getpid()) in info and socket.gethostname() in info and '"what": "run"' in info
    assert not (tmp_path / LOCK_FILE).exists()
