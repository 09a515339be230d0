"""Several unlabeled datasets as one pre-training set, mixed with stated weights.

A foundation model's value comes from the breadth of its unlabeled data, and sources differ in size by orders
of magnitude (546 ultrasound images next to thousands of slide tiles). Concatenating them would let the largest
source dominate, so each epoch draws from every source in proportion to its weight instead: source ``j`` fills
``weight_j / sum(weights)`` of the epoch's samples, cycling through its own shuffled images (a small source is
repeated, a large one is subsampled; over epochs every image is seen).

Images keep their own sizes (the SSL views crop and resize them); channels are converted to the model's count,
because a 1-channel model may learn from RGB tiles (as grey) and a 3-channel model from grey X-rays (repeated).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medfoundry.data.sample import ImageSet
from medfoundry.errors import DataError


@dataclass(frozen=True)
class MixtureSource:
    images: ImageSet
    weight: float
    description: str


def convert_channels(image: np.ndarray, channels: int, source: str = "") -> np.ndarray:
    """(C, ...) image to ``channels`` channels: RGB to grey by ITU-R 601 luma, grey to RGB by repetition."""
    have = image.shape[0]
    if have == channels:
        return image
    if have == 3 and channels == 1:
        grey = np.tensordot(np.array([0.299, 0.587, 0.114], dtype=np.float32), image.astype(np.float32), axes=1)
        return (np.clip(grey.round(), 0, 255).astype(np.uint8) if image.dtype == np.uint8 else grey)[None]
    if have == 1 and channels == 3:
        return np.repeat(image, 3, axis=0)
    raise DataError(f"cannot convert an image with {have} channels to {channels}", source)


class ConvertedChannels(ImageSet):
    """Another ImageSet's images converted to ``channels`` channels (see :func:`convert_channels`)."""

    def __init__(self, parent: ImageSet, channels: int) -> None:
        self.parent = parent
        self.channels = channels
        self.name = parent.name
        self.source = parent.source
        self.ids = parent.ids
        self.patient_ids = parent.patient_ids
        self.labels = parent.labels

    def load(self, index: int) -> np.ndarray:
        return convert_channels(self.parent.load(index), self.channels, f"{self.source}#{self.ids[index]}")

    def fingerprint(self) -> str:
        return self._digest(self.parent.fingerprint())

    def content_fingerprint(self) -> str:
        return self._digest(self.parent.content_fingerprint())

    def _digest(self, parent: str) -> str:
        return hashlib.sha256(f"{parent}|channels={self.channels}".encode()).hexdigest()[:16]


class MixedImageSet(ImageSet):
    """The images of several sources, indexed one after another, with per-source sampling weights."""

    def __init__(self, sources: list[MixtureSource], channels: int, name: str = "mixture") -> None:
        if not sources:
            raise DataError("a pre-training mixture needs at least one source")
        for source in sources:
            if not source.weight > 0:
                raise DataError(f"source weight must be positive, got {source.weight}", source.description)
            if len(source.images) == 0:
                raise DataError("source has no images", source.description)
        self.sources = sources
        self.channels = channels
        self.name = name
        self.source = Path(sources[0].images.source)
        self.offsets = np.cumsum([0] + [len(s.images) for s in sources])
        self.ids = [f"{k}:{i}" for k, s in enumerate(sources) for i in s.images.ids]
        self.patient_ids = [f"{k}:{p}" for k, s in enumerate(sources) for p in s.images.patient_ids]
        self.labels = None

    @property
    def weights(self) -> np.ndarray:
        weights = np.array([s.weight for s in self.sources], dtype=np.float64)
        return weights / weights.sum()

    def locate(self, index: int) -> tuple[int, int]:
        source = int(np.searchsorted(self.offsets, index, side="right") - 1)
        return source, index - int(self.offsets[source])

    def load(self, index: int) -> np.ndarray:
        source, local = self.locate(index)
        images = self.sources[source].images
        return convert_channels(images.load(local), self.channels, f"{images.source}#{images.ids[local]}")

    def fingerprint(self) -> str:
        return self._digest([source.images.fingerprint() for source in self.sources])

    def content_fingerprint(self) -> str:
        return self._digest([source.images.content_fingerprint() for source in self.sources])

    def _digest(self, parts: list[str]) -> str:
        digest = hashlib.sha256(str(self.channels).encode())
        for part, source in zip(parts, self.sources, strict=True):
            digest.update(f"{part}|{source.weight!r}".encode())
        return digest.hexdigest()[:16]

    def epoch_order(self, generator: torch.Generator) -> list[int]:
        """One epoch's sample order: ``len(self)`` draws split across sources by weight, shuffled together."""
        total = len(self)
        # Largest-remainder rounding keeps the counts summing to the epoch length exactly.
        exact = self.weights * total
        counts = np.floor(exact).astype(int)
        for k in np.argsort(-(exact - counts))[: total - counts.sum()]:
            counts[k] += 1
        order: list[int] = []
        for k, (source, count) in enumerate(zip(self.sources, counts, strict=True)):
            size = len(source.images)
            picks = torch.cat([torch.randperm(size, generator=generator) for _ in range(-(-count // size))])[:count]
            order.extend((picks + int(self.offsets[k])).tolist())
        shuffle = torch.randperm(len(order), generator=generator).tolist()
        return [order[i] for i in shuffle]

    def describe(self) -> str:
        weights = self.weights
        return "; ".join(
            f"{s.description} ({len(s.images)} images, weight {w:.2f})"
            for s, w in zip(self.sources, weights, strict=True)
        )
