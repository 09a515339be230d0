"""Many slides, many machines: `wsi tile` and `wsi embed` shared by torchrun ranks and independent jobs.

One scenario covers both: a torchrun job of 2 CPU ranks (gloo) as shard 0/2 and, at the same moment, a plain process
as shard 1/2 (read from SLURM's job-array variables) tile and embed 4 small slides into one output folder. This file
is also the worker they run (``python tests/test_wsi_sharding.py SLIDES OUT READY_DIR WORKERS``). Every slide must be
tiled and embedded exactly once, and every file must be byte-identical to a single-process run. Also: a claim left by
a dead process is taken over, and a live one is not.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

MODEL = "vit_tiny_28"
TILE_ARGS = ["--mpp", "2.0", "--tile", "32"]
CROPS = ((768, 256), (1024, 768), (512, 1792), (1280, 2048))  # 512 px corners of CMU-1 with tissue
CROP = 512


def _cli(args: list[str]) -> None:
    from medfoundry.cli import app

    app(args, standalone_mode=False)


def _run_all(slides: Path, out: Path, shard: str | None = None) -> None:
    extra = ["--shard", shard] if shard else []
    _cli(["wsi", "tile", str(slides), "--out", str(out / "tiles"), *TILE_ARGS, *extra])
    embed = ["wsi", "embed", "--patches", str(out / "tiles" / "patches"), "--model", MODEL]
    _cli([*embed, "--out", str(out / "features"), "--batch-size", "8", "--num-workers", "0", *extra])


def worker(slides: Path, out: Path, ready: Path, workers: int) -> None:
    """Start only when every process has imported everything, so that they really run side by side."""
    (ready / f"{os.environ.get('RANK', 'solo')}-{os.getpid()}").touch()
    deadline = time.time() + 120
    while len(list(ready.iterdir())) < workers and time.time() < deadline:
        time.sleep(0.05)
    _run_all(slides, out, shard="0/2" if "RANK" in os.environ else None)


@pytest.fixture(scope="module")
def slides(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 tiled TIFFs (OpenSlide's generic-tiff, MPP in the resolution tags) cut from the real CMU-1 region."""
    import tifffile

    from medfoundry.wsi.tiling import open_slide

    source = shared_data / "wsi_samples" / "CMU-1-Small-Region.svs"
    if not source.is_file():
        pytest.skip(f"{source} is absent")
    handle = open_slide(source)
    try:
        mpp = float(handle.properties["openslide.mpp-x"])
        crops = [np.asarray(handle.read_region(corner, 0, (CROP, CROP)).convert("RGB")) for corner in CROPS]
    finally:
        handle.close()
    folder = tmp_path_factory.mktemp("slides")
    for index, pixels in enumerate(crops):
        pixels_per_cm = 1e4 / mpp
        tifffile.imwrite(
            folder / f"slide{index}.tif",
            pixels,
            tile=(256, 256),
            compression="zlib",
            photometric="rgb",
            resolution=(pixels_per_cm, pixels_per_cm),
            resolutionunit="CENTIMETER",
        )
    return folder


