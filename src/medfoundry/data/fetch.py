"""Download official MedMNIST ``.npz`` files with md5 verification.

Downloads are atomic: the file is written to a temporary name inside ``dest_dir``, verified, and only
then renamed to its final name, so an interrupted or corrupt download never looks like a valid file.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import socket
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from medfoundry.errors import DataError

#: The Zenodo record of MedMNIST v3 (2D at 28/64/128/224 px, 3D at 28/64 px).
MEDMNIST_BASE_URL = "https://zenodo.org/records/10519652/files"

# Official md5 per dataset and image size, copied from ``medmnist.INFO`` (medmnist 3.0.2, medmnist/info.py,
# keys "MD5", "MD5_64", "MD5_128", "MD5_224"). Every official URL there is
# f"{MEDMNIST_BASE_URL}/{medmnist_filename(name, size)}?download=1", so only the md5 values are stored.
# 3D datasets are published at 28 and 64 px only.
MEDMNIST_MD5: dict[str, dict[int, str]] = {
    "pathmnist": {
        28: "a8b06965200029087d5bd730944a56c1",
        64: "55aa9c1e0525abe5a6b9d8343a507616",
        128: "ac42d08fb904d92c244187169d1fd1d9",
        224: "2c51a510bcdc9cf8ddb2af93af1eadec",
    },
    "chestmnist": {
        28: "02c8a6516a18b556561a56cbdd36c4a8",
        64: "9de6cd0b934ebb5b7426cfba5efbae16",
        128: "db107e5590b27930b62dbaf558aebee3",
        224: "45bd33e6f06c3e8cdb481c74a89152aa",
    },
    "dermamnist": {
        28: "0744692d530f8e62ec473284d019b0c7",
        64: "b70a2f5635c6199aeaa28c31d7202e1f",
        128: "2defd784463fa5243564e855ed717de1",
        224: "8974907d8e169bef5f5b96bc506ae45d",
    },
    "octmnist": {
        28: "c68d92d5b585d8d81f7112f81e2d0842",
        64: "e229e9440236b774d9f0dfef9d07bdaf",
        128: "0a97e76651ace45c5d943ee3f65b63ae",
        224: "abc493b6d529d5de7569faaef2773ba3",
    },
    "pneumoniamnist": {
        28: "28209eda62fecd6e6a2d98b1501bb15f",
        64: "8f4eceb4ccffa70c672198ea285246c6",
        128: "05b46931834c231683c68f40c47b2971",
        224: "d6a3c71de1b945ea11211b03746c1fe1",
    },
    "retinamnist": {
        28: "bd4c0672f1bba3e3a89f0e4e876791e4",
        64: "afda852cc34dcda56f86ad2b2457dbcc",
        128: "e48e916a24454daf90583d4e6efb1a18",
        224: "eae7e3b6f3fcbda4ae613ebdcbe35348",
    },
    "breastmnist": {
        28: "750601b1f35ba3300ea97c75c52ff8f6",
        64: "742edef2a1fd1524b2efff4bd7ba9364",
        128: "363e4b3f8d712e9b5de15470a2aaadf1",
        224: "b56378a6eefa9fed602bb16d192d4c8b",
    },
    "bloodmnist": {
        28: "7053d0359d879ad8a5505303e11de1dc",
        64: "2b94928a2ae4916078ca51e05b6b800b",
        128: "adace1e0ed228fccda1f39692059dd4c",
        224: "b718ff6835fcbdb22ba9eacccd7b2601",
    },
    "tissuemnist": {
        28: "ebe78ee8b05294063de985d821c1c34b",
        64: "123ece2eba09d0aa5d698fda57103344",
        128: "61b955355d7425a89687b06cca3ce0c2",
        224: "b077128c4a949f0a4eb01517f9037b9c",
    },
    "organamnist": {
        28: "68e3f8846a6bd62f0c9bf841c0d9eacc",
        64: "2dcccc29b88e6da5a01161ef20cda288",
        128: "eeae80d0a227a8d099027e1b3cfd3b60",
        224: "50747347e05c87dd3aaf92c49f9f3170",
    },
    "organcmnist": {
        28: "b9ceb9546e10131b32923c5bbeaea2b1",
        64: "3ce34a8724ea6f548e6db4744d03b6a9",
        128: "773c1f009daa3fe5d9a2a201b2a7ed94",
        224: "050f5e875dc056f6768abf94ec9995d1",
    },
    "organsmnist": {
        28: "9ab87b696fb54e2a387ebe992d6ed5f1",
        64: "53a6d115339d874c25e309a994ff46d3",
        128: "ded0c5fa01a95dc4978b956f613e9b8e",
        224: "b354719e553fbbb2513d5533f52a4cb1",
    },
    "organmnist3d": {28: "a0c5a1ff56af4f155c46d46fbb45a2fe", 64: "58a2205adf14a9d0a189cb06dc78bf10"},
    "nodulemnist3d": {28: "8755a7e9e05a4d9ce80a24c3e7a256f3", 64: "c47c5b7d457bf6332200d2ea6d64ecd8"},
    "adrenalmnist3d": {28: "bbd3c5a5576322bc4cdfea780653b1ce", 64: "17721accfe9fb005146a47d33bc54b2f"},
    "fracturemnist3d": {28: "6aa7b0143a6b42da40027a9dda61302f", 64: "f01d7e6316aedf4210da0da5b7437b42"},
    "vesselmnist3d": {28: "b41fd4f7e7e2feedddb201585ecafa1b", 64: "6bb274a8846e1097066dcd64e2c4520f"},
    "synapsemnist3d": {28: "1235b78a3cd6280881dd7850a78eadb6", 64: "43bd14ebf3af9d3dd072446fedc14d5e"},
}

_CHUNK = 1 << 20
# Failures that mean "no network / server unreachable / connection dropped" rather than a bad response.
_OFFLINE_ERRORS = (
    urllib.error.URLError,
    socket.timeout,
    TimeoutError,
    ConnectionError,
    http.client.HTTPException,
)


def medmnist_filename(name: str, size: int) -> str:
    """Official file name: ``{name}.npz`` at 28 px, ``{name}_{size}.npz`` otherwise."""
    return f"{name}.npz" if size == 28 else f"{name}_{size}.npz"


def medmnist_url(name: str, size: int, base_url: str | None = None) -> str:
    """Download URL of one official file; ``base_url`` replaces the Zenodo host and path (tests, mirrors)."""
    expected_md5(name, size)
    base = (base_url or MEDMNIST_BASE_URL).rstrip("/")
    return f"{base}/{medmnist_filename(name, size)}?download=1"


def expected_md5(name: str, size: int) -> str:
    """The official md5 of ``name`` at ``size`` px; DataError listing valid choices when unknown."""
    sizes = MEDMNIST_MD5.get(name)
    if sizes is None:
        raise DataError(f"unknown MedMNIST dataset {name!r}; valid names: {', '.join(sorted(MEDMNIST_MD5))}")
    if size not in sizes:
        valid = ", ".join(str(s) for s in sorted(sizes))
        raise DataError(f"MedMNIST dataset {name!r} has no size {size}; valid sizes: {valid}")
    return sizes[size]


def fetch_medmnist(
    name: str,
    size: int,
    dest_dir: Path,
    base_url: str | None = None,
    timeout: float = 30,
    progress: bool = False,
) -> Path:
    """Download the official MedMNIST ``name`` file at ``size`` px into ``dest_dir`` and return its path.

    A file already there with the official md5 is returned without downloading; one with another md5
    is replaced by a fresh download. ``timeout`` is the socket timeout in seconds; ``progress`` shows a
    rich progress bar.

    Raises:
        DataError: unknown name/size, server unreachable (with the URL and where to put the file by
            hand), HTTP error, md5 mismatch (the partial file is removed), or unwritable ``dest_dir``.
    """
    md5 = expected_md5(name, size)
    url = medmnist_url(name, size, base_url)
    dest_dir = Path(dest_dir)
    target = dest_dir / medmnist_filename(name, size)
    if target.is_file() and file_md5(target) == md5:
        return target
    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
        handle, temp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=dest_dir)
    except OSError as exc:
        raise DataError(f"cannot write to the download folder ({exc.strerror or exc})", dest_dir) from exc
    temp = Path(temp_name)
    try:
        with os.fdopen(handle, "wb") as out:
            got = _download(url, out, timeout, target, progress)
        if got != md5:
            raise DataError(f"md5 mismatch for {url}: expected {md5}, got {got}; the download was removed", target)
        os.replace(temp, target)
    finally:
        temp.unlink(missing_ok=True)
    return target


def file_md5(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _download(url: str, out: BinaryIO, timeout: float, target: Path, progress: bool) -> str:
    """Stream ``url`` into the open binary file ``out``; return the md5 of the bytes written."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            return _copy_with_md5(response.read, out.write, total, target.name, progress)
    except urllib.error.HTTPError as exc:
        raise DataError(f"download failed: server answered HTTP {exc.code} ({exc.reason}) for {url}", target) from exc
    except _OFFLINE_ERRORS as exc:
        reason = getattr(exc, "reason", exc)
        raise DataError(
            f"could not reach the download server ({reason}); download {url} by hand and place it at {target}",
            target,
        ) from exc


def _copy_with_md5(
    read: Callable[[int], bytes],
    write: Callable[[bytes], object],
    total: int | None,
    label: str,
    progress: bool,
) -> str:
    digest = hashlib.md5()
    advance = _progress_callback(total, label) if progress else None
    try:
        for chunk in iter(lambda: read(_CHUNK), b""):
            write(chunk)
            digest.update(chunk)
            if advance is not None:
                advance(len(chunk))
    finally:
        if advance is not None:
            advance(-1)
    return digest.hexdigest()


def _progress_callback(total: int | None, label: str) -> Callable[[int], None]:
    """A callback that advances a rich progress bar by n bytes; n < 0 closes the bar."""
    from rich.progress import DownloadColumn, Progress, TransferSpeedColumn

    bar = Progress(*Progress.get_default_columns(), DownloadColumn(), TransferSpeedColumn(), transient=True)
    task = bar.add_task(f"downloading {label}", total=total)
    bar.start()

    def advance(n: int) -> None:
        if n < 0:
            bar.stop()
        else:
            bar.advance(task, n)

    return advance
