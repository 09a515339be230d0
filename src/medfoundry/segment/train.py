"""Train a decoder on a frozen encoder's tokens, infer by sliding window over held-out z blocks, score Dice.

:func:`run_segment_probe` is the whole probe behind ``medfoundry segment-probe``: load and check the volumes,
split each along z (:mod:`medfoundry.segment.data`), train each decoder on class-balanced crops with
MONAI's ``DiceCELoss`` (Dice + cross-entropy, softmax over the classes), predict the test blocks with
``monai.inferers.sliding_window_inference`` (Gaussian-weighted overlapping windows of the encoder's input
size), and write ``results.json`` (Dice per class with bootstrap CIs, plus the all-background baseline),
``report.html`` and ``overlay.png``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from medfoundry.config import dump_config
from medfoundry.errors import DataError
from medfoundry.evaluate.metrics import MetricValue
from medfoundry.evaluate.results import ResultsFile, records_from_metrics, run_metadata, write_results
from medfoundry.models.backbones import Encoder
from medfoundry.models.checkpoint import load_encoder_or_build
from medfoundry.segment.config import SegmentProbeConfig
from medfoundry.segment.data import (
    Block,
    ClassMap,
    CropSampler,
    LabelledVolume,
    ZSplit,
    build_class_map,
    cut_blocks,
    default_label_names,
    load_labelled_volume,
    read_label_names,
    z_split,
)
from medfoundry.segment.heads import SegmentationProbe, build_probe, check_token_encoder
from medfoundry.segment.metrics import DiceCounts, dice_counts, dice_with_ci, slab_units

log = logging.getLogger(__name__)

BASELINE_ADAPTER = "all_background"
# Whole volumes become the bootstrap unit only from this many on: fewer units give a degenerate bootstrap.
MIN_VOLUME_UNITS = 5


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


@dataclass
class DecoderRun:
    decoder: str
    metrics: dict[str, MetricValue]
    predictions: list[np.ndarray]
    trainable_params: int
    fit_seconds: float
    losses: list[float] = field(repr=False, default_factory=list)


@dataclass
class SegmentOutput:
    results: ResultsFile
    runs: list[DecoderRun]
    baseline: dict[str, MetricValue]
    results_path: Path | None = None
    report_path: Path | None = None
    overlay_path: Path | None = None


def _units(test_blocks: list[Block], config: SegmentProbeConfig) -> tuple[str, list[list[tuple[int, int]] | None]]:
    unit = config.split.unit
    if unit == "auto":
        unit = "volume" if len(test_blocks) >= MIN_VOLUME_UNITS else "slab"
    if unit == "volume":
        return "whole test block of each volume", [None for _ in test_blocks]
    n = config.split.unit_slices
    return f"{n}-slice z slab of a test block", [slab_units(b.labels.shape[-1], n) for b in test_blocks]


def _counts(predictions: list[np.ndarray], tests: list[Block], units: list, n_classes: int) -> DiceCounts:
    total: DiceCounts | None = None
    for pred, block, unit in zip(predictions, tests, units, strict=True):
        counts = dice_counts(pred, block.labels[0], n_classes, unit, prefix=f"{block.volume}:")
        total = counts if total is None else total.concat(counts)
    assert total is not None
    return total


def model_label(spec: str) -> str:
    """A checkpoint folder by its last three path parts (``run/pretrain/encoder``); a preset as random init."""
    path = Path(spec)
    return "/".join(path.resolve().parts[-3:]) if path.is_dir() else f"{spec} (random init)"


def load_probe_data(config: SegmentProbeConfig) -> tuple[ClassMap, list[LabelledVolume], list[ZSplit]]:
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


def run_segment_probe(
    config: SegmentProbeConfig,
    encoder: Encoder | None = None,
    echo: Callable[[str], None] = log.info,
    write: bool = True,
) -> SegmentOutput:
    """The whole probe (see the module docstring); ``encoder`` overrides ``config.encoder`` (tests, notebooks)."""
    started = time.perf_counter()
    class_map, volumes, splits = load_probe_data(config)
    if encoder is None:
        encoder = load_encoder_or_build(config.encoder, in_chans=1, img_size=None, seed=config.encoder_seed)
    check_token_encoder(encoder)
    size = int(encoder.backbone.img_size)
    train_blocks: list[Block] = []
    test_blocks: list[Block] = []
    for volume, split in zip(volumes, splits, strict=True):
        train, test = cut_blocks(volume, split)
        train_blocks += train
        test_blocks.append(test)
        echo(f"{volume.name}: {volume.image.shape} voxels at {volume.spacing} mm; {split.describe()}")
    unit_name, units = _units(test_blocks, config)
    # Training crops as thin as the thinnest test block, up to the full window (see CropSampler).
    z_slices = (min(b.labels.shape[-1] for b in test_blocks), size)
    reference = [b.labels[0] for b in test_blocks]
    baseline_counts = _counts([np.zeros_like(r) for r in reference], test_blocks, units, class_map.n_classes)
    n_test = baseline_counts.n_units
    n_train = sum(len(slab_units(b.labels.shape[-1], config.split.unit_slices)) for b in train_blocks)
    ci = {"n_bootstrap": config.n_bootstrap, "confidence": config.confidence, "seed": config.seed}
    baseline = dice_with_ci(baseline_counts, class_map.names, **ci)
    common = {"task": config.name, "model": model_label(config.encoder), "label_fraction": 1.0, "seed": config.seed}
    records = records_from_metrics(baseline, adapter=BASELINE_ADAPTER, n_train=0, n_test=n_test, **common)
    runs: list[DecoderRun] = []
    durations: dict[str, float] = {}
    blocks = {"linear": config.linear_blocks, "unetr": config.unetr_blocks}
    for decoder in config.decoders:
        torch.manual_seed(config.seed)
        probe = build_probe(encoder, decoder, class_map.n_classes, blocks[decoder], config.feature_size)
        sampler = CropSampler(train_blocks, size, class_map.n_classes, config.batch_size, config.seed, z_slices)
        n_params = sum(p.numel() for p in probe.trainable_parameters())
        echo(f"{decoder} decoder ({n_params:,} trainable parameters) over blocks {list(probe.tokens.blocks)}")
        fit_start = time.perf_counter()
        losses = train_decoder(
            probe, sampler, config.steps, config.lr, config.weight_decay, config.crop_pool, config.seed, echo
        )
        fit_seconds = time.perf_counter() - fit_start
        infer_start = time.perf_counter()
        predictions = [predict_block(probe, b, config.sw_overlap, config.sw_batch_size) for b in test_blocks]
        durations[f"infer/{decoder}"] = time.perf_counter() - infer_start
        durations[f"fit/{decoder}"] = fit_seconds
        metrics = dice_with_ci(_counts(predictions, test_blocks, units, class_map.n_classes), class_map.names, **ci)
        runs.append(DecoderRun(decoder, metrics, predictions, n_params, fit_seconds, losses))
        records += records_from_metrics(
            metrics,
            adapter=decoder,
            n_train=n_train,
            n_test=n_test,
            trainable_params=n_params,
            fit_seconds=fit_seconds,
            **common,
        )
        echo(f"  {decoder}: " + ", ".join(f"{k} {v.value:.3f}" for k, v in metrics.items() if k != "dice_background"))
    durations["total"] = time.perf_counter() - started
    metadata = run_metadata(
        config=dump_config(config),
        durations=durations,
        dataset=config.name,
        primary_metric={config.name: "dice_mean"},
        tasks={
            config.name: {
                "kind": "segmentation",
                "classes": list(class_map.names),
                "label_ids": dict(zip(class_map.names[1:], map(list, class_map.source_ids[1:]), strict=True)),
                "splits": {v.name: s.describe() for v, s in zip(volumes, splits, strict=True)},
                "unit": unit_name,
                "n_train_units": n_train,
                "n_test_units": n_test,
                "crop_size": size,
                "window": config.window,
                "baseline": f"{BASELINE_ADAPTER}: every voxel background; each organ's Dice is 0 (empty prediction)",
            }
        },
    )
    results = ResultsFile(records=records, metadata=metadata)
    output = SegmentOutput(results, runs, baseline)
    if write:
        from medfoundry.evaluate.report import render_report
        from medfoundry.segment.overlay import save_overlay

        out = Path(config.output_dir)
        output.results_path = write_results(out / "results.json", results)
        title = f"medfoundry segmentation probe: {config.name}"
        output.report_path = render_report(results, out / "report.html", title=title)
        output.overlay_path = save_overlay(
            out / "overlay.png", test_blocks[0], {r.decoder: r.predictions[0] for r in runs}, class_map.names
        )
    return output
