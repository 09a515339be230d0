"""Many slides, many machines: per-slide claims so that torchrun ranks and independent jobs share one output folder.

Every worker (a torchrun rank, a SLURM array task, or any process started on the same folder) walks the same
sorted list of slides, each from its own offset, and does a slide only after claiming it: an atomic
``O_CREAT | O_EXCL`` lock file ``<out>/.locks/<slide>.lock`` holding the claimant's host, pid and a random token.
While the slide runs, a thread touches the lock every ``heartbeat_s`` seconds. A slide whose lock is held is left
to its holder and visited again once the worker's own share is done, so every worker returns only when every slide
is finished; a lock whose holder is dead is taken over (same host: the pid is gone; any host: no heartbeat for
``stale_after_s`` seconds, which also covers a hung node on a shared file system). Outputs are written atomically,
so a slide is either done or absent, and the slide's own code decides whether a finished output can be reused.

Where a worker starts: worker ``p`` of ``P`` (``P`` = shards x ranks) starts at slide ``p * N // P``, so with no
failures every slide is claimed once, at the first try, and workers only meet at the end of their shares.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from medfoundry.distributed import DistEnv, gather_objects
from medfoundry.errors import MedfoundryError, OutputError
from medfoundry.io_utils import _pid_alive

log = logging.getLogger("medfoundry.wsi")

T = TypeVar("T")

LOCKS_DIR = ".locks"
# The heartbeat must come well within the stale limit: a busy shared file system can delay a touch by seconds.
HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0
POLL_S = 2.0


@dataclass(frozen=True)
class Shard:
    """This job's place among ``count`` independent jobs sharing one output folder (``index`` from 0)."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise MedfoundryError(f"shard {self.index}/{self.count}: need 0 <= index < count")

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"i/n"``: job ``i`` (from 0) of ``n``."""
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if match is None:
            raise MedfoundryError(f"--shard {text!r}: expected INDEX/COUNT, e.g. 0/8")
        return cls(int(match[1]), int(match[2]))

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Shard:
        """The SLURM job-array task (``SLURM_ARRAY_TASK_ID`` less ``SLURM_ARRAY_TASK_MIN``, of
        ``SLURM_ARRAY_TASK_COUNT``), or the single shard outside an array."""
        env = os.environ if environ is None else environ
        if "SLURM_ARRAY_TASK_ID" not in env or "SLURM_ARRAY_TASK_COUNT" not in env:
            return cls()
        try:
            task, count = int(env["SLURM_ARRAY_TASK_ID"]), int(env["SLURM_ARRAY_TASK_COUNT"])
            first = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        except ValueError:
            raise MedfoundryError("SLURM_ARRAY_TASK_ID / _COUNT / _MIN are not integers") from None
        # A sparse array (--array=0,5,10) has ids beyond its count: the offset only has to differ between tasks.
        return cls((task - first) % max(count, 1), max(count, 1))


def resolve_shard(shard: str | Shard | None) -> Shard:
    if isinstance(shard, Shard):
        return shard
    return Shard.parse(shard) if shard else Shard.from_env()


def worker_position(shard: Shard, env: DistEnv) -> tuple[int, int]:
    """This process's place among all workers: ranks within a job, jobs side by side."""
    return shard.index * env.world_size + env.rank, shard.count * env.world_size


def start_order(count: int, position: int, workers: int) -> list[int]:
    """Indices ``0..count-1`` starting at worker ``position``'s offset and wrapping around."""
    start = position * count // max(workers, 1) if count else 0
    return [(start + step) % count for step in range(count)]


@dataclass
class Claim:
    """A slide this process holds; the heartbeat thread keeps the lock fresh until :meth:`release`."""

    path: Path
    token: str
    _stop: threading.Event
    _thread: threading.Thread

    def release(self) -> None:
        self._stop.set()
        self._thread.join()
        holder = _read_lock(self.path)
        if holder.get("token") == self.token:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        else:
            log.warning("%s: the claim was taken over by another process while this one worked on it", self.path.stem)


