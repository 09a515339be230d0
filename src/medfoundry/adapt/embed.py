"""Batched feature extraction into HDF5, keyed by hashes of weights, preprocessing and data.

An embeddings file is reused only when all three hashes match its attributes; otherwise it is recomputed
and replaced atomically, so a stale cache is never used and an interrupted write never leaves a half file.

Under torchrun each rank embeds a contiguous shard (cut at batch boundaries, so every rank runs the very batches
one process would) into a part file beside the output; rank 0 merges the parts in order into the same file a
single process writes and removes them. A part left by an interrupted run is reused when its hashes match.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from medfoundry.data.sample import ArrayImageSet, ImageSet
from medfoundry.distributed import DistEnv, barrier, gather_objects, init_distributed, shard_bounds
from medfoundry.errors import DataError, ModelError
from medfoundry.io_utils import atomic_path, hash_json
from medfoundry.models.backbones import Encoder
from medfoundry.models.checkpoint import weights_hash

log = logging.getLogger("medfoundry.embed")


@dataclass
class Embeddings:
    features: np.ndarray  # (N, D) float32
    ids: list[str]
    patient_ids: list[str]
    labels: np.ndarray | None
    path: Path | None = None
    reused: bool = False
    seconds: float = 0.0


def preprocessing_spec(encoder: Encoder) -> dict[str, object]:
    return {
        "img_size": encoder.img_size,
        "in_chans": encoder.in_chans,
        "mean": encoder.mean.flatten().tolist(),
        "std": encoder.std.flatten().tolist(),
        "resize": "bilinear-antialias",
        "pool": encoder.pool,
    }


def cache_key(encoder: Encoder, images: ImageSet) -> dict[str, str]:
    return {
        "weights_hash": weights_hash(encoder.backbone),
        "preprocessing_hash": hash_json(preprocessing_spec(encoder)),
        "data_hash": images.fingerprint(),
    }


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
    encoder.eval()
    device = device or next(encoder.parameters()).device
    chunks: list[np.ndarray] = []
    for batch in _batches(images, batch_size, num_workers, start, stop):
        x = prepare_batch(encoder, batch.to(device, non_blocking=True), str(images.source))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            features = encoder(x)
        chunks.append(features.float().cpu().numpy())
    features = np.concatenate(chunks) if chunks else np.zeros((0, encoder.embed_dim), np.float32)
    if not np.isfinite(features).all():
        bad = start + int(np.flatnonzero(~np.isfinite(features).all(axis=1))[0])
        raise DataError(f"encoder produced NaN/inf features (first at sample {images.ids[bad]})", images.source)
    return features


def embed(
    encoder: Encoder,
    images: ImageSet,
    out_path: Path | None = None,
    batch_size: int = 128,
    num_workers: int = 0,
    bf16: bool = False,
) -> Embeddings:
    """Embed ``images``; with ``out_path``, reuse a matching HDF5 cache or write a new one atomically.

    Under torchrun the ranks share the work (module docstring) and each returns the whole result.
    """
    env = init_distributed()
    key = cache_key(encoder, images) if out_path is not None else {}
    if out_path is not None and Path(out_path).is_file():
        cached = _read_if_matching(Path(out_path), key)
        if cached is not None:
            return cached
    if env.enabled:
        return _embed_sharded(encoder, images, out_path, batch_size, num_workers, bf16, env, key)
    started = time.perf_counter()
    features = extract_features(encoder, images, batch_size, num_workers, bf16)
    result = Embeddings(
        features,
        list(images.ids),
        list(images.patient_ids),
        images.labels,
        out_path,
        False,
        time.perf_counter() - started,
    )
    if out_path is not None:
        write_embeddings(
            Path(out_path),
            result,
            {**key, "preprocessing": hash_json(preprocessing_spec(encoder)), "embed_dim": features.shape[1]},
        )
    return result


def part_path(out_path: Path, env: DistEnv) -> Path:
    """Where rank ``env.rank`` writes its shard of ``out_path`` before rank 0 merges the parts."""
    return out_path.with_name(f"{out_path.name}.part{env.rank}-of-{env.world_size}")


def _embed_sharded(
    encoder: Encoder,
    images: ImageSet,
    out_path: Path | None,
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
    # Moved for the extraction only: the caller's encoder stays where it was.
    home = next(encoder.parameters()).device
    if out_path is None:
        features = extract_features(encoder.to(env.device), images, batch_size, num_workers, bf16, start, stop)
        encoder.to(home)
        merged = np.concatenate(gather_objects(features, env))
        return _whole(images, merged, None, time.perf_counter() - started)
    out_path = Path(out_path)
    part = part_path(out_path, env)
    part_key = {**key, "shard_start": start, "shard_stop": stop}
    done = _read_if_matching(part, part_key) if part.is_file() else None
    if done is None:
        features = extract_features(encoder.to(env.device), images, batch_size, num_workers, bf16, start, stop)
        encoder.to(home)
        shard = Embeddings(
            features,
            list(images.ids[start:stop]),
            list(images.patient_ids[start:stop]),
            images.labels[start:stop] if images.labels is not None else None,
        )
        write_embeddings(part, shard, part_key)
    barrier(env)
    if env.is_main:
        _merge_parts(out_path, images, env, {**key, "preprocessing": hash_json(preprocessing_spec(encoder))})
    barrier(env)
    merged, _ = read_embeddings(out_path)
    merged.reused, merged.seconds = False, time.perf_counter() - started
    return merged


def _merge_parts(out_path: Path, images: ImageSet, env: DistEnv, attrs: dict[str, object]) -> None:
    """Rank 0: the parts, in rank order, into the one file a single process writes; then the parts go."""
    parts = [part_path(out_path, DistEnv(rank, env.world_size)) for rank in range(env.world_size)]
    shards = [read_embeddings(path)[0] for path in parts]
    features = np.concatenate([shard.features for shard in shards])
    ids = [sample_id for shard in shards for sample_id in shard.ids]
    if ids != list(images.ids):
        raise DataError(f"merged parts hold {len(ids)} ids that do not match the {len(images)} images", parts[0])
    labels = np.concatenate([s.labels for s in shards]) if images.labels is not None else None  # type: ignore[misc]
    write_embeddings(out_path, _whole(images, features, labels, 0.0), {**attrs, "embed_dim": features.shape[1]})
    for path in parts:
        path.unlink()


def _whole(images: ImageSet, features: np.ndarray, labels: np.ndarray | None, seconds: float) -> Embeddings:
    return Embeddings(
        features,
        list(images.ids),
        list(images.patient_ids),
        images.labels if labels is None else labels,
        None,
        False,
        seconds,
    )


def write_embeddings(path: Path, embeddings: Embeddings, attrs: dict[str, object]) -> None:
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as h5:
        h5.create_dataset("features", data=embeddings.features)
        h5.create_dataset("ids", data=np.array(embeddings.ids, dtype=object), dtype=h5py.string_dtype())
        h5.create_dataset("patient_ids", data=np.array(embeddings.patient_ids, dtype=object), dtype=h5py.string_dtype())
        if embeddings.labels is not None:
            h5.create_dataset("labels", data=embeddings.labels)
        for name, value in attrs.items():
            h5.attrs[name] = value


def read_embeddings(path: Path) -> tuple[Embeddings, dict[str, object]]:
    try:
        with h5py.File(path, "r") as h5:
            attrs = dict(h5.attrs)
            labels = h5["labels"][()] if "labels" in h5 else None
            embeddings = Embeddings(
                features=h5["features"][()],
                ids=[v.decode() if isinstance(v, bytes) else str(v) for v in h5["ids"][()]],
                patient_ids=[v.decode() if isinstance(v, bytes) else str(v) for v in h5["patient_ids"][()]],
                labels=labels,
                path=path,
                reused=True,
            )
    except (OSError, KeyError) as error:
        raise DataError(f"not a readable embeddings file ({error})", path) from None
    return embeddings, attrs


def _read_if_matching(path: Path, key: dict[str, str]) -> Embeddings | None:
    try:
        embeddings, attrs = read_embeddings(path)
    except DataError:
        log.warning("%s: unreadable embeddings cache, recomputing", path)
        return None
    if all(attrs.get(name) == value for name, value in key.items()):
        return embeddings
    log.info("%s: cache is stale (weights, preprocessing or data changed), recomputing", path)
    return None
