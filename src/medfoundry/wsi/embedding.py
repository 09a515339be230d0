"""Streaming tile embedding: slide regions read on demand in DataLoader workers, through an encoder, into HDF5.

The slide is never loaded whole: each worker opens its own OpenSlide handle lazily and reads one region per
tile. Features stream into the features cache (:mod:`medfoundry.models.feature_cache`, the one images use too):
written row by row into ``.<stem>.h5.tmp`` and renamed to ``<stem>.h5`` only when complete, and reused when the
encoder weights, the preprocessing (stain normalisation included) and the tiles (coordinates, size, mpp) all match.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from medfoundry.distributed import init_distributed
from medfoundry.errors import DataError, MedfoundryError
from medfoundry.io_utils import hash_json, write_json_atomic
from medfoundry.models import feature_cache as cache
from medfoundry.models.backbones import Encoder
from medfoundry.models.checkpoint import load_encoder_or_build, weights_hash
from medfoundry.models.features import encode_batches, preprocessing_spec
from medfoundry.transforms.stain import MacenkoNormalizer
from medfoundry.wsi.dicom import is_dicom_slide_folder
from medfoundry.wsi.sharding import Shard, claimed, merge_outcomes, resolve_shard, worker_position
from medfoundry.wsi.tiling import SLIDE_FILE_SUFFIXES, ReadPlan, open_slide, read_patches, read_tile

log = logging.getLogger("medfoundry.wsi")

_HISTORY_LENGTH = 20


class SlideTiles(Dataset):
    """The tiles of one slide as (3, P, P) uint8 tensors, read from the slide when asked for."""

    def __init__(
        self, slide_path: Path, coords: np.ndarray, plan: ReadPlan, stain: MacenkoNormalizer | None = None
    ) -> None:
        self.slide_path = Path(slide_path)
        self.coords = np.asarray(coords, dtype=np.int64)
        self.plan = plan
        self.stain = stain
        self._slide = None

    def __len__(self) -> int:
        return len(self.coords)

    def __getstate__(self) -> dict[str, Any]:
        # OpenSlide handles cannot be pickled into workers; each worker opens its own on first use.
        return {**self.__dict__, "_slide": None}

    def __getitem__(self, index: int) -> torch.Tensor:
        if self._slide is None:
            self._slide = open_slide(self.slide_path)
        corner = self.coords[index]
        try:
            tile = read_tile(self._slide, corner, self.plan)
        except Exception as error:  # noqa: BLE001 - OpenSlide raises several types for damaged tiles
            raise DataError(f"cannot read the tile at ({corner[0]}, {corner[1]}): {error}", self.slide_path) from None
        pixels = np.asarray(tile)
        if self.stain is not None:
            # In the loader workers, so normalising overlaps with the encoder's forward pass.
            pixels = self.stain.transform(pixels)
        return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))


def plan_from_attrs(attrs: dict[str, Any], slide, source: Path) -> ReadPlan:  # noqa: ANN001
    """How to read tiles, from a patches file's attributes; files without ``level`` (TRIDENT, CLAM) read level 0."""
    if "patch_size" not in attrs:
        raise DataError("patches file lacks the 'patch_size' attribute on 'coords'", source)
    patch_size = int(attrs["patch_size"])
    size0 = int(attrs.get("patch_size_level0", patch_size))
    level = int(attrs.get("level", 0))
    if not 0 <= level < slide.level_count:
        raise DataError(f"patches were cut at level {level} but the slide has {slide.level_count} levels", source)
    downsample = float(slide.level_downsamples[level])
    read_size = int(attrs.get("read_size", max(1, round(size0 / downsample))))
    base = float(attrs.get("level0_mpp", 0.0) or 0.0)
    mpp = float(attrs.get("mpp", 0.0) or 0.0)
    return ReadPlan(level, downsample, read_size, patch_size, size0, base, mpp)


@dataclass
class SlideJob:
    """One slide to embed: its patches file, the slide file, and the output."""

    stem: str
    patches: Path
    slide: Path | None


@dataclass
class EmbedSummary:
    done: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """False when every slide failed (the CLI then exits 1)."""
        return bool(self.done or self.skipped) or not self.failed


