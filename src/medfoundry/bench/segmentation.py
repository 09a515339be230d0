"""The segmentation task kind: light decoders on a frozen 3D encoder's tokens, Dice per class with bootstrap CIs.

How segmentation maps onto the engine's cells (the probe itself is :mod:`medfoundry.segment`):

* a task is a set of labelled CT volumes (a suite task's ``segmentation:`` section, a
  :class:`~medfoundry.segment.config.SegmentTaskConfig`); each volume is cut along z into one test block and one or
  two train blocks. The **train blocks are the cases** a label fraction draws from (nested per seed, at least one
  block), so a learning curve asks how many labelled blocks a decoder needs;
* the **adapters are the task's decoders** (``linear``, ``unetr``): a cell trains one decoder on the frozen encoder's
  tokens over its train blocks and predicts every test block by sliding window;
* a cell's output is every test block's class mask, raveled and concatenated into ``CellOutput.proba`` (uint8). The
  scorer cuts it back into blocks, counts Dice per bootstrap unit (z slab or whole volume) and gives Dice per class
  and the mean over the foreground classes with unit-bootstrap CIs; it keeps the masks (``.npz``) and the per-unit
  counts (the ``.csv`` the cell store checks) as the cell's predictions;
* the ``all_background`` baseline (the empty prediction) needs no encoder: one cell per fraction and seed, so every
  learning curve has its floor beside it.
"""

from __future__ import annotations

import csv
import hashlib
import io
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from medfoundry.bench.grid import Cell, LabelBudgets, grid_cells
from medfoundry.bench.kinds import TASK_KINDS, EngineContext, TaskKind
from medfoundry.bench.task_parts import ConfiguredTask, KindScorer
from medfoundry.config import EncoderConfig, EvaluateConfig, SuiteConfig, TaskConfig
from medfoundry.errors import DataError, MedfoundryError, ModelError
from medfoundry.evaluate.cells import CellOutput
from medfoundry.evaluate.metrics import MetricValue
from medfoundry.io_utils import atomic_path, write_text_atomic
from medfoundry.models.backbones import Encoder
from medfoundry.models.checkpoint import weights_hash
from medfoundry.segment.config import SegmentTaskConfig
from medfoundry.segment.data import Block, ClassMap, cut_blocks
from medfoundry.segment.heads import check_token_encoder
from medfoundry.segment.metrics import DiceCounts, dice_with_ci, slab_units
from medfoundry.segment.train import (
    BASELINE_ADAPTER,
    Units,
    block_counts,
    bootstrap_units,
    fit_decoder,
    load_probe_data,
    predict_block,
)

# The model name of the baseline cells: the empty prediction belongs to no encoder.
BASELINE_MODEL = "baseline"


@dataclass
class SegmentationTask(ConfiguredTask):
    """A segmentation task's blocks and how it is scored; the engine reads the same attributes as of a ``Task``."""

    config: TaskConfig
    settings: SegmentTaskConfig
    class_map: ClassMap
    train_blocks: list[Block]
    test_blocks: list[Block]
    splits: dict[str, str]
    unit_name: str
    units: Units
    metrics: list[str]
    kind: str = "segmentation"
    precomputed: bool = False

    @property
    def n_test_units(self) -> int:
        return sum(1 if unit is None else len(unit) for unit in self.units)

    @property
    def thinnest_test(self) -> int:
        return min(block.labels.shape[-1] for block in self.test_blocks)

    def train_units(self, subset: np.ndarray | None = None) -> int:
        """How much labelled data a cell saw, in test-unit-sized slabs (the old probe's ``n_train``)."""
        chosen = self.train_blocks if subset is None else [self.train_blocks[i] for i in subset]
        slices = self.settings.split.unit_slices
        return sum(len(slab_units(block.labels.shape[-1], slices)) for block in chosen)

    @cached_property
    def _fingerprint(self) -> str:
        digest = hashlib.sha256(repr((self.class_map, self.unit_name, self.units)).encode())
        for block in [*self.train_blocks, *self.test_blocks]:
            digest.update(f"{block.volume}:{block.z_range}:{block.image.shape}".encode())
            digest.update(np.ascontiguousarray(block.image).tobytes())
            digest.update(np.ascontiguousarray(block.labels).tobytes())
        return digest.hexdigest()[:16]

    def fingerprint(self) -> str:
        """Changes whenever a voxel, a label, a class or a block boundary changes."""
        return self._fingerprint

    def metadata(self) -> dict[str, Any]:
        names = self.class_map.names
        return {
            "kind": self.kind,
            "n_classes": self.class_map.n_classes,
            "classes": list(names),
            "label_ids": dict(zip(names[1:], map(list, self.class_map.source_ids[1:]), strict=True)),
            "splits": self.splits,
            "unit": self.unit_name,
            "n_train_blocks": len(self.train_blocks),
            "n_train_units": self.train_units(),
            "n_test_units": self.n_test_units,
            "decoders": list(self.settings.decoders),
            "window": self.settings.window,
            "label_fractions_of": "train blocks (each volume's z blocks outside the test block and its margins)",
            "baseline": f"{BASELINE_ADAPTER}: every voxel background; each organ's Dice is 0 (empty prediction)",
        }

    def describe(self) -> str:
        organs = ", ".join(self.class_map.names[1:])
        return (
            f"{self.name}: segmentation of {organs} (+ background) in {len(self.test_blocks)} volume(s), "
            f"{len(self.train_blocks)} train / {len(self.test_blocks)} test z blocks, bootstrap over "
            f"{self.n_test_units} x {self.unit_name}; decoders {', '.join(self.settings.decoders)}; "
            f"headline metric {self.metrics[0]}"
        )


