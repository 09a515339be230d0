"""The one feature extractor: batches of images or tiles through an encoder, and image embeddings into the cache.

:func:`prepare_batch` gives the encoder the channels, size and normalisation it expects; :func:`encode_batches`
runs batches through it (optionally bfloat16) and checks the output; :func:`embed` embeds an image set into an
HDF5 file of :mod:`medfoundry.models.feature_cache` (the same cache slide embedding uses), reusing it when the
weights, preprocessing and data are unchanged.

Under torchrun each rank embeds a contiguous shard (cut at batch boundaries, so every rank runs the very batches
one process would) into a part file; rank 0 merges the parts into the file a single process writes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from medfoundry.data.sample import ArrayImageSet, ImageSet
from medfoundry.distributed import DistEnv, barrier, gather_objects, init_distributed, shard_bounds
from medfoundry.errors import DataError, ModelError
from medfoundry.models import feature_cache as cache
from medfoundry.models.backbones import Encoder
from medfoundry.models.checkpoint import weights_hash
from medfoundry.models.feature_cache import part_path

__all__ = [
    "Embeddings",
    "embed",
    "encode_batches",
    "extract_features",
    "part_path",
    "prepare_batch",
    "preprocessing_spec",
    "read_embeddings",
]

#: Row-aligned datasets every image embeddings file holds (``labels`` too when the images have labels).
IMAGE_COLUMNS = ("ids", "patient_ids")


@dataclass
class Embeddings:
    features: np.ndarray  # (N, D) float32
    ids: list[str]
    patient_ids: list[str]
    labels: np.ndarray | None
    path: Path | None = None
    reused: bool = False
    seconds: float = 0.0


def preprocessing_spec(encoder: Encoder, bf16: bool = False) -> dict[str, object]:
    """How pixels become features: part of the feature cache's key, so a change recomputes them."""
    spec: dict[str, object] = {
        "img_size": encoder.img_size,
        "in_chans": encoder.in_chans,
        "mean": encoder.mean.flatten().tolist(),
        "std": encoder.std.flatten().tolist(),
        "resize": "bilinear-antialias",
        "pool": encoder.pool,
    }
    if bf16:
        # bf16 autocast gives other numbers than fp32; named only when on, so existing fp32 files keep their key.
        spec["autocast"] = "bf16"
    return spec


def _key(encoder: Encoder, images: ImageSet, bf16: bool) -> dict[str, str]:
    return cache.cache_key(weights_hash(encoder.backbone), preprocessing_spec(encoder, bf16), images.fingerprint())


def _columns(images: ImageSet, start: int = 0, stop: int | None = None) -> dict[str, Any]:
    stop = len(images) if stop is None else stop
    labels = images.labels[start:stop] if images.labels is not None else None
    return {"ids": list(images.ids[start:stop]), "patient_ids": list(images.patient_ids[start:stop]), "labels": labels}


def _required(images: ImageSet) -> tuple[str, ...]:
    return (*IMAGE_COLUMNS, "labels") if images.labels is not None else IMAGE_COLUMNS


class _TensorImages(Dataset):
    def __init__(self, images: ImageSet) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.images.load(index)))


def _batches(
    images: ImageSet, batch_size: int, num_workers: int, start: int = 0, stop: int | None = None
) -> DataLoader | list[torch.Tensor]:
    stop = len(images) if stop is None else stop
    if isinstance(images, ArrayImageSet):
        # In-memory arrays: slicing whole batches skips per-sample collation.
        array = images.images
        return [
            torch.from_numpy(np.ascontiguousarray(array[i : min(i + batch_size, stop)]))
            for i in range(start, stop, batch_size)
        ]
    dataset: Dataset = _TensorImages(images)
    if (start, stop) != (0, len(images)):
        dataset = Subset(dataset, range(start, stop))
    return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)


def prepare_batch(encoder: Encoder, batch: torch.Tensor, source: str = "") -> torch.Tensor:
    """Channels, size and normalisation as the encoder expects."""
    if batch.shape[1] != encoder.in_chans:
        if batch.shape[1] == 1 and encoder.in_chans == 3:
            batch = batch.expand(-1, 3, *batch.shape[2:])  # grey to RGB encoders: replicate the channel
        else:
            raise DataError(f"images have {batch.shape[1]} channels but the encoder expects {encoder.in_chans}", source)
    if (batch.ndim == 5) != encoder.is_3d:
        kind = "a 3D encoder (e.g. vit3d_tiny_28)" if batch.ndim == 5 else "a 2D encoder"
        raise DataError(f"images of shape {tuple(batch.shape[1:])} need {kind}", source)
    x = encoder.normalize(batch)
    size = encoder.img_size
    if size is not None and x.ndim == 5:
        if tuple(x.shape[-3:]) != (size,) * 3:
            # PyTorch has no anti-aliased 3D resize; volumes are usually cut at the encoder's size anyway.
            x = F.interpolate(x, size=(size,) * 3, mode="trilinear", align_corners=False)
    elif size is not None and tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x


