"""Batched feature extraction into HDF5, keyed by hashes of weights, preprocessing and data.

An embeddings file is reused only when all three hashes match its attributes; otherwise it is recomputed
and replaced atomically, so a stale cache is never used and an interrupted write never leaves a half file.
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
from torch.utils.data import DataLoader, Dataset

from medfoundry.data.sample import ArrayImageSet, ImageSet
from medfoundry.errors import DataError
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


def _batches(images: ImageSet, batch_size: int, num_workers: int) -> DataLoader | list[torch.Tensor]:
    if isinstance(images, ArrayImageSet):
        # In-memory arrays: slicing whole batches skips per-sample collation.
        array = images.images
        return [
            torch.from_numpy(np.ascontiguousarray(array[i : i + batch_size])) for i in range(0, len(array), batch_size)
        ]
    return DataLoader(_TensorImages(images), batch_size=batch_size, num_workers=num_workers)


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
    encoder: Encoder, images: ImageSet, batch_size: int = 128, num_workers: int = 0, bf16: bool = False
) -> np.ndarray:
    encoder.eval()
    chunks: list[np.ndarray] = []
    for batch in _batches(images, batch_size, num_workers):
        x = prepare_batch(encoder, batch, str(images.source))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            features = encoder(x)
        chunks.append(features.float().numpy())
    features = np.concatenate(chunks) if chunks else np.zeros((0, encoder.embed_dim), np.float32)
    if not np.isfinite(features).all():
        bad = int(np.flatnonzero(~np.isfinite(features).all(axis=1))[0])
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
    """Embed ``images``; with ``out_path``, reuse a matching HDF5 cache or write a new one atomically."""
    key = cache_key(encoder, images) if out_path is not None else {}
    if out_path is not None and Path(out_path).is_file():
        cached = _read_if_matching(Path(out_path), key)
        if cached is not None:
            return cached
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