def pack_masks(masks: list[np.ndarray]) -> np.ndarray:
    """Test-block masks as one flat uint8 array: what a cell's ``CellOutput.proba`` holds for segmentation."""
    return np.concatenate([np.asarray(mask, dtype=np.uint8).ravel() for mask in masks])


def masks_path(predictions_path: Path) -> Path:
    return Path(predictions_path).with_suffix(".npz")


def read_masks(predictions_path: Path) -> list[np.ndarray]:
    """A cell's predicted class mask of every test block, ``(x, y, z)`` each, in the task's block order."""
    with np.load(masks_path(predictions_path)) as stored:
        return [stored[key] for key in sorted(stored.files)]


@dataclass
class SegmentationScorer(KindScorer[SegmentationTask]):
    """Dice per class and its mean with unit-bootstrap CIs; masks and per-unit counts as the cell's predictions."""

    @property
    def n_test(self) -> int:
        return self.task.n_test_units

    def masks(self, output: CellOutput) -> list[np.ndarray]:
        shapes = [block.labels.shape[1:] for block in self.task.test_blocks]
        sizes = [int(np.prod(shape)) for shape in shapes]
        flat = np.asarray(output.proba).ravel()
        if flat.size != sum(sizes):
            raise DataError(
                f"a cell predicted {flat.size} voxels; the test blocks of '{self.task.name}' hold {sum(sizes)}"
            )
        parts = np.split(flat, np.cumsum(sizes)[:-1])
        return [part.reshape(shape) for part, shape in zip(parts, shapes, strict=True)]

    def counts(self, output: CellOutput) -> DiceCounts:
        task = self.task
        return block_counts(self.masks(output), task.test_blocks, task.units, task.class_map.n_classes)

    def score(self, output: CellOutput, seed: int) -> Mapping[str, MetricValue]:
        values = dice_with_ci(
            self.counts(output), self.task.class_map.names, self.evaluate.n_bootstrap, self.evaluate.confidence, seed
        )
        return {metric: values[metric] for metric in self.metrics}

    def save_predictions(self, path: Path, output: CellOutput) -> None:
        # The masks first: the cell store takes the CSV's presence to mean the cell's predictions are complete.
        blocks = zip(self.task.test_blocks, self.masks(output), strict=True)
        arrays = {f"{i:04d}_{block.volume}": mask for i, (block, mask) in enumerate(blocks)}
        with atomic_path(masks_path(path)) as tmp, tmp.open("wb") as handle:
            np.savez_compressed(handle, **arrays)
        counts = self.counts(output)
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["unit", "class", "intersection", "predicted", "reference", "dice"])
        for u, unit in enumerate(counts.unit_names):
            for k, name in enumerate(self.task.class_map.names):
                inter, pred, ref = (int(a[u, k]) for a in (counts.intersection, counts.predicted, counts.reference))
                dice = f"{2 * inter / (pred + ref):.6f}" if pred + ref else ""
                writer.writerow([unit, name, inter, pred, ref, dice])
        write_text_atomic(path, buffer.getvalue())


