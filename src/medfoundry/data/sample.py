"""The common data model: a split of images with sample ids, patient ids and labels.

Every reader (MedMNIST npz, image folder / CSV manifest, later DICOM, NIfTI and WSI tiles) returns
``ImageSet`` objects, so pre-training, embedding and adaptation never depend on the file format.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medfoundry.errors import DataError


class ImageSet(ABC):
    """A sequence of images (channels first: (C,H,W) or (C,D,H,W)) with ids, patient ids and labels.

    ``patient_ids`` always exists (the sample id is used where the data has none), so that every split
    and every bootstrap can group by patient.
    """

    name: str
    source: Path
    ids: list[str]
    patient_ids: list[str]
    labels: np.ndarray | None
    # Per-sample metadata beyond the label (site, scanner, sex, a group from the file name ...): column -> one
    # string per sample, for subgroup analyses. None where the reader found none; subsets carry theirs.
    metadata: dict[str, list[str]] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    @abstractmethod
    def load(self, index: int) -> np.ndarray:
        """Return image ``index`` channels first, as uint8 or float32."""

    @abstractmethod
    def fingerprint(self) -> str:
        """A hash of the content that changes whenever images, ids or labels change."""

    def content_fingerprint(self) -> str:
        """Like :meth:`fingerprint`, but from the images' bytes alone, never from where the files lie or when they
        were written: it stays the same when the data are copied, moved or restored from a backup.

        File-backed sets read every file once for it (bytes, not decoded pixels), so it is meant for long jobs
        that resume (pre-training) rather than for every cache lookup. In-memory arrays hash their content anyway.
        """
        return self.fingerprint()

    @property
    def num_channels(self) -> int:
        return int(self.load(0).shape[0])

    def subset(self, indices: np.ndarray | list[int], name: str | None = None) -> ImageSet:
        return SubsetImageSet(self, np.asarray(indices, dtype=np.int64), name)


@dataclass
class ArrayImageSet(ImageSet):
    """Images held in memory as one array (N,C,H,W) or (N,C,D,H,W)."""

    name: str
    source: Path
    images: np.ndarray
    ids: list[str]
    patient_ids: list[str]
    labels: np.ndarray | None = None
    _fingerprint: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        # Every consumer casts to float32, which silently keeps only the real part of complex pixels.
        if np.iscomplexobj(self.images):
            raise DataError(
                f"images of {self.name!r} are complex-valued ({self.images.dtype}); use magnitudes", self.source
            )

    def load(self, index: int) -> np.ndarray:
        return self.images[index]

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            digest = hashlib.sha256()
            digest.update(np.ascontiguousarray(self.images).tobytes())
            digest.update("\n".join(self.ids).encode())
            digest.update("\n".join(self.patient_ids).encode())
            if self.labels is not None:
                digest.update(np.ascontiguousarray(self.labels).tobytes())
            self._fingerprint = digest.hexdigest()[:16]
        return self._fingerprint


class SubsetImageSet(ImageSet):
    """A view of selected samples of another ImageSet (label fractions, folds)."""

    def __init__(self, parent: ImageSet, indices: np.ndarray, name: str | None = None) -> None:
        self.parent = parent
        self.indices = indices
        self.name = name or f"{parent.name}[{len(indices)}]"
        self.source = parent.source
        self.ids = [parent.ids[i] for i in indices]
        self.patient_ids = [parent.patient_ids[i] for i in indices]
        self.labels = None if parent.labels is None else parent.labels[indices]
        parent_metadata = parent.metadata
        if parent_metadata:
            self.metadata = {column: [values[i] for i in indices] for column, values in parent_metadata.items()}

    def load(self, index: int) -> np.ndarray:
        return self.parent.load(int(self.indices[index]))

    def fingerprint(self) -> str:
        return self._digest(self.parent.fingerprint())

    def content_fingerprint(self) -> str:
        return self._digest(self.parent.content_fingerprint())

    def _digest(self, parent: str) -> str:
        digest = hashlib.sha256(parent.encode())
        digest.update(self.indices.tobytes())
        return digest.hexdigest()[:16]


#: A dataset is a mapping from split name ("train", "val", "test") to ImageSet.
Splits = dict[str, ImageSet]
