"""Train a decoder on a frozen encoder's tokens, infer by sliding window over held-out z blocks, count Dice.

These are the parts the ``segmentation`` task kind (:mod:`medfoundry.bench.segmentation`) builds its cells from:
load and check the volumes and split each along z (:mod:`medfoundry.segment.data`), train one decoder on
class-balanced crops with MONAI's ``DiceCELoss`` (Dice + cross-entropy, softmax over the classes), predict the
test blocks with ``monai.inferers.sliding_window_inference`` (Gaussian-weighted overlapping windows of the
encoder's input size), and count Dice per bootstrap unit.

:func:`run_segment_probe` (``medfoundry segment-probe``) runs a recipe as a one-task suite of the one evaluation
engine, so its cells, results.json, resume and report are a suite's; it adds ``overlay.png``.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from medfoundry.config import (
    AdaptConfig,
    ComparisonConfig,
    EncoderConfig,
    EvaluateConfig,
    SuiteConfig,
    TaskConfig,
    dump_config,
)
from medfoundry.errors import DataError
from medfoundry.evaluate.cells import CellKey, CellStore
from medfoundry.evaluate.results import ResultsFile
from medfoundry.models.backbones import Encoder
from medfoundry.models.names import parse_model_name
from medfoundry.segment.config import SegmentProbeConfig, SegmentSplitConfig, SegmentTaskConfig
from medfoundry.segment.data import (
    Block,
    ClassMap,
    CropSampler,
    LabelledVolume,
    ZSplit,
    build_class_map,
    default_label_names,
    load_labelled_volume,
    read_label_names,
    z_split,
)
from medfoundry.segment.heads import SegmentationProbe, build_probe
from medfoundry.segment.metrics import DiceCounts, dice_counts, slab_units

if TYPE_CHECKING:
    from medfoundry.bench.engine import SuiteOutput

log = logging.getLogger(__name__)

BASELINE_ADAPTER = "all_background"
# Whole volumes become the bootstrap unit only from this many on: fewer units give a degenerate bootstrap.
MIN_VOLUME_UNITS = 5
Units = list[list[tuple[int, int]] | None]


def train_decoder(
    probe: SegmentationProbe,
    sampler: CropSampler,
    steps: int,
    lr: float,
    weight_decay: float,
    crop_pool: int = 0,
    seed: int = 0,
    echo: Callable[[str], None] | None = None,
) -> list[float]:
    """AdamW with a cosine schedule on the decoder's parameters only; returns the loss of every step.

    ``crop_pool`` > 0 draws that many crops once and caches the frozen encoder's tokens for them, so each
    step costs the decoder alone (eva's embed-then-train split, per crop); 0 draws fresh crops every step.
    """
    from monai.losses import DiceCELoss

    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.AdamW(probe.trainable_parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    batches = _cached_batches(probe, sampler, crop_pool, seed) if crop_pool > 0 else None
    probe.train()
    losses: list[float] = []
    every = max(1, steps // 5)
    for step in range(steps):
        if batches is None:
            images, labels = sampler.sample()
            logits = probe(images)
        else:
            images, labels, features = batches()
            logits = probe.decoder(probe.tokens.encoder.normalize(images), features)
        loss = loss_fn(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            raise DataError(f"training diverged at step {step} (loss {losses[-1]}); lower the learning rate")
        if echo is not None and (step + 1) % every == 0:
            echo(f"  step {step + 1}/{steps}: loss {np.mean(losses[-every:]):.3f}")
    return losses


def _cached_batches(
    probe: SegmentationProbe, sampler: CropSampler, n: int, seed: int, chunk: int = 16
) -> Callable[[], tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]]:
    images, labels = sampler.draw(n)
    probe.eval()
    parts = [probe.tokens(images[i : i + chunk]) for i in range(0, len(images), chunk)]
    features = [torch.cat(level) for level in zip(*parts, strict=True)]
    generator = torch.Generator().manual_seed(seed)

    def batch() -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        index = torch.randperm(len(images), generator=generator)[: sampler.batch_size]
        return images[index], labels[index], [f[index] for f in features]

    return batch


@torch.no_grad()
def predict_block(probe: SegmentationProbe, block: Block, overlap: float = 0.5, sw_batch_size: int = 8) -> np.ndarray:
    """Class index per voxel of ``block`` ``(x, y, z)``, by Gaussian-weighted sliding windows of the input size."""
    from monai.inferers import sliding_window_inference

    probe.eval()
    size = probe.tokens.img_size
    image = torch.from_numpy(block.image[None]).float()
    logits = sliding_window_inference(
        image, (size,) * 3, sw_batch_size, probe, overlap=overlap, mode="gaussian", padding_mode="constant", cval=0.0
    )
    return torch.as_tensor(logits).argmax(dim=1)[0].numpy().astype(np.uint8)


def bootstrap_units(test_blocks: Sequence[Block], split: SegmentSplitConfig) -> tuple[str, Units]:
    """The unit the bootstrap resamples, in words, and each test block's units (None: the whole block)."""
    unit = split.unit
    if unit == "auto":
        unit = "volume" if len(test_blocks) >= MIN_VOLUME_UNITS else "slab"
    if unit == "volume":
        return "whole test block of each volume", [None for _ in test_blocks]
    n = split.unit_slices
    return f"{n}-slice z slab of a test block", [slab_units(b.labels.shape[-1], n) for b in test_blocks]


def block_counts(predictions: Sequence[np.ndarray], tests: Sequence[Block], units: Units, n_classes: int) -> DiceCounts:
    """Dice counts of every test unit of every block, named ``<volume>:z<a>-<b>``."""
    total: DiceCounts | None = None
    for pred, block, unit in zip(predictions, tests, units, strict=True):
        counts = dice_counts(pred, block.labels[0], n_classes, unit, prefix=f"{block.volume}:")
        total = counts if total is None else total.concat(counts)
    assert total is not None
    return total


def load_probe_data(config: SegmentTaskConfig) -> tuple[ClassMap, list[LabelledVolume], list[ZSplit]]:
    """Class map, windowed volumes and their z splits, with every input check (clear errors naming files)."""
    if not config.images:
        raise DataError("no volumes given: pass at least one CT image and its label map")
    names_csv = Path(config.label_names) if config.label_names else default_label_names(Path(config.labels[0]))
    class_map = build_class_map(config.classes, read_label_names(names_csv), names_csv, config.merge_left_right)
    volumes, splits = [], []
    for image, labels in zip(config.images, config.labels, strict=True):
        volume = load_labelled_volume(image, labels, class_map, config.window, config.spacing)
        s = config.split
        splits.append(z_split(volume.image.shape[2], s.test_start, s.test_stop, s.margin_slices, Path(image)))
        volumes.append(volume)
    return class_map, volumes, splits


def fit_decoder(
    encoder: Encoder,
    decoder: str,
    config: SegmentTaskConfig,
    n_classes: int,
    train_blocks: Sequence[Block],
    thinnest_test: int,
    seed: int,
    echo: Callable[[str], None] | None = None,
) -> SegmentationProbe:
    """A ``decoder`` probe on the frozen ``encoder``, trained on crops of ``train_blocks``."""
    torch.manual_seed(seed)
    blocks = {"linear": config.linear_blocks, "unetr": config.unetr_blocks}
    probe = build_probe(encoder, decoder, n_classes, blocks[decoder], config.feature_size)
    size = int(encoder.backbone.img_size)
    # Training crops as thin as the thinnest test block, up to the full window (see CropSampler).
    sampler = CropSampler(train_blocks, size, n_classes, config.batch_size, seed, (thinnest_test, size))
    if echo is not None:
        n_params = sum(p.numel() for p in probe.trainable_parameters())
        echo(f"  {decoder} decoder ({n_params:,} trainable parameters) over blocks {list(probe.tokens.blocks)}")
    train_decoder(probe, sampler, config.steps, config.lr, config.weight_decay, config.crop_pool, seed, echo)
    return probe


# ---------------------------------------------------------------------------------------------- the probe


def encoder_spec(spec: str, seed: int) -> EncoderConfig:
    """The suite encoder a probe recipe's ``encoder`` names: a preset (random weights from ``seed``) or a folder."""
    parsed = parse_model_name(spec)
    if parsed.kind == "backbone":
        return EncoderConfig(name=_safe_name(f"{spec}-random-init"), backbone=spec, in_chans=1, seed=seed)
    # A folder by its last three parts (run/pretrain/encoder): "encoder" alone says nothing.
    parts = Path(spec).resolve().parts[-3:] if parsed.kind == "folder" else (spec,)
    return EncoderConfig(name=_safe_name(".".join(parts)), checkpoint=Path(spec), in_chans=1, seed=seed)


def _safe_name(name: str) -> str:
    # Encoder names become file names: EncoderConfig allows letters, digits and _.+- only, a letter or digit first.
    return re.sub(r"[^A-Za-z0-9_.+-]+", "-", name).lstrip("_.+-") or "encoder"


def probe_suite(config: SegmentProbeConfig) -> SuiteConfig:
    """The recipe as a one-task suite: its encoder, its decoders at all the training blocks, its seed."""
    task = TaskConfig(name=config.name, kind="segmentation", segmentation=config.task().model_dump(mode="json"))
    return SuiteConfig(
        name=config.name,
        output_dir=config.output_dir,
        tasks=[task],
        encoders=[encoder_spec(config.encoder, config.encoder_seed)],
        adapt=AdaptConfig(label_fractions=[1.0], seeds=[config.seed]),
        evaluate=EvaluateConfig(n_bootstrap=config.n_bootstrap, confidence=config.confidence),
        comparisons=ComparisonConfig(reference_adapter=None, scratch_baseline=False),
    )


@dataclass
class SegmentOutput:
    suite: SuiteOutput
    overlay_path: Path

    @property
    def results(self) -> ResultsFile:
        return self.suite.results

    @property
    def results_path(self) -> Path:
        return self.suite.results_path

    @property
    def report_path(self) -> Path:
        return self.suite.report_path


def run_segment_probe(config: SegmentProbeConfig, echo: Callable[[str], None] = log.info) -> SegmentOutput:
    """The probe as a one-task suite (cells reused on a rerun) plus ``overlay.png`` of the first test block."""
    from medfoundry.bench.engine import run_suite
    from medfoundry.bench.segmentation import SEGMENTATION, read_masks
    from medfoundry.segment.overlay import save_overlay

    suite = probe_suite(config)
    task = SEGMENTATION.load(suite.tasks[0])
    output = run_suite(
        suite,
        show_progress=False,
        echo=echo,
        metadata={"segment_probe": dump_config(config)},
        title=f"medfoundry segmentation probe: {config.name}",
        tasks={task.name: task},  # type: ignore[dict-item]  # the engine needs only what every kind's task has
    )
    store = CellStore(suite.output_dir / "tasks" / task.name)
    model = suite.encoders[0].name
    predictions = {
        decoder: read_masks(store.predictions_path(CellKey(model, decoder, 1.0, config.seed)))[0]
        for decoder in config.decoders
    }
    overlay = save_overlay(suite.output_dir / "overlay.png", task.test_blocks[0], predictions, task.class_map.names)
    return SegmentOutput(output, overlay)
