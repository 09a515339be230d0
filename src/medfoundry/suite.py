"""Benchmark suites: tasks x encoders x adapters x label fractions x seeds, resumable, as one Python call.

Layout of ``output_dir``::

    encoders/<encoder>/           pre-training state and exported encoder (recipe encoders only)
    embeddings/<encoder>/<task>/  one HDF5 per split, keyed by the encoder's weights and the images
    tasks/<task>/cells/           one JSON per finished cell (its records and a fingerprint of its inputs)
    tasks/<task>/predictions/     per-case test probabilities of every cell (for ``medfoundry compare``)
    results.json, report.html

Every stage reuses what is already there when its inputs are unchanged, so a suite killed midway picks up at the
first unfinished cell. Embeddings are computed once per (encoder, task) and shared by every probe, fraction and seed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any

import numpy as np
import torch

import medfoundry.ssl.methods  # noqa: F401  (registers the methods)
from medfoundry.adapt.embed import Embeddings, embed
from medfoundry.adapt.finetune import FineTuner
from medfoundry.adapt.registry import create_adapter
from medfoundry.config import (
    KIND_METRICS,
    ExperimentConfig,
    SuiteConfig,
    SuiteEncoderConfig,
    SuiteTaskConfig,
    dump_config,
    load_config,
)
from medfoundry.data.registry import load_dataset
from medfoundry.data.sample import ImageSet
from medfoundry.data.splits import label_fraction_indices, patient_split
from medfoundry.errors import DataError, MedfoundryError
from medfoundry.evaluate.cells import CellKey, CellOutput, CellStore, evaluate_cell
from medfoundry.evaluate.compare import paired_difference
from medfoundry.evaluate.metrics import METRICS
from medfoundry.evaluate.predictions import read_predictions
from medfoundry.evaluate.report import format_summary_text, render_report, summarise_table
from medfoundry.evaluate.results import ResultRecord, ResultsFile, run_metadata, write_results
from medfoundry.experiment import build_encoder, run_pretraining, unlabeled
from medfoundry.io_utils import ensure_writable_dir, hash_json
from medfoundry.models.backbones import Encoder, create_encoder
from medfoundry.models.checkpoint import load_encoder, load_encoder_or_build, weights_hash

Echo = Callable[[str], None]


@dataclass
class TaskData:
    """A task's three labelled splits and how it is scored."""

    config: SuiteTaskConfig
    train: ImageSet
    val: ImageSet
    test: ImageSet
    kind: str
    n_classes: int
    metrics: list[str]
    carved: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.config.name

    def describe(self) -> str:
        carved = f" ({', '.join(self.carved)} carved from train by patient)" if self.carved else ""
        unit = "labels" if self.kind == "multilabel" else "classes"
        return (
            f"{self.name}: {self.kind}, {self.n_classes} {unit}, train/val/test "
            f"{len(self.train)}/{len(self.val)}/{len(self.test)}{carved}; headline metric {self.metrics[0]}"
        )


@dataclass
class SuiteOutput:
    output_dir: Path
    results_path: Path
    report_path: Path
    results: ResultsFile
    cells_computed: int
    cells_reused: int
    durations: dict[str, float]


def _labels(images: ImageSet, task: str, split: str) -> np.ndarray:
    if images.labels is None:
        raise DataError(f"task '{task}': split '{split}' has no labels", images.source)
    labels = np.asarray(images.labels)
    if labels.ndim == 2 and not np.isin(labels, (0, 1)).all():
        raise DataError(f"task '{task}': multi-label targets must be 0/1 columns (split '{split}')", images.source)
    if labels.ndim not in (1, 2):
        raise DataError(f"task '{task}': labels of shape {labels.shape} (split '{split}')", images.source)
    return labels


def _carve(images: ImageSet, fractions: tuple[float, ...], names: tuple[str, ...], seed: int) -> dict[str, ImageSet]:
    parts = patient_split(images.patient_ids, np.asarray(images.labels), fractions, seed, names)
    return {name: images.subset(indices, name=f"{images.name}-{name}") for name, indices in parts.items()}