def find_slides(inputs: Iterable[str | Path]) -> dict[str, Path]:
    """Slide files by stem, from files and folders (folders are searched recursively; a DICOM slide folder,
    the ``.dcm`` instances of one slide, is found by its folder name)."""
    found: dict[str, Path] = {}
    for item in inputs:
        path = Path(item)
        candidates = sorted([path, *path.rglob("*")]) if path.is_dir() else [path]
        for candidate in candidates:
            if candidate.is_file() and candidate.suffix.lower() in SLIDE_FILE_SUFFIXES:
                found.setdefault(candidate.stem, candidate)
            elif candidate.is_dir() and is_dicom_slide_folder(candidate):
                found.setdefault(candidate.name, candidate)
    return found


def plan_jobs(patches_dir: Path, slides: Iterable[str | Path] | None) -> list[SlideJob]:
    """Pair every ``<stem>.h5`` in ``patches_dir`` with its slide (from ``slides``, else the file's slide_path)."""
    patches_dir = Path(patches_dir)
    if not patches_dir.is_dir():
        raise DataError("patches folder not found (run `medfoundry wsi tile` first)", patches_dir)
    by_stem = find_slides(slides or [])
    jobs = []
    for patches in sorted(patches_dir.glob("*.h5")):
        slide = by_stem.get(patches.stem)
        if slide is None and not slides:
            slide = _slide_path_attr(patches)
        jobs.append(SlideJob(patches.stem, patches, slide))
    if not jobs:
        raise DataError("no <slide>.h5 patches files in this folder", patches_dir)
    return jobs


def _slide_path_attr(patches: Path) -> Path | None:
    with contextlib.suppress(OSError, KeyError), h5py.File(patches, "r") as h5:
        value = h5["coords"].attrs.get("slide_path")
        return Path(value.decode() if isinstance(value, bytes) else str(value)) if value is not None else None
    return None


def output_key(
    encoder: Encoder,
    encoder_hash: str,
    coords: np.ndarray,
    attrs: dict[str, Any],
    stain: MacenkoNormalizer | None = None,
    bf16: bool = False,
) -> dict[str, str]:
    """What a finished features file must match to be reused: the feature cache's key for these tiles."""
    return cache.cache_key(encoder_hash, slide_preprocessing(encoder, stain, bf16), tiles_hash(coords, attrs))


def slide_preprocessing(encoder: Encoder, stain: MacenkoNormalizer | None, bf16: bool = False) -> dict[str, Any]:
    # Features of stain-normalised tiles are different features: a change of reference recomputes them.
    return {**preprocessing_spec(encoder, bf16), "stain_normalisation": _stain_name(stain)}


def _stain_name(stain: MacenkoNormalizer | None) -> str:
    return "none" if stain is None else "macenko:" + hash_json(stain.to_dict())


def tiles_hash(coords: np.ndarray, attrs: dict[str, Any]) -> str:
    """The data part of the key: which tiles, cut how (from the patches file alone, before the slide is opened)."""
    size0 = attrs.get("patch_size_level0")
    cut = {
        "patch_size": int(attrs["patch_size"]),
        "patch_size_level0": None if size0 is None else int(size0),
        "level": int(attrs.get("level", 0)),
        "mpp": float(attrs.get("mpp", 0.0) or 0.0),
    }
    return cache.array_hash(np.asarray(coords, dtype=np.int64), extra=cut)


@torch.inference_mode()
def write_features(
    encoder: Encoder,
    tiles: SlideTiles,
    final: Path,
    attrs: dict[str, Any],
    loader_options: dict[str, Any],
    device: torch.device,
    bf16: bool,
    progress: Callable[[int], None] | None = None,
    coords_attrs: dict[str, Any] | None = None,
) -> None:
    """Embed every tile into ``final`` through the cache's temp file; ``final`` appears only when all rows are in.

    ``coords_attrs`` (the patches file's) go on ``coords`` as TRIDENT and CLAM put them on their feature files.
    """
    loader = DataLoader(tiles, shuffle=False, **loader_options)
    rows = encode_batches(encoder, loader, device, bf16, tiles.slide_path, lambda row: f"tile {row}")
    with cache.writing(final, len(tiles), encoder.embed_dim, attrs, {"coords": tiles.coords}) as writer:
        for values in rows:
            writer.append(values)
            if progress is not None:
                progress(len(values))
        writer.dataset.file["coords"].attrs.update(coords_attrs or {})