def _metrics(config: TaskConfig, class_map: ClassMap) -> list[str]:
    known = [f"dice_{name}" for name in class_map.names] + ["dice_mean"]
    metrics = list(config.metrics or ["dice_mean", *known[:-1]])
    unknown = [m for m in metrics if m not in known]
    if unknown:
        raise MedfoundryError(f"task '{config.name}': unknown metric(s) {unknown}; a segmentation task has {known}")
    return metrics


def budgets(config: SuiteConfig) -> tuple[LabelBudgets, list[float]]:
    """The suite's fractions and seeds over train blocks, and the fractions a decoder can train at (not 0)."""
    # At least one block per subset: the blocks carry no class to stratify by, and a decoder needs some labels.
    label_budgets = LabelBudgets(list(config.adapt.label_fractions), list(config.adapt.seeds), min_per_class=1)
    return label_budgets, [f for f in label_budgets.fractions if f > 0]


class SegmentationKind(TaskKind[SegmentationTask]):
    name = "segmentation"
    default_metrics = ("dice_mean",)

    def load(self, config: TaskConfig) -> SegmentationTask:
        if config.segmentation is None:
            raise MedfoundryError(f"task '{config.name}' is a segmentation task without a segmentation section")
        settings = SegmentTaskConfig.model_validate(config.segmentation)
        class_map, volumes, splits = load_probe_data(settings)
        train_blocks: list[Block] = []
        test_blocks: list[Block] = []
        for volume, split in zip(volumes, splits, strict=True):
            train, test = cut_blocks(volume, split)
            train_blocks += train
            test_blocks.append(test)
        unit_name, units = bootstrap_units(test_blocks, settings.split)
        described = {volume.name: split.describe() for volume, split in zip(volumes, splits, strict=True)}
        metrics = _metrics(config, class_map)
        return SegmentationTask(
            config, settings, class_map, train_blocks, test_blocks, described, unit_name, units, metrics
        )

    def scorer(self, task: SegmentationTask, evaluate: EvaluateConfig) -> SegmentationScorer:
        return SegmentationScorer(task, evaluate)

    def encoder_cells(
        self, ctx: EngineContext, task: SegmentationTask, spec: EncoderConfig, encoder: Encoder
    ) -> Iterator[Cell]:
        check_token_encoder(encoder)
        channels = getattr(encoder.backbone, "in_chans", 1)
        if channels != 1:
            raise ModelError(f"encoder '{spec.name}' takes {channels} channels but a CT has one: set in_chans: 1")
        label_budgets, fractions = budgets(ctx.config)
        if not fractions:
            return
        settings = task.settings
        blocks = np.zeros(len(task.train_blocks), np.int64)
        identity = weights_hash(encoder.backbone)

        def fit(decoder: str, subset: np.ndarray, seed: int) -> CellOutput:
            ctx.echo(f"[{task.name}] {spec.name}: {decoder} on {len(subset)}/{len(blocks)} train blocks, seed {seed}")
            chosen = [task.train_blocks[i] for i in subset]
            n_classes = task.class_map.n_classes
            probe = fit_decoder(encoder, decoder, settings, n_classes, chosen, task.thinnest_test, seed, ctx.echo)
            masks = [predict_block(probe, b, settings.sw_overlap, settings.sw_batch_size) for b in task.test_blocks]
            n_params = sum(p.numel() for p in probe.trainable_parameters())
            return CellOutput(pack_masks(masks), task.train_units(subset), n_params)

        for decoder in settings.decoders:
            inputs = [identity, settings.training(decoder)]
            yield from grid_cells(spec.name, [decoder], label_budgets, blocks, inputs, fit, fractions)

    def baseline_cells(self, ctx: EngineContext, task: SegmentationTask) -> Iterator[Cell]:
        label_budgets, fractions = budgets(ctx.config)
        if not fractions:
            return

        def empty(adapter: str, subset: np.ndarray, seed: int) -> CellOutput:
            return CellOutput(pack_masks([np.zeros_like(b.labels[0]) for b in task.test_blocks]), 0, 0)

        blocks = np.zeros(len(task.train_blocks), np.int64)
        yield from grid_cells(BASELINE_MODEL, [BASELINE_ADAPTER], label_budgets, blocks, [], empty, fractions)


SEGMENTATION = SegmentationKind()
TASK_KINDS.add(SEGMENTATION.name, SEGMENTATION)