def _read_lock(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _heartbeat(path: Path, stop: threading.Event, every: float) -> None:
    while not stop.wait(every):
        with contextlib.suppress(OSError):
            os.utime(path)


def stale_reason(path: Path, holder: dict[str, Any], stale_after_s: float, now: float | None = None) -> str | None:
    """Why the lock at ``path`` is dead (its holder gone, or silent too long), or None while it is live."""
    try:
        age = (time.time() if now is None else now) - path.stat().st_mtime
    except FileNotFoundError:
        return None
    pid, host = holder.get("pid"), holder.get("host")
    if host == socket.gethostname() and isinstance(pid, int) and not _pid_alive(pid):
        return f"its holder, pid {pid}, is gone"
    if age > stale_after_s:
        # Also a lock still empty (its writer died between creating and filling it) or from another host.
        return f"no heartbeat for {age:.0f} s (pid {pid} on {host})"
    return None


class SlideLocks:
    """The claim files of one output folder."""

    def __init__(self, out_dir: Path, heartbeat_s: float = HEARTBEAT_S, stale_after_s: float = STALE_AFTER_S) -> None:
        self.folder = Path(out_dir) / LOCKS_DIR
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise OutputError(f"cannot create the lock folder ({error.strerror or error})", self.folder) from None
        self.heartbeat_s = heartbeat_s
        self.stale_after_s = stale_after_s

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.lock"

    def try_claim(self, name: str, say: Callable[[str], None]) -> Claim | None:
        """Claim ``name``, taking over a dead holder's lock; None while a live process holds it."""
        path = self.path(name)
        claim = self._create(path)
        if claim is not None:
            return claim
        holder = _read_lock(path)
        if stale_reason(path, holder, self.stale_after_s) is None:
            return None
        # Takeovers are serialised by one flock, and the lock is judged again inside it: two processes that both
        # found it stale must not both remove it (the second would remove the first one's new lock).
        self.folder.mkdir(parents=True, exist_ok=True)
        with (self.folder / ".takeover").open("a") as guard:
            fcntl.flock(guard.fileno(), fcntl.LOCK_EX)
            holder = _read_lock(path)
            reason = stale_reason(path, holder, self.stale_after_s)
            if reason is None:
                return self._create(path)  # released meanwhile (or never stale): an ordinary claim
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            claim = self._create(path)
        if claim is not None:
            say(f"{name}: taking over the slide from a dead claim ({reason})")
        return claim

    def _create(self, path: Path) -> Claim | None:
        for attempt in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                break
            except FileExistsError:
                return None
            except FileNotFoundError:
                if attempt:
                    raise OutputError("cannot create a slide lock (its folder keeps disappearing)", path) from None
                # A process that finished every slide removed the empty lock folder just now: make it again.
                self.folder.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise OutputError(f"cannot create a slide lock ({error.strerror or error})", path) from None
        token = secrets.token_hex(8)
        info = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "token": token,
            "since": datetime.now(UTC).isoformat(timespec="seconds"),
            "heartbeat_s": self.heartbeat_s,
        }
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(info) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        stop = threading.Event()
        thread = threading.Thread(target=_heartbeat, args=(path, stop, self.heartbeat_s), daemon=True)
        thread.start()
        return Claim(path, token, stop, thread)


def claimed(
    items: Sequence[T],
    name: Callable[[T], str],
    out_dir: Path,
    position: int = 0,
    workers: int = 1,
    say: Callable[[str], None] | None = None,
    is_done: Callable[[T], bool] | None = None,
    on_done_elsewhere: Callable[[T], None] | None = None,
    poll_s: float = POLL_S,
    heartbeat_s: float = HEARTBEAT_S,
    stale_after_s: float = STALE_AFTER_S,
) -> Iterator[T]:
    """Yield each item of ``items`` that this process gets to do, holding its claim until the caller asks for the
    next; return once every item is done here or elsewhere.

    Items are visited from this worker's offset (:func:`start_order`). One held by a live process is deferred and
    polled every ``poll_s`` seconds until it is released (then claimed here, and the caller's code finds its output
    done) or its holder dies (then taken over). ``is_done`` (optional) lets an item that another process finished
    be passed to ``on_done_elsewhere`` instead of being claimed: always for deferred items, and on the first pass
    when there are several workers (a lone worker's first pass leaves reuse to the caller's own check, which
    records it).
    """
    say = say or log.info
    locks = SlideLocks(out_dir, heartbeat_s, stale_after_s)
    waiting = [items[i] for i in start_order(len(items), position, workers)]
    first_pass = True
    while waiting:
        deferred: list[T] = []
        for item in waiting:
            if is_done is not None and (not first_pass or workers > 1) and is_done(item):
                if on_done_elsewhere is not None:
                    on_done_elsewhere(item)
                continue
            claim = locks.try_claim(name(item), say)
            if claim is None:
                deferred.append(item)
                continue
            try:
                yield item
            finally:
                claim.release()
        if deferred and first_pass:
            say(f"waiting for {len(deferred)} slide(s) that other processes are working on")
        waiting, first_pass = deferred, False
        if waiting:
            time.sleep(poll_s)
    # Every item is done: the lock folder goes once the last process leaves it empty (another may still hold one).
    with contextlib.suppress(OSError):
        locks.folder.rmdir()


_PRECEDENCE = ("done", "failed", "skipped")


def merge_outcomes(
    outcomes: dict[str, list[Any]], env: DistEnv, key: Callable[[Any], str], order: Sequence[str] = ()
) -> dict[str, list[Any]]:
    """Every rank's outcomes (``done`` / ``failed`` / ``skipped`` lists of rows) as one, each slide once: done by any
    rank wins over failed, failed over skipped (another rank's slide that this one found done). Rows come in
    ``order`` (slide keys), then sorted by key; on one process ``outcomes`` is returned as it is."""
    if not env.enabled:
        return outcomes
    best: dict[str, tuple[int, str, Any]] = {}
    for part in gather_objects(outcomes, env):
        for rank, kind in enumerate(_PRECEDENCE):
            for row in part.get(kind, []):
                current = best.get(key(row))
                if current is None or rank < current[0]:
                    best[key(row)] = (rank, kind, row)
    place = {name: index for index, name in enumerate(order)}
    merged: dict[str, list[Any]] = {kind: [] for kind in outcomes}
    for slide in sorted(best, key=lambda name: (place.get(name, len(place)), name)):
        merged.setdefault(best[slide][1], []).append(best[slide][2])
    return merged


__all__ = [
    "Claim",
    "Shard",
    "SlideLocks",
    "claimed",
    "merge_outcomes",
    "resolve_shard",
    "stale_reason",
    "start_order",
    "worker_position",
]