def load_task(task: SuiteTaskConfig) -> TaskData:
    """Open the task's dataset and make sure it has train, val and test splits (carving by patient if not)."""
    splits = load_dataset(task.source, **task.options)
    if "train" not in splits:
        raise DataError(f"task '{task.name}' needs a 'train' split; found {sorted(splits)}", task.source)
    train, val, test = splits["train"], splits.get(task.val_split), splits.get(task.test_split)
    _labels(train, task.name, "train")
    carved: list[str] = []
    # No patient may sit on both sides of a split: missing splits are cut from train by patient id.
    if test is None:
        parts = _carve(train, (1.0 - task.test_fraction, task.test_fraction), ("train", "test"), task.split_seed)
        train, test = parts["train"], parts["test"]
        carved.append("test")
    if val is None:
        share = task.val_fraction / (1.0 - task.test_fraction) if "test" in carved else task.val_fraction
        parts = _carve(train, (1.0 - share, share), ("train", "val"), task.split_seed)
        train, val = parts["train"], parts["val"]
        carved.append("val")
    labels = [_labels(images, task.name, split) for split, images in (("train", train), ("val", val), ("test", test))]
    multilabel = labels[0].ndim == 2
    n_classes = labels[0].shape[1] if multilabel else int(max(int(y.max()) for y in labels) + 1)
    if n_classes < 2 and not multilabel:
        raise DataError(f"task '{task.name}' has a single class", task.source)
    kind = task.kind or ("multilabel" if multilabel else "binary" if n_classes == 2 else "multiclass")
    if (kind == "multilabel") != multilabel:
        shape = "(N, K) label columns" if multilabel else "one label per case"
        raise DataError(f"task '{task.name}' is declared {kind} but its labels have {shape}", task.source)
    if kind == "binary" and n_classes != 2:
        raise DataError(f"task '{task.name}' is declared binary but has {n_classes} classes", task.source)
    metrics = list(task.metrics or KIND_METRICS[kind])
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise MedfoundryError(f"task '{task.name}': unknown metric(s) {unknown}; known: {sorted(METRICS)}")
    return TaskData(task, train, val, test, kind, n_classes, metrics, carved)


def prepare_encoder(
    config: SuiteConfig, spec: SuiteEncoderConfig, tasks: dict[str, TaskData], show_progress: bool, echo: Echo
) -> Encoder:
    """Load, build or pre-train (once; resumed when interrupted) the encoder ``spec`` names."""
    if spec.checkpoint is not None:
        if spec.checkpoint.is_dir():
            return load_encoder(spec.checkpoint, pool=spec.pool)
        # A public model from local weights ("public:NAME:PATH") or a 2.5D wrapping ("2.5d:..."): its own pool.
        return load_encoder_or_build(str(spec.checkpoint), spec.in_chans, spec.img_size, spec.seed)
    if spec.backbone is not None:
        return create_encoder(
            spec.backbone, in_chans=spec.in_chans, img_size=spec.img_size, pool=spec.pool or "default", seed=spec.seed
        )
    assert spec.recipe is not None  # the config validator guarantees exactly one source
    recipe = load_config(ExperimentConfig, spec.recipe, spec.overrides)
    pool = spec.pool or recipe.model.pool
    if spec.untrained:
        encoder = build_encoder(recipe)
        encoder.pool = pool
        return encoder
    recipe.output_dir = config.output_dir / "encoders" / spec.name
    splits = None
    if spec.pretrain_task is not None:
        splits = {"train": unlabeled(tasks[spec.pretrain_task].train)}
        recipe.data.pretrain_split = "train"
        recipe.data.pretrain_sources = []
        echo(f"  pre-training {spec.name} ({recipe.pretrain.method}) on {spec.pretrain_task}'s train split")
    else:
        echo(f"  pre-training {spec.name} ({recipe.pretrain.method}) on the recipe's data")
    result = run_pretraining(recipe, splits, resume=True, show_progress=show_progress)
    if not result.finished:
        raise MedfoundryError(
            f"pre-training of encoder '{spec.name}' stopped at step {result.steps} of {result.total_steps}",
            result.output_dir,
        )
    return load_encoder(result.encoder_dir, pool=pool)


class _Cells:
    """Runs the cells of one task and counts how many were computed or reused."""

    def __init__(self, config: SuiteConfig, task: TaskData) -> None:
        self.config = config
        self.task = task
        self.store = CellStore(config.output_dir / "tasks" / task.name)
        self.computed = 0
        self.reused = 0
        self.y_train = np.asarray(task.train.labels)
        self.data_hash = hash_json([task.train.fingerprint(), task.val.fingerprint(), task.test.fingerprint()])

    def run(self, key: CellKey, inputs: list[Any], compute: Callable[[], CellOutput]) -> list[ResultRecord]:
        records, reused = evaluate_cell(
            self.store,
            key,
            self.task.name,
            hash_json([self.data_hash, *inputs]),
            compute,
            self.task.test,
            self.config.evaluate,
            self.task.metrics,
        )
        self.reused += reused
        self.computed += not reused
        return records

    def subset(self, fraction: float, seed: int) -> np.ndarray:
        return label_fraction_indices(self.y_train, fraction, seed, self.config.adapt.min_per_class)