@torch.inference_mode()
def encode_batches(
    encoder: Encoder,
    batches: Iterable[torch.Tensor],
    device: torch.device,
    bf16: bool = False,
    source: str | Path = "",
    name_row: Callable[[int], str] = lambda row: f"row {row}",
) -> Iterator[np.ndarray]:
    """Float32 features of each batch, in order; DataError naming the first row (``name_row``) that is NaN/inf."""
    encoder.eval()
    row = 0
    for batch in batches:
        x = prepare_batch(encoder, batch.to(device, non_blocking=True), str(source))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            features = encoder(x)
        values = features.float().cpu().numpy()
        finite = np.isfinite(values).all(axis=1)
        if not finite.all():
            bad = row + int(np.flatnonzero(~finite)[0])
            raise DataError(f"encoder produced NaN/inf features (first at {name_row(bad)})", source)
        row += len(values)
        yield values


def extract_features(
    encoder: Encoder,
    images: ImageSet,
    batch_size: int = 128,
    num_workers: int = 0,
    bf16: bool = False,
    start: int = 0,
    stop: int | None = None,
    device: torch.device | None = None,
) -> np.ndarray:
    """Features of images ``start`` to ``stop`` (all by default), computed on ``device`` (the encoder's own)."""
    device = device or next(encoder.parameters()).device
    batches = _batches(images, batch_size, num_workers, start, stop)
    chunks = list(
        encode_batches(encoder, batches, device, bf16, images.source, lambda row: f"sample {images.ids[start + row]}")
    )
    return np.concatenate(chunks) if chunks else np.zeros((0, encoder.embed_dim), np.float32)


def embed(
    encoder: Encoder,
    images: ImageSet,
    out_path: Path | None = None,
    batch_size: int = 128,
    num_workers: int = 0,
    bf16: bool = False,
) -> Embeddings:
    """Embed ``images``; with ``out_path``, reuse a matching cache file or write a new one (feature_cache).

    Under torchrun the ranks share the work (module docstring) and each returns the whole result.
    """
    env = init_distributed()
    out = Path(out_path) if out_path is not None else None
    key = _key(encoder, images, bf16) if out is not None else {}
    if out is not None and cache.is_current(out, key, len(images), _required(images)):
        return read_embeddings(out)[0]
    if env.enabled:
        return _embed_sharded(encoder, images, out, batch_size, num_workers, bf16, env, key)
    started = time.perf_counter()
    features = extract_features(encoder, images, batch_size, num_workers, bf16)
    if out is not None:
        attrs = {**key, **cache.describe(preprocessing_spec(encoder, bf16), encoder.embed_dim)}
        cache.write(out, features, attrs, _columns(images))
    return _whole(images, features, out, time.perf_counter() - started)


def _embed_sharded(
    encoder: Encoder,
    images: ImageSet,
    out: Path | None,
    batch_size: int,
    num_workers: int,
    bf16: bool,
    env: DistEnv,
    key: dict[str, str],
) -> Embeddings:
    started = time.perf_counter()
    hashes = gather_objects(key.get("weights_hash") or weights_hash(encoder.backbone), env)
    if len(set(hashes)) > 1:
        raise ModelError(
            f"the {env.world_size} ranks hold different encoder weights (hashes {', '.join(hashes)}); build the "
            "encoder with a fixed seed or load it from a checkpoint on every rank"
        )
    start, stop = shard_bounds(len(images), env, align=batch_size)

    def shard() -> np.ndarray:
        # Moved for the extraction only: the caller's encoder stays where it was.
        home = next(encoder.parameters()).device
        try:
            return extract_features(encoder.to(env.device), images, batch_size, num_workers, bf16, start, stop)
        finally:
            encoder.to(home)

    if out is None:
        merged = np.concatenate(gather_objects(shard(), env))
        return _whole(images, merged, None, time.perf_counter() - started)
    part = part_path(out, env)
    part_key = {**key, "shard_start": start, "shard_stop": stop}
    if not cache.is_current(part, part_key, stop - start, _required(images)):
        cache.write(part, shard(), part_key, _columns(images, start, stop))
    barrier(env)
    if env.is_main:
        attrs = {**key, **cache.describe(preprocessing_spec(encoder, bf16), encoder.embed_dim)}
        cache.merge_parts(out, env, attrs, lambda merged, where: _check_ids(merged, images, where))
    barrier(env)
    result = read_embeddings(out)[0]
    result.reused, result.seconds = False, time.perf_counter() - started
    return result


def _check_ids(merged: dict[str, Any], images: ImageSet, where: Path) -> None:
    if merged["ids"] != list(images.ids):
        raise DataError(f"merged parts hold {len(merged['ids'])} ids that do not match the {len(images)} images", where)


def _whole(images: ImageSet, features: np.ndarray, path: Path | None, seconds: float) -> Embeddings:
    return Embeddings(features, list(images.ids), list(images.patient_ids), images.labels, path, False, seconds)


def read_embeddings(path: Path) -> tuple[Embeddings, dict[str, object]]:
    """An image embeddings file and its attributes; DataError for a file of another layout (no ids, ...)."""
    datasets, attrs = cache.read(path, ("features", *IMAGE_COLUMNS))
    embeddings = Embeddings(
        features=datasets["features"],
        ids=datasets["ids"],
        patient_ids=datasets["patient_ids"],
        labels=datasets.get("labels"),
        path=Path(path),
        reused=True,
    )
    return embeddings, attrs
