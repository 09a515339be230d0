"""Labelled CT volumes for the segmentation probe: class subsets, windowing, a z split and class-balanced crops.

Decisions:

* a label map must have the CT's shape and affine (both read with :func:`~medfoundry.data.volume.load_volume`,
  so both are RAS+); anything else is a DataError naming the label file. Label values must be whole numbers.
* classes are chosen by name from a ``label,name`` CSV (TotalSegmentator's ``labels_total.csv`` by default,
  looked up beside the label map). The probe's classes are ``0 = background`` (every voxel of any other
  structure too) and ``1..K`` in the order given. ``merge_left_right`` turns ``kidney_left`` + ``kidney_right``
  into one class ``kidney`` (any ``*_left``/``*_right`` pair whose both halves were asked for).
* the split runs along z (axis 2, towards Superior): one contiguous test block ``[test_start, test_stop)`` as
  fractions of the slices, a margin of ``margin_slices`` on each side that nobody uses, and the rest as one or
  two contiguous train blocks. Blocks are cut out as separate arrays, so no test voxel (image or label) ever
  reaches training, not even as context at a crop border.
* the CT is windowed to 0..1 (soft tissue, W 400 / L 50, by default) before anything else; padding, where a
  block is thinner than the encoder's input, is 0 (below the window: what the nifti pre-training reader and
  MONAI's sliding-window inference pad with too).
* training crops come from MONAI: ``SpatialPadd`` in-plane to the crop size and ``ClassesToIndicesd`` once per
  block, then ``RandCropByLabelClassesd`` with equal ratios per class, so a crop centre is as often in a kidney
  as in the liver or the background (a class absent from a block is skipped for that block), and a symmetric
  ``SpatialPadd`` in z when the crop is thinner than the encoder's input (see :class:`CropSampler`).
"""

from __future__ import annotations

import csv
import difflib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medfoundry.data.intensity import Window, apply_window, resample
from medfoundry.data.volume import Volume, load_volume
from medfoundry.errors import DataError

LABEL_NAMES_FILE = "labels_total.csv"
BACKGROUND = "background"
_AFFINE_TOLERANCE_MM = 1e-3


@dataclass(frozen=True)
class ClassMap:
    """The probe's classes: ``names[0]`` is background; ``source_ids[k]`` are the label-map values of class k."""

    names: tuple[str, ...]
    source_ids: tuple[tuple[int, ...], ...]

    @property
    def n_classes(self) -> int:
        return len(self.names)

    def remap(self, labels: np.ndarray) -> np.ndarray:
        """Label-map values -> probe class indices (uint8); every unlisted value becomes background."""
        lut = np.zeros(int(max(labels.max(initial=0), max(max(ids) for ids in self.source_ids[1:]))) + 1, np.uint8)
        for index, ids in enumerate(self.source_ids[1:], start=1):
            lut[list(ids)] = index
        return lut[labels.astype(np.int64)]


def read_label_names(path: str | Path) -> dict[str, int]:
    """``name -> label id`` from a CSV with columns ``label`` and ``name`` (TotalSegmentator's layout)."""
    path = Path(path)
    if not path.is_file():
        raise DataError("label-name CSV not found (columns: label,name); name one with --label-names", path)
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or not {"label", "name"} <= set(reader.fieldnames):
            raise DataError(f"label-name CSV needs columns 'label' and 'name', found {reader.fieldnames}", path)
        names: dict[str, int] = {}
        for row_number, row in enumerate(reader, start=2):
            try:
                names[row["name"].strip()] = int(row["label"])
            except (TypeError, ValueError):
                raise DataError(f"line {row_number}: label {row['label']!r} is not an integer", path) from None
    if not names:
        raise DataError("label-name CSV has no rows", path)
    return names