@pytest.fixture(scope="module")
def single(slides: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun rank and the worker (OMP_NUM_THREADS=1), for the same rounding
    try:
        out = tmp_path_factory.mktemp("single")
        _run_all(slides, out)
    finally:
        torch.set_num_threads(threads)
    return out


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def shared(slides: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A torchrun job of 2 ranks (shard 0/2) and a SLURM-array-like process (task 1 of 2) on one folder at once."""
    out, ready = tmp_path_factory.mktemp("shared"), tmp_path_factory.mktemp("ready")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    args = [__file__, str(slides), str(out), str(ready), "3"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2"]
    torchrun += ["--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    job = {**env, "SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "2"}
    processes = [
        subprocess.Popen([*torchrun, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True),
        subprocess.Popen([sys.executable, *args], env=job, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True),
    ]
    outputs = [process.communicate(timeout=300)[0] for process in processes]
    for process, output in zip(processes, outputs, strict=True):
        assert process.returncode == 0, output[-4000:]
    return {"out": out, "log": "\n".join(outputs)}


def _files(folder: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.suffix in (".h5", ".png")
    }


def test_ranks_and_jobs_share_one_folder(shared: dict[str, object], single: Path) -> None:
    out, log = shared["out"], str(shared["log"])
    assert isinstance(out, Path)
    expected, found = _files(single), _files(out)
    # 4 patches files, 4 thumbnails, 4 feature files, each byte for byte what one process writes.
    assert len(expected) == 12 and sorted(found) == sorted(expected)
    assert [name for name in expected if found[name] != expected[name]] == []
    for index in range(4):
        # Each slide tiled once ("N tiles at level") and embedded once ("N tiles in S s") over all three processes.
        assert sum(f"slide{index}.tif: " in line and "tiles at level" in line for line in log.splitlines()) == 1
        assert sum(line.startswith(f"slide{index}: ") and " tiles in " in line for line in log.splitlines()) == 1
        state = json.loads((out / "features" / "state" / f"slide{index}.json").read_text())
        assert state["attempts"] == 1 and [h["status"] for h in state["history"]].count("done") == 1
    # The last process to finish removes the emptied lock folders.
    assert not (out / "features" / ".locks").exists() and not (out / "tiles" / ".locks").exists()
    summary = json.loads((out / "features" / "embed_summary.json").read_text())
    tiles = json.loads((out / "tiles" / "tile_summary.json").read_text())
    assert len(tiles["done"]) == 4 and tiles["skipped"] == []
    assert {row["slide"] for row in summary["done"] + summary["skipped"]} == {f"slide{i}" for i in range(4)}
    assert summary["failed"] == []


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_dead_claim_is_taken_over_and_a_live_one_is_not(single: Path, tmp_path: Path) -> None:
    import torch

    from medfoundry.wsi import embed_slides

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in `single`, for the same rounding
    # What a job killed while embedding slide2 leaves: the other slides done, slide2's claim naming a dead pid.
    out = tmp_path / "features"
    shutil.copytree(single / "features", out)
    (out / "slide2.h5").unlink()
    locks = out / ".locks"
    locks.mkdir(exist_ok=True)  # a finished run removed its emptied lock folder; a killed one leaves it
    (locks / "slide2.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid(), "token": "x"}))
    lines: list[str] = []
    try:
        summary = embed_slides(single / "tiles" / "patches", MODEL, out, batch_size=8, num_workers=0, echo=lines.append)
    finally:
        torch.set_num_threads(threads)
    assert [row["slide"] for row in summary.done] == ["slide2"] and len(summary.skipped) == 3
    assert any(line.startswith("slide2: taking over") and "is gone" in line for line in lines), lines
    assert not (locks / "slide2.lock").exists()
    assert (out / "slide2.h5").read_bytes() == (single / "features" / "slide2.h5").read_bytes()


def test_claims_on_a_shared_file_system(tmp_path: Path) -> None:
    from medfoundry.wsi.sharding import SlideLocks

    locks = SlideLocks(tmp_path, stale_after_s=60)
    lines: list[str] = []
    # Another host's claim: live while its heartbeat is fresh, taken over once it is older than the limit.
    foreign = locks.path("a")
    foreign.write_text(json.dumps({"host": "elsewhere", "pid": 1, "token": "t"}))
    assert locks.try_claim("a", lines.append) is None
    os.utime(foreign, (time.time() - 120, time.time() - 120))
    claim = locks.try_claim("a", lines.append)
    assert claim is not None and "no heartbeat for" in lines[-1]
    # A live claim of this host is never taken; releasing frees the slide.
    assert locks.try_claim("a", lines.append) is None
    claim.release()
    assert not foreign.exists()
    again = locks.try_claim("a", lines.append)
    assert again is not None
    again.release()


def test_shards_and_offsets() -> None:
    from medfoundry.errors import MedfoundryError
    from medfoundry.wsi.sharding import Shard, start_order

    assert Shard.parse("2/8") == Shard(2, 8)
    array = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "3"}
    assert Shard.from_env(array) == Shard(2, 4)
    assert Shard.from_env({}) == Shard(0, 1)
    assert start_order(5, 1, 2) == [2, 3, 4, 0, 1] and start_order(0, 1, 2) == []
    for bad in ("3/2", "x", "1/0"):
        with pytest.raises(MedfoundryError, match="shard"):
            Shard.parse(bad)


if __name__ == "__main__":
    worker(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]))