# Prototypes are class means: a case with several labels belongs to no single class.
SINGLE_LABEL_ADAPTERS = ("fewshot",)


def applicable_adapters(adapters: list[str], kind: str) -> list[str]:
    return [a for a in adapters if not (kind == "multilabel" and a in SINGLE_LABEL_ADAPTERS)]


def _probe_cells(cells: _Cells, name: str, encoder: Encoder, features: dict[str, Embeddings]) -> list[ResultRecord]:
    config, task = cells.config, cells.task
    y_val = np.asarray(task.val.labels)
    inputs = [weights_hash(encoder.backbone), encoder.pool, config.adapt.model_dump(mode="json")]
    records: list[ResultRecord] = []
    for adapter_name, fraction, seed in product(
        applicable_adapters(config.adapt.adapters, task.kind), config.adapt.label_fractions, config.adapt.seeds
    ):
        subset = cells.subset(fraction, seed)

        def fit_predict(subset: np.ndarray = subset, adapter_name: str = adapter_name, seed: int = seed) -> CellOutput:
            adapter = create_adapter(adapter_name, config.adapt, seed, task.n_classes)
            adapter.fit(features["train"].features[subset], cells.y_train[subset], features["val"].features, y_val)
            proba = adapter.predict_proba(features["test"].features)
            return CellOutput(proba, len(subset), adapter.trainable_parameters_)

        records += cells.run(CellKey(name, adapter_name, fraction, seed), inputs, fit_predict)
    return records


def _finetune_cells(cells: _Cells, name: str, encoder: Encoder) -> list[ResultRecord]:
    config, task = cells.config, cells.task
    tune = config.finetune
    fractions = config.finetune_label_fractions or config.adapt.label_fractions
    inputs = [weights_hash(encoder.backbone), encoder.pool, tune.model_dump(mode="json")]
    records: list[ResultRecord] = []
    for mode, fraction, seed in product(tune.modes, fractions, config.adapt.seeds):
        subset = cells.subset(fraction, seed)

        def train_predict(subset: np.ndarray = subset, seed: int = seed, mode: str = mode) -> CellOutput:
            tuner = FineTuner(encoder, task.n_classes, mode=mode, seed=seed, **tune.model_dump(exclude={"modes"}))
            tuner.fit(task.train.subset(subset), task.val)
            return CellOutput(tuner.predict_proba(task.test), len(subset), tuner.trainable_parameters_)

        records += cells.run(CellKey(name, f"finetune-{mode}", fraction, seed), inputs, train_predict)
    return records


def _runs(store: CellStore, model: str, adapter: str, fraction: float, seeds: list[int]) -> list[np.ndarray] | None:
    runs = []
    for seed in seeds:
        path = store.predictions_path(CellKey(model, adapter, fraction, seed))
        if not path.is_file():
            return None
        runs.append(read_predictions(path).proba)
    return runs


def comparison_pairs(config: SuiteConfig, models: list[str], adapters: list[str]) -> list[tuple[str, str, str, str]]:
    """(model A, adapter A, model B, adapter B) pairs: each encoder against the baseline encoder with the same
    adapter, and each adapter against the reference adapter on the same encoder."""
    pairs: list[tuple[str, str, str, str]] = []
    baseline, reference = config.comparisons.baseline_encoder, config.comparisons.reference_adapter
    if baseline in models:
        pairs += [(m, a, baseline, a) for m in models if m != baseline for a in adapters]
    if reference in adapters:
        pairs += [(m, a, m, reference) for m in models for a in adapters if a != reference]
    return pairs


def compute_comparisons(config: SuiteConfig, task: TaskData, records: list[ResultRecord]) -> list[dict[str, Any]]:
    """Paired bootstrap differences on the task's headline metric, averaged over seeds, per label fraction."""
    store = CellStore(config.output_dir / "tasks" / task.name)
    metric = task.metrics[0]
    seeds = list(config.adapt.seeds)
    models = list(dict.fromkeys(r.model for r in records))
    adapters = list(dict.fromkeys(r.adapter for r in records))
    fractions = sorted({r.label_fraction for r in records})
    y = np.asarray(task.test.labels)
    comparisons = []
    for model_a, adapter_a, model_b, adapter_b in comparison_pairs(config, models, adapters):
        for fraction in fractions:
            runs_a = _runs(store, model_a, adapter_a, fraction, seeds)
            runs_b = _runs(store, model_b, adapter_b, fraction, seeds)
            if runs_a is None or runs_b is None:
                continue
            diff = paired_difference(
                y,
                runs_a,
                runs_b,
                task.test.patient_ids,
                metric,
                config.comparisons.n_bootstrap,
                config.evaluate.confidence,
                seed=0,
            )
            comparisons.append(
                {
                    "task": task.name,
                    "metric": metric,
                    "label_fraction": fraction,
                    "model_a": model_a,
                    "adapter_a": adapter_a,
                    "model_b": model_b,
                    "adapter_b": adapter_b,
                    "value_a": diff.value_a,
                    "value_b": diff.value_b,
                    "difference": diff.value,
                    "ci_low": diff.ci_low,
                    "ci_high": diff.ci_high,
                    "share_opposite": diff.share_opposite,
                    "n_seeds": len(seeds),
                    "confidence": config.evaluate.confidence,
                }
            )
    return comparisons


