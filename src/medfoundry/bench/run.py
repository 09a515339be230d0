"""``medfoundry run``: SSL pre-training, then a one-task suite through the one evaluation engine.

The run writes ``pretrain/`` (training state and the encoder folder) and the suite it ran as ``suite.yaml``, then
everything the engine writes (``embeddings/``, ``tasks/<task>/cells``, ``results.json``, ``report.html``). Because
the evaluation is the engine's, ``medfoundry eval OUTPUT/suite.yaml`` gives exactly the run's numbers.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from medfoundry.bench.engine import load_task, run_suite
from medfoundry.bench.tasks import Task
from medfoundry.config import (
    ComparisonConfig,
    EncoderConfig,
    ExperimentConfig,
    SuiteConfig,
    dump_config,
)
from medfoundry.data.mixture import MixedImageSet, MixtureSource
from medfoundry.data.registry import load_dataset
from medfoundry.data.sample import ImageSet
from medfoundry.errors import DataError, MedfoundryError
from medfoundry.evaluate.results import ResultsFile
from medfoundry.io_utils import output_folder, write_text_atomic
from medfoundry.models.backbones import Encoder, encoder_from_config, resolve_backbone
from medfoundry.ssl.monitor import HEALTH_THRESHOLDS, KNNMonitorSet
from medfoundry.ssl.trainer import PretrainResult, pretrain

# The random-weights baseline's name in results: the same network pre-training started from.
RANDOM_INIT = "random-init"
# With pretrain.init_from, the baseline is the encoder pre-training continued from.
STARTING_POINT = "starting-point"


@dataclass
class ExperimentOutput:
    output_dir: Path
    results_path: Path
    report_path: Path
    results: ResultsFile
    durations: dict[str, float] = field(default_factory=dict)


def build_encoder(config: ExperimentConfig) -> Encoder:
    return encoder_from_config(config.model, config.seed)


def unlabeled(images: ImageSet) -> ImageSet:
    # Pre-training sees images only: labels are dropped so no label can leak into the SSL stage.
    unlabeled = images.subset(np.arange(len(images)), name=f"{images.name}-unlabeled")
    unlabeled.labels = None
    return unlabeled


def leave_out_patients(images: ImageSet, held_out: frozenset[str]) -> tuple[ImageSet, int]:
    """``images`` without the cases of ``held_out`` patients, and how many were dropped.

    Pre-training on a pool that shares patients with an evaluation split would let the encoder see test patients
    (Kermany's unlabeled pool shares 282 patients with its labelled subset, for one): they are left out.
    """
    keep = [i for i, patient in enumerate(images.patient_ids) if patient not in held_out]
    if len(keep) == len(images):
        return images, 0
    if not keep:
        raise DataError("every pre-training image belongs to a patient of an evaluation split", images.source)
    return images.subset(keep, name=images.name), len(images) - len(keep)


def pretrain_images(
    config: ExperimentConfig, train: ImageSet | None = None, held_out: frozenset[str] = frozenset()
) -> tuple[ImageSet, str]:
    """The unlabeled images pre-training uses, and a description for the model card.

    The weighted mixture of ``data.pretrain_sources`` if given; else ``train`` (the task's train split after any
    carving, so that no carved-out test image is pre-trained on) when ``data.pretrain_split`` is "train"; else the
    named split of ``data.source``. Only the splits used here need to exist, so a folder of unlabeled images or a
    slide can be pre-trained on alone. Images of ``held_out`` patients (the evaluation splits') are left out.
    """
    data = config.data
    dropped = 0
    if data.pretrain_sources:
        sources = []
        for entry in data.pretrain_sources:
            found = load_dataset(entry.source, **entry.options)
            if entry.split not in found:
                raise DataError(f"no split '{entry.split}' (found {sorted(found)})", entry.source)
            images, left_out = leave_out_patients(found[entry.split], held_out)
            dropped += left_out
            sources.append(MixtureSource(unlabeled(images), entry.weight, f"{entry.source}:{entry.split}"))
        mixture = MixedImageSet(sources, channels=config.model.in_chans, name="pretrain-mixture")
        return mixture, f"mixture of {mixture.describe()}{_left_out(dropped)}; labels unused"
    if train is not None and data.pretrain_split == "train":
        images, dropped = leave_out_patients(train, held_out)
        name = f"{_source_name(train)} train split"
    else:
        if data.source is None:
            raise DataError("pre-training needs data.source or data.pretrain_sources")
        splits = load_dataset(data.source, **data.options)
        if data.pretrain_split not in splits:
            raise DataError(f"no split '{data.pretrain_split}' to pre-train on (found {sorted(splits)})", data.source)
        images, dropped = leave_out_patients(splits[data.pretrain_split], held_out)
        name = f"{_source_name(images)} split '{data.pretrain_split}'"
    return unlabeled(images), f"{name} ({len(images)} images{_left_out(dropped)}, labels unused)"


def _left_out(dropped: int) -> str:
    return f"; {dropped} images of evaluation patients left out" if dropped else ""


def evaluation_patients(tasks: list[Task]) -> frozenset[str]:
    """Every patient of a val or test split: pre-training must never see them."""
    return frozenset(p for task in tasks for images in (task.val, task.test) for p in images.patient_ids)


def _source_name(images: ImageSet) -> str:
    # The file or folder name only: model cards and logs travel, private paths must not.
    return Path(images.source).name


def run_pretraining(
    config: ExperimentConfig,
    images: ImageSet | None = None,
    resume: bool = True,
    show_progress: bool = True,
    held_out: frozenset[str] = frozenset(),
    knn_monitor: KNNMonitorSet | None = None,
) -> PretrainResult:
    """Pre-train ``config``'s model on ``images`` (unlabeled), or on the images ``pretrain_images`` picks (without
    the ``held_out`` patients)."""
    with output_folder(config.output_dir, f"medfoundry pretrain {config.name}"):
        if config.pretrain.method == "clip":  # image-text pairs, not images: its own trainer (vision-language.md)
            from medfoundry.vlm.train import run_clip_pretraining

            return run_clip_pretraining(config, resume=resume, show_progress=show_progress)
        if images is not None:
            description = f"{_source_name(images)}: {len(images)} images, labels unused"
        else:
            images, description = pretrain_images(config, held_out=held_out)
        return pretrain(
            images,
            build_encoder(config),
            config.pretrain,
            config.output_dir / "pretrain",
            resume=resume,
            data_description=description,
            show_progress=show_progress,
            knn_monitor=knn_monitor,
        )


# Enough labelled cases for a kNN accuracy that moves, few enough that monitoring costs seconds.
KNN_MONITOR_CASES = 400


def knn_monitor_for(train: ImageSet) -> KNNMonitorSet | None:
    """An online kNN monitor on (a patient-grouped sample of) the task's training cases, where their labels allow.

    Only the monitor reads these labels, to say whether the features are getting better during pre-training; the
    SSL loss never sees them, and no test or validation case is used.
    """
    labels = None if train.labels is None else np.asarray(train.labels)
    if labels is None or labels.ndim != 1 or len(set(train.patient_ids)) < 2:
        return None
    chosen = np.random.default_rng(0).permutation(len(train))[:KNN_MONITOR_CASES]
    return KNNMonitorSet.split(train.subset(np.sort(chosen), name=f"{train.name}-monitor"))


def pretrain_summary(config: ExperimentConfig, result: PretrainResult) -> dict[str, Any]:
    """What the report's pre-training health section shows: the monitor's history, its warnings and thresholds."""
    return {
        "method": config.pretrain.method,
        "steps": result.steps,
        "images_per_second": round(result.images_per_second, 1),
        "collapsed": result.collapsed,
        "verdict": result.verdict,
        "budget": result.budget,
        "init_from": result.init_from,
        "monitor": result.monitor,
        "warnings": result.warnings,
        "thresholds": HEALTH_THRESHOLDS,
    }


def suite_for_run(config: ExperimentConfig, encoder_dir: Path) -> SuiteConfig:
    """The one-task suite a run evaluates: its pre-trained encoder, its random initialisation and the baselines."""
    encoders = [EncoderConfig(name=config.pretrain.method, checkpoint=encoder_dir, pool=config.model.pool)]
    baseline_encoder = None
    if config.pretrain.init_from is not None:
        # Continued pre-training starts from trained weights: those, not random ones, are what it must improve on.
        baseline_encoder = STARTING_POINT
        start = EncoderConfig(name=STARTING_POINT, checkpoint=Path(config.pretrain.init_from), finetune=False)
        encoders.append(start.model_copy(update={"pool": config.model.pool}))
    elif config.random_init_baseline:
        baseline_encoder = RANDOM_INIT
        encoders.append(EncoderConfig(name=RANDOM_INIT, model=config.model, seed=config.seed, finetune=False))
    scratch = config.supervised_baseline if config.supervised_baseline.enabled else None
    return SuiteConfig(
        name=config.name,
        output_dir=config.output_dir,
        tasks=[config.data.as_task()],
        encoders=encoders,
        embed=config.embed,
        adapt=config.adapt,
        finetune=config.finetune,
        supervised_baseline=scratch,
        evaluate=config.evaluate,
        comparisons=ComparisonConfig(baseline_encoder=baseline_encoder),
    )


def run_experiment(
    config: ExperimentConfig,
    resume: bool = True,
    show_progress: bool = True,
    echo: Callable[[str], None] = print,
) -> ExperimentOutput:
    """Pre-train, then evaluate through the engine; return where results.json and report.html are."""
    with output_folder(config.output_dir, f"medfoundry run {config.name}"):
        return _run_experiment(config, resume, show_progress, echo)


def _run_experiment(
    config: ExperimentConfig, resume: bool, show_progress: bool, echo: Callable[[str], None]
) -> ExperimentOutput:
    torch.manual_seed(config.seed)
    started = time.perf_counter()
    # Model problems (unknown names, bad arguments) must fail before data loading and pre-training, not after.
    build_encoder(config)
    if config.supervised_baseline.enabled:
        resolve_backbone(config.supervised_baseline.backbone)
    task_config = config.data.as_task()
    task = load_task(task_config)
    if not isinstance(task, Task) or task.precomputed:
        raise MedfoundryError(f"run pre-trains on the task's images, and a {task.kind} task has none: use eval")

    images, where = pretrain_images(config, task.train, evaluation_patients([task]))
    echo(f"[1/2] {config.pretrain.method} pre-training on {where}")
    t0 = time.perf_counter()
    pretrained = run_pretraining(
        config, images, resume=resume, show_progress=show_progress, knn_monitor=knn_monitor_for(task.train)
    )
    pretrain_seconds = time.perf_counter() - t0
    if not pretrained.finished:
        raise MedfoundryError(
            f"pre-training stopped at step {pretrained.steps} of {pretrained.total_steps}"
            f"{' (collapse monitor)' if pretrained.collapsed else ''}; see log.jsonl",
            pretrained.output_dir,
        )
    suite = suite_for_run(config, pretrained.encoder_dir)
    write_text_atomic(config.output_dir / "suite.yaml", yaml.safe_dump(dump_config(suite), sort_keys=False))
    echo(f"[2/2] evaluation: {task.describe()} (the suite is in suite.yaml)")
    output = run_suite(
        suite,
        show_progress=show_progress,
        echo=echo,
        metadata={
            "pretrain": pretrain_summary(config, pretrained),
            "recipe": dump_config(config),
        },
        title=f"medfoundry: {config.name}",
        tasks={task.name: task},
    )
    durations = {"pretrain": pretrain_seconds, **output.durations, "total": time.perf_counter() - started}
    return ExperimentOutput(config.output_dir, output.results_path, output.report_path, output.results, durations)
