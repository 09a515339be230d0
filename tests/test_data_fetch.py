"""MedMNIST download over a real local HTTP server on 127.0.0.1 (never the internet)."""

from __future__ import annotations

import functools
import http.server
import shutil
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from medfoundry.data.fetch import MEDMNIST_MD5, fetch_medmnist, file_md5, medmnist_url
from medfoundry.data.medmnist import load_medmnist_npz
from medfoundry.errors import DataError

# md5 of the re-saved BreastMNIST copy bundled in the repo (the official file's md5 differs).
BUNDLED_MD5 = "098de56cd2d92ef2f7170e6153c02849"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        pass


@pytest.fixture
def served(tmp_path: Path, breastmnist_npz: Path) -> Iterator[tuple[str, Path]]:
    """Serve a folder holding breastmnist.npz; yields (base_url, folder). Stopped after the test."""
    folder = tmp_path / "server"
    folder.mkdir()
    shutil.copy(breastmnist_npz, folder / "breastmnist.npz")
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", folder
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def bundled_md5(monkeypatch: pytest.MonkeyPatch) -> str:
    """Make the bundled copy the 'official' BreastMNIST 28 px file for the test."""
    monkeypatch.setitem(MEDMNIST_MD5["breastmnist"], 28, BUNDLED_MD5)
    return BUNDLED_MD5


def test_table_covers_official_files() -> None:
    two_d = [name for name in MEDMNIST_MD5 if not name.endswith("3d")]
    three_d = [name for name in MEDMNIST_MD5 if name.endswith("3d")]
    assert len(two_d) == 12 and len(three_d) == 6
    assert all(sorted(MEDMNIST_MD5[n]) == [28, 64, 128, 224] for n in two_d)
    assert all(sorted(MEDMNIST_MD5[n]) == [28, 64] for n in three_d)
    assert MEDMNIST_MD5["breastmnist"][28] == "750601b1f35ba3300ea97c75c52ff8f6"
    assert medmnist_url("pathmnist", 224) == "https://zenodo.org/records/10519652/files/pathmnist_224.npz?download=1"


def test_download_verifies_and_loads(served: tuple[str, Path], tmp_path: Path, bundled_md5: str) -> None:
    base_url, _ = served
    dest = tmp_path / "cache"
    path = fetch_medmnist("breastmnist", 28, dest, base_url=base_url, timeout=5)
    assert path == dest / "breastmnist.npz"
    assert file_md5(path) == bundled_md5
    assert [p.name for p in dest.iterdir()] == ["breastmnist.npz"]  # no temporary file left
    assert len(load_medmnist_npz(path)["train"]) == 546


def test_md5_mismatch_removes_download(served: tuple[str, Path], tmp_path: Path) -> None:
    # The table keeps the official md5, which the re-saved bundled copy does not match.
    base_url, _ = served
    dest = tmp_path / "cache"
    with pytest.raises(DataError) as info:
        fetch_medmnist("breastmnist", 28, dest, base_url=base_url, timeout=5)
    message = str(info.value)
    assert str(dest / "breastmnist.npz") in message
    assert "expected 750601b1f35ba3300ea97c75c52ff8f6" in message and f"got {BUNDLED_MD5}" in message
    assert list(dest.iterdir()) == []


def test_offline_error_names_url_and_target(closed_port_url: str, tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        fetch_medmnist("pneumoniamnist", 64, tmp_path, base_url=closed_port_url, timeout=5)
    message = str(info.value)
    assert "could not reach the download server" in message
    assert f"{closed_port_url}/pneumoniamnist_64.npz" in message
    assert f"place it at {tmp_path / 'pneumoniamnist_64.npz'}" in message
    assert list(tmp_path.iterdir()) == []


def test_http_error(served: tuple[str, Path], tmp_path: Path) -> None:
    base_url, _ = served
    dest = tmp_path / "cache"
    with pytest.raises(DataError, match="HTTP 404"):
        fetch_medmnist("chestmnist", 28, dest, base_url=base_url, timeout=5)
    assert list(dest.iterdir()) == []


def test_existing_valid_file_is_kept(
    closed_port_url: str, tmp_path: Path, breastmnist_npz: Path, bundled_md5: str
) -> None:
    target = tmp_path / "breastmnist.npz"
    shutil.copy(breastmnist_npz, target)
    mtime = target.stat().st_mtime_ns
    # The server is unreachable, so returning proves nothing was downloaded.
    assert fetch_medmnist("breastmnist", 28, tmp_path, base_url=closed_port_url, timeout=5) == target
    assert target.stat().st_mtime_ns == mtime


def test_existing_corrupt_file_is_replaced(served: tuple[str, Path], tmp_path: Path, bundled_md5: str) -> None:
    base_url, _ = served
    target = tmp_path / "cache" / "breastmnist.npz"
    target.parent.mkdir()
    target.write_bytes(b"partial")
    fetch_medmnist("breastmnist", 28, target.parent, base_url=base_url, timeout=5)
    assert file_md5(target) == bundled_md5


def test_unknown_name_or_size(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="valid names: .*breastmnist"):
        fetch_medmnist("breastmnistt", 28, tmp_path)
    with pytest.raises(DataError, match="valid sizes: 28, 64$"):
        fetch_medmnist("organmnist3d", 128, tmp_path)