def _embed_task(config: SuiteConfig, name: str, encoder: Encoder, task: TaskData) -> tuple[dict[str, Embeddings], bool]:
    folder = config.output_dir / "embeddings" / name / task.name
    features = {
        split: embed(encoder, images, folder / f"{split}.h5", config.embed.batch_size, config.embed.num_workers)
        for split, images in (("train", task.train), ("val", task.val), ("test", task.test))
    }
    return features, all(f.reused for f in features.values())


def run_suite(config: SuiteConfig, show_progress: bool = True, echo: Echo = print) -> SuiteOutput:
    """Run every cell of the suite (reusing finished ones) and write results.json and report.html."""
    torch.manual_seed(0)
    ensure_writable_dir(config.output_dir)
    started = time.perf_counter()
    durations: dict[str, float] = {}
    tasks = {spec.name: load_task(spec) for spec in config.tasks}
    for task in tasks.values():
        echo(f"task {task.describe()}")
        skipped = sorted(set(config.adapt.adapters) - set(applicable_adapters(config.adapt.adapters, task.kind)))
        if skipped:
            echo(f"  {', '.join(skipped)} skipped on {task.name}: prototypes need one class per case")
    encoders: dict[str, Encoder] = {}
    for spec in config.encoders:
        t0 = time.perf_counter()
        echo(f"encoder {spec.name}")
        encoders[spec.name] = prepare_encoder(config, spec, tasks, show_progress, echo)
        durations[f"encoder/{spec.name}"] = time.perf_counter() - t0

    records: list[ResultRecord] = []
    comparisons: list[dict[str, Any]] = []
    computed = reused = 0
    for task in tasks.values():
        cells = _Cells(config, task)
        task_started = time.perf_counter()
        task_records: list[ResultRecord] = []
        for spec in config.encoders:
            if spec.tasks is not None and task.name not in spec.tasks:
                continue
            encoder = encoders[spec.name]
            t0 = time.perf_counter()
            features, was_cached = _embed_task(config, spec.name, encoder, task)
            durations[f"{task.name}/embed/{spec.name}"] = time.perf_counter() - t0
            echo(f"[{task.name}] {spec.name}: embeddings {'reused' if was_cached else 'computed'}")
            t0 = time.perf_counter()
            task_records += _probe_cells(cells, spec.name, encoder, features)
            durations[f"{task.name}/probes/{spec.name}"] = time.perf_counter() - t0
            if config.finetune.modes and spec.finetune:
                t0 = time.perf_counter()
                task_records += _finetune_cells(cells, spec.name, encoder)
                durations[f"{task.name}/finetune/{spec.name}"] = time.perf_counter() - t0
            echo(f"[{task.name}] {spec.name}: {cells.computed} cells computed, {cells.reused} reused so far")
        comparisons += compute_comparisons(config, task, task_records)
        durations[f"task/{task.name}"] = time.perf_counter() - task_started
        records += task_records
        computed, reused = computed + cells.computed, reused + cells.reused
    durations["total"] = time.perf_counter() - started

    results = ResultsFile(
        records=records,
        metadata=run_metadata(
            config=dump_config(config),
            durations=durations,
            dataset=config.name,
            primary_metric={task.name: task.metrics[0] for task in tasks.values()},
            tasks={
                task.name: {
                    "kind": task.kind,
                    "n_classes": task.n_classes,
                    "splits": {"train": len(task.train), "val": len(task.val), "test": len(task.test)},
                    "carved_from_train": task.carved,
                }
                for task in tasks.values()
            },
            comparisons=comparisons,
            cells={"computed": computed, "reused": reused},
        ),
    )
    results_path = write_results(config.output_dir / "results.json", results)
    report_path = render_report(results, config.output_dir / "report.html", title=f"medfoundry suite: {config.name}")
    echo(format_summary_text(summarise_table(results)))
    return SuiteOutput(config.output_dir, results_path, report_path, results, computed, reused, durations)