class SlideState:
    """``state/<stem>.json``: attempts, durations, tiles and the last error of one slide, across runs."""

    def __init__(self, path: Path, stem: str) -> None:
        self.path = path
        self.data: dict[str, Any] = {"slide": stem, "attempts": 0, "status": "new", "history": []}
        if path.is_file():
            with contextlib.suppress(OSError, json.JSONDecodeError):
                self.data.update(json.loads(path.read_text()))

    @property
    def interrupted(self) -> bool:
        """A previous attempt was still running when it stopped (killed, power loss)."""
        return self.data.get("status") == "running"

    def update(self, **values: Any) -> None:
        self.data.update(values)
        write_json_atomic(self.path, self.data)

    def record(self, status: str, **values: Any) -> None:
        """Set ``status`` and ``values``, and append a short entry to the history."""
        brief = {k: values[k] for k in ("attempts", "duration_s", "last_error", "reason") if k in values}
        history = [*self.data.get("history", []), {"at": _now(), "status": status, **brief}][-_HISTORY_LENGTH:]
        self.update(status=status, history=history, **values)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class EmbedContext:
    """What every slide of a run shares: the encoder, its hash, and how batches are loaded."""

    encoder: Encoder
    encoder_name: str
    encoder_hash: str
    out_dir: Path
    loader_options: dict[str, Any]
    device: torch.device
    bf16: bool
    progress: bool
    stain: MacenkoNormalizer | None = None


def embed_slide(job: SlideJob, ctx: EmbedContext) -> dict[str, Any]:
    """Embed one slide (or find it already done); returns a summary row with ``status`` done or skipped."""
    final = ctx.out_dir / f"{job.stem}.h5"
    state = SlideState(ctx.out_dir / "state" / f"{job.stem}.json", job.stem)
    coords, attrs = read_patches(job.patches)
    key = output_key(ctx.encoder, ctx.encoder_hash, coords, attrs, ctx.stain, ctx.bf16)
    stale = cache.temp_path(final)
    if state.interrupted:
        log.info("%s: the previous attempt was interrupted; starting this slide over", job.stem)
    if stale.exists():
        log.info("%s: removing a partial file from an interrupted run", stale)
        stale.unlink()
    if cache.is_current(final, key, len(coords), ("coords",)):
        state.record("skipped", reason="already done with the same encoder weights and coordinates")
        return {"slide": job.stem, "status": "skipped", "reason": "already done", "output": str(final)}
    if job.slide is None:
        raise DataError("no slide file with this name among --slides", job.patches)
    if len(coords) == 0:
        raise DataError("patches file has no tiles", job.patches)
    state.record(
        "running",
        attempts=int(state.data.get("attempts", 0)) + 1,
        started=_now(),
        tiles=len(coords),
        slide_path=str(job.slide),
        patches=str(job.patches),
    )
    started = time.perf_counter()
    slide = open_slide(job.slide)
    try:
        plan = plan_from_attrs(attrs, slide, job.patches)
    finally:
        slide.close()
    tiles = SlideTiles(job.slide, coords, plan, ctx.stain)
    out_attrs = {
        **key,
        **cache.describe(slide_preprocessing(ctx.encoder, ctx.stain, ctx.bf16), ctx.encoder.embed_dim),
        "encoder": ctx.encoder_name,
        "patch_size": plan.patch_size,
        "mpp": plan.target_mpp,
        "stain_normalisation": _stain_name(ctx.stain),
        "level": plan.level,
        "slide": job.stem,
        "bf16": ctx.bf16,
        # What a heatmap needs to draw the tiles back on the slide (medfoundry.mil.heatmap).
        "patch_size_level0": plan.patch_size_level0,
        "slide_path": str(Path(job.slide).resolve()),
    }
    with _progress_bar(job.stem, len(coords), ctx.progress) as advance:
        write_features(
            ctx.encoder, tiles, final, out_attrs, ctx.loader_options, ctx.device, ctx.bf16, advance, coords_attrs=attrs
        )
    seconds = time.perf_counter() - started
    durations = [*state.data.get("durations", []), round(seconds, 3)][-_HISTORY_LENGTH:]
    state.record(
        "done",
        duration_s=round(seconds, 3),
        durations=durations,
        last_error=None,
        encoder_weights_hash=ctx.encoder_hash,
        output=str(final),
    )
    return {
        "slide": job.stem,
        "status": "done",
        "tiles": len(coords),
        "seconds": round(seconds, 3),
        "tiles_per_s": round(len(coords) / max(seconds, 1e-9), 1),
        "output": str(final),
    }