def build_class_map(classes: Sequence[str], label_names: dict[str, int], csv_path: Path, merge: bool) -> ClassMap:
    """The probe's class map for ``classes`` (names from the CSV at ``csv_path``); see the module docstring."""
    if not classes:
        raise DataError("no classes chosen: give at least one structure name", csv_path)
    unknown = [name for name in classes if name not in label_names]
    if unknown:
        close = sorted({m for n in unknown for m in difflib.get_close_matches(n, list(label_names), n=3)})
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise DataError(
            f"class(es) {', '.join(repr(n) for n in unknown)} not in the label names; {hint}known: "
            f"{', '.join(sorted(label_names)[:12])}, ... ({len(label_names)} in all)",
            csv_path,
        )
    if len(set(classes)) != len(classes) or BACKGROUND in classes:
        raise DataError(f"classes must be distinct and not '{BACKGROUND}', got {list(classes)}", csv_path)
    groups: dict[str, list[int]] = {}
    for name in classes:
        key = name
        if merge:
            stem, _, side = name.rpartition("_")
            if side in ("left", "right") and f"{stem}_{'right' if side == 'left' else 'left'}" in classes:
                key = stem
        groups.setdefault(key, []).append(label_names[name])
    names = (BACKGROUND, *groups)
    return ClassMap(names, ((0,), *(tuple(ids) for ids in groups.values())))


def default_label_names(label_path: Path) -> Path:
    return label_path.parent / LABEL_NAMES_FILE


@dataclass
class LabelledVolume:
    """A windowed CT (0..1) and its probe labels, both ``(x, y, z)`` in RAS+, with where they came from."""

    image: np.ndarray
    labels: np.ndarray
    spacing: tuple[float, float, float]
    image_path: Path
    label_path: Path
    name: str = ""


def load_labelled_volume(
    image_path: str | Path,
    label_path: str | Path,
    class_map: ClassMap,
    window: Window = "soft_tissue",
    spacing: float | None = None,
) -> LabelledVolume:
    """Read a CT and its label map, check they share a grid, window the CT and remap the labels."""
    image_path, label_path = Path(image_path), Path(label_path)
    ct = load_volume(image_path)
    seg = load_volume(label_path)
    check_same_grid(ct, seg, image_path, label_path)
    values = seg.array
    if not np.array_equal(values, np.round(values)) or values.min() < 0:
        raise DataError("label map holds non-integer or negative values: is it a label map?", label_path)
    if spacing is not None:
        # Linear for the CT, nearest neighbour for labels: interpolated label values would invent classes.
        ct = resample(ct, spacing, order=1)
        seg = resample(seg, spacing, order=0)
    windowed = apply_window(ct.array, window)
    labels = class_map.remap(np.rint(seg.array).astype(np.int64))
    name = image_path.name.removesuffix(".gz").removesuffix(".nii")
    return LabelledVolume(np.ascontiguousarray(windowed), labels, ct.spacing, image_path, label_path, name)


def check_same_grid(ct: Volume, seg: Volume, image_path: Path, label_path: Path) -> None:
    if ct.shape != seg.shape:
        raise DataError(f"label map has shape {seg.shape} but the CT {image_path} has {ct.shape}", label_path)
    if not np.allclose(ct.affine, seg.affine, atol=_AFFINE_TOLERANCE_MM):
        raise DataError(
            f"label map affine differs from the CT's ({image_path}): largest difference "
            f"{np.abs(ct.affine - seg.affine).max():.4g} mm; resample the labels onto the CT grid first",
            label_path,
        )


# ---------------------------------------------------------------------------------------------- z split


@dataclass(frozen=True)
class ZSplit:
    """Slice ranges ``[start, stop)`` along z: the test block, and the train blocks outside it and its margins."""

    test: tuple[int, int]
    train: tuple[tuple[int, int], ...]
    margin: int

    def describe(self) -> str:
        train = ", ".join(f"[{a}, {b})" for a, b in self.train)
        return f"test z [{self.test[0]}, {self.test[1]}), train z {train}, margin {self.margin} slices"


def z_split(n_slices: int, test_start: float, test_stop: float, margin: int, where: Path | None = None) -> ZSplit:
    """Contiguous test block from fractions of ``n_slices``; train is the rest minus a margin on both sides."""
    if not 0.0 <= test_start < test_stop <= 1.0:
        raise DataError(f"test block must satisfy 0 <= test_start < test_stop <= 1, got {test_start}, {test_stop}")
    lo, hi = int(round(test_start * n_slices)), int(round(test_stop * n_slices))
    if hi <= lo:
        raise DataError(f"test block [{test_start}, {test_stop}) of {n_slices} slices holds no slice", where)
    train = tuple((a, b) for a, b in ((0, lo - margin), (hi + margin, n_slices)) if b - a >= 1 and (a, b) != (0, 0))
    if not train:
        raise DataError(
            f"no training slices left: {n_slices} slices, test block [{lo}, {hi}) and a margin of {margin}", where
        )
    return ZSplit((lo, hi), train, margin)