@contextlib.contextmanager
def _progress_bar(label: str, total: int, enabled: bool) -> Iterator[Callable[[int], None] | None]:
    if not enabled:
        yield None
        return
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)


def default_workers(device: torch.device, cores: int | None = None) -> int:
    """Tile-reading worker processes when the user gives none: as many as keep the encoder fed, no more.

    A worker reads and decodes one tile in about 4-8 ms (JPEG-compressed SVS at 224 px); the encoder's time per
    tile sets how many it takes to keep up. Measured on the 2-core box (ViT-S/16 at 224 px, one torch thread,
    under load): 8.5 ms to read a tile, 636 ms to encode it, a ratio near 1:75; a quiet core encodes one in
    roughly 60 ms (4.6 GFLOPs), an estimated 1:15.

    * GPU: the forward pass takes well under 1 ms a tile, so reading is the bottleneck and workers scale with
      the cores: 0.75 x the usable cores, as TRIDENT does, leaving the rest to the main process (batching, the
      copy to the device, HDF5 writes), at most 32 (each worker holds its own OpenSlide handle and prefetch).
    * CPU: workers and the encoder's threads share the cores. Balancing W workers against C - W encoder threads
      at 1:15 gives W ~ C / 16; one per 8 cores leaves slack for smaller encoders (ViT-Ti encodes ~4x faster),
      at least 1 and at most 8. On 2 cores no worker was faster (benchmarks/wsi.py: 0.71 of the bare forward
      pass against 0.58 with 2 workers): 0 there.
    """
    if cores is None:
        try:
            cores = len(os.sched_getaffinity(0))  # the cores this process may use (a batch job's share, not the node's)
        except AttributeError:  # not on every platform
            cores = os.cpu_count() or 1
    if device.type == "cuda":
        return max(1, min(32, int(0.75 * cores)))
    if cores <= 2:
        return 0
    return max(1, min(8, cores // 8))


def loader_options(
    batch_size: int, num_workers: int, prefetch: int = 4, device: torch.device | None = None
) -> dict[str, Any]:
    options: dict[str, Any] = {
        "batch_size": batch_size,
        "num_workers": num_workers,
        # Pinned pages only speed up copies to a GPU; with --device cpu on a CUDA machine they cost memory and time.
        "pin_memory": torch.cuda.is_available() and device is not None and device.type == "cuda",
    }
    if num_workers > 0:
        # Workers decode JPEG tiles while the encoder runs; a few batches ahead keep it fed.
        options["prefetch_factor"] = prefetch
    return options


def embed_slides(
    patches_dir: str | Path,
    model: str,
    out_dir: str | Path,
    slides: Iterable[str | Path] | None = None,
    batch_size: int = 64,
    num_workers: int | None = None,
    bf16: bool = False,
    img_size: int | None = None,
    device: str | None = None,
    encoder: Encoder | None = None,
    progress: bool | None = None,
    echo: Callable[[str], None] | None = None,
    stain_reference: str | Path | None = None,
    shard: str | Shard | None = None,
) -> EmbedSummary:
    """Embed every slide of ``patches_dir`` with ``model`` (registry name or checkpoint folder) into ``out_dir``.

    Writes ``out_dir/<stem>.h5`` (``features``, ``coords``, attrs), ``out_dir/state/<stem>.json`` and
    ``out_dir/embed_summary.json``. Slides already done with the same weights are skipped; failures are
    recorded and the run goes on. ``encoder`` (already built) replaces ``model`` for callers holding one.
    ``stain_reference`` (a JSON written by ``MacenkoNormalizer.save``) Macenko-normalises every tile before the
    encoder; tiles without enough tissue to estimate their stains pass through unchanged.

    Several processes may share ``out_dir`` (torchrun ranks, ``shard`` "i/n" or a SLURM array's task, or plain
    concurrent runs): each slide is claimed first, so none is done twice (:mod:`medfoundry.wsi.sharding`). Under
    torchrun rank 0 writes the summary of all ranks once they are all done.
    """
    say = echo or log.info
    env = init_distributed()
    position, workers = worker_position(resolve_shard(shard), env)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jobs = plan_jobs(Path(patches_dir), slides)
    started = time.perf_counter()
    built = encoder if encoder is not None else load_encoder_or_build(model, in_chans=3, img_size=img_size)
    if device is None and env.enabled:
        target = env.device  # one GPU per rank: cuda:LOCAL_RANK
    else:
        target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    built = built.to(target).eval()
    ctx = EmbedContext(
        built,
        model,
        weights_hash(built.backbone),
        out,
        loader_options(batch_size, default_workers(target) if num_workers is None else num_workers, device=target),
        target,
        bf16,
        sys.stderr.isatty() if progress is None else progress,
        None if stain_reference is None else MacenkoNormalizer.load(stain_reference, on_failure="passthrough"),
    )
    summary = EmbedSummary()
    for job in claimed(
        jobs,
        lambda job: job.stem,
        out,
        position,
        workers,
        say,
        is_done=lambda job: is_embedded(job, ctx),
        on_done_elsewhere=lambda job: summary.skipped.append(
            {"slide": job.stem, "status": "skipped", "reason": "already done"}
        ),
    ):
        _run_job(job, ctx, summary, say)
    merged = merge_outcomes(
        {"done": summary.done, "skipped": summary.skipped, "failed": summary.failed},
        env,
        key=lambda row: row["slide"],
        order=[job.stem for job in jobs],
    )
    summary = EmbedSummary(merged["done"], merged["skipped"], merged["failed"])
    if not env.is_main:
        return summary
    report = {
        "encoder": model,
        "encoder_weights_hash": ctx.encoder_hash,
        "finished": _now(),
        "seconds": round(time.perf_counter() - started, 3),
        "done": summary.done,
        "skipped": summary.skipped,
        "failed": summary.failed,
    }
    write_json_atomic(out / "embed_summary.json", report)
    say(f"embedded {len(summary.done)}, skipped {len(summary.skipped)} (already done), failed {len(summary.failed)}")
    return summary


def is_embedded(job: SlideJob, ctx: EmbedContext) -> bool:
    """Whether the slide's features file is complete and current; reads only (unlike :func:`embed_slide`, which
    records a reuse in the slide's state)."""
    final = ctx.out_dir / f"{job.stem}.h5"
    if not final.is_file():
        return False
    try:
        coords, attrs = read_patches(job.patches)
    except DataError:
        return False
    key = output_key(ctx.encoder, ctx.encoder_hash, coords, attrs, ctx.stain, ctx.bf16)
    return cache.is_current(final, key, len(coords), ("coords",))


def _one_line(error: Exception, job: SlideJob) -> str:
    """A one-line message; errors re-raised from DataLoader workers carry the worker's traceback, dropped here."""
    text = str(error) if isinstance(error, MedfoundryError) else f"{job.slide or job.patches}: {error}"
    if "Original Traceback" in text:
        # The worker's traceback ends with "module.DataError: <path>: <message>" (MedfoundryError folds it onto one
        # line): keep what follows the last exception name.
        names = list(re.finditer(r"\b[\w.]*(?:Error|Exception): ", text))
        if names:
            return text[names[-1].end() :].strip()
    lines = [line for line in text.strip().splitlines() if line.strip()]
    if len(lines) > 1:
        last = lines[-1]
        return last.split(": ", 1)[1] if last.split(": ", 1)[0].endswith("Error") else last
    return text


def _run_job(job: SlideJob, ctx: EmbedContext, summary: EmbedSummary, say: Callable[[str], None]) -> None:
    try:
        row = embed_slide(job, ctx)
    except (MedfoundryError, OSError) as error:
        # OSError covers disk-full and HDF5 write errors: this slide fails, the others still run.
        message = _one_line(error, job)
        SlideState(ctx.out_dir / "state" / f"{job.stem}.json", job.stem).record("failed", last_error=message)
        summary.failed.append({"slide": job.stem, "error": message})
        say(f"failed {message}")
        return
    if row["status"] == "skipped":
        summary.skipped.append(row)
        say(f"{job.stem}: already done, skipped")
    else:
        summary.done.append(row)
        say(f"{job.stem}: {row['tiles']} tiles in {row['seconds']:.1f} s ({row['tiles_per_s']} tiles/s)")