@dataclass
class Block:
    """A contiguous z range of one volume: windowed image and labels, ``(1, x, y, z)`` each."""

    image: np.ndarray
    labels: np.ndarray
    volume: str
    z_range: tuple[int, int]


def cut_blocks(volume: LabelledVolume, split: ZSplit) -> tuple[list[Block], Block]:
    """Train blocks and the test block of ``volume`` as separate arrays (copies: no view into the other)."""

    def block(z: tuple[int, int]) -> Block:
        a, b = z
        image = volume.image[None, :, :, a:b].copy()
        labels = volume.labels[None, :, :, a:b].copy()
        return Block(image, labels, volume.name, z)

    return [block(z) for z in split.train], block(split.test)


# ---------------------------------------------------------------------------------------------- crops


class CropSampler:
    """Class-balanced training crops of ``size``^3 from train blocks (MONAI transforms; see module docstring).

    Each step draws a crop thickness ``t`` along z in ``z_slices`` (clipped to the block), crops
    ``size x size x t`` around a voxel of a class chosen with equal odds (``RandCropByLabelClassesd``), and pads
    z symmetrically back to ``size`` with 0, as sliding-window inference pads a test block thinner than the
    window. Without this, a thin test block would sit in the window in a way no training crop ever did.
    """

    def __init__(
        self,
        blocks: Sequence[Block],
        size: int,
        n_classes: int,
        batch_size: int,
        seed: int = 0,
        z_slices: tuple[int, int] | None = None,
    ) -> None:
        from monai.transforms import ClassesToIndicesd, SpatialPadd

        if not blocks:
            raise DataError("no training block to sample crops from")
        self.size = size
        self.batch_size = batch_size
        self.n_classes = n_classes
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        low, high = z_slices or (size, size)
        self.z_slices = (max(1, min(low, size)), max(1, min(high, size)))
        # In-plane padding only (z keeps its true extent, so a crop's thickness is real slices).
        in_plane = SpatialPadd(keys=("image", "label"), spatial_size=(size, size, -1), value=0)
        indices = ClassesToIndicesd(keys="label", num_classes=n_classes)
        self.items = [indices(in_plane({"image": b.image, "label": b.labels})) for b in blocks]
        self.thickness = [int(b.image.shape[-1]) for b in blocks]
        self.weights = np.array([b.image[0].size for b in blocks], float)
        self.weights /= self.weights.sum()
        self.pad = SpatialPadd(keys=("image", "label"), spatial_size=(size,) * 3, method="symmetric", value=0)
        self._croppers: dict[int, object] = {}

    def _cropper(self, thickness: int) -> object:
        from monai.transforms import RandCropByLabelClassesd

        if thickness not in self._croppers:
            crop = RandCropByLabelClassesd(
                keys=("image", "label"),
                label_key="label",
                spatial_size=(self.size, self.size, thickness),
                ratios=[1.0] * self.n_classes,
                num_classes=self.n_classes,
                num_samples=self.batch_size,
                indices_key="label_cls_indices",
                warn=False,
            )
            crop.set_random_state(seed=self.seed + thickness)
            self._croppers[thickness] = crop
        return self._croppers[thickness]

    def sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, 1, S, S, S)`` float images in 0..1 and ``(B, 1, S, S, S)`` long labels, from one random block."""
        which = int(self.rng.choice(len(self.items), p=self.weights))
        low, high = self.z_slices
        thickness = min(int(self.rng.integers(low, high + 1)), self.thickness[which])
        crops = [self.pad(c) for c in self._cropper(thickness)(self.items[which])]  # type: ignore[operator]
        images = torch.stack([torch.as_tensor(np.asarray(c["image"]), dtype=torch.float32) for c in crops])
        labels = torch.stack([torch.as_tensor(np.asarray(c["label"]), dtype=torch.long) for c in crops])
        return images, labels

    def draw(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A fixed pool of ``n`` crops (whole calls of :meth:`sample`, trimmed to ``n``)."""
        images, labels = zip(*(self.sample() for _ in range(-(-n // self.batch_size))), strict=True)
        return torch.cat(images)[:n], torch.cat(labels)[:n]
