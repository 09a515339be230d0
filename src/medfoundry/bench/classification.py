"""Classification task kinds (binary, multi-class, ordinal, multi-label): probes on cached embeddings, end-to-end
fine-tuning and a network trained from scratch, all on the same label subsets, scored with patient-bootstrap CIs."""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from medfoundry.adapt.finetune import FineTuneConfig, FineTuner
from medfoundry.adapt.registry import ADAPTERS, create_adapter
from medfoundry.adapt.supervised import SupervisedFromScratch
from medfoundry.bench.grid import Cell, LabelBudgets, grid_cells
from medfoundry.bench.kinds import TASK_KINDS, EngineContext, TaskKind
from medfoundry.bench.tasks import Task, is_feature_set, labels_of, open_splits
from medfoundry.config import EncoderConfig, EvaluateConfig, SuiteConfig, TaskConfig
from medfoundry.data.sample import ImageSet
from medfoundry.errors import DataError, MedfoundryError
from medfoundry.evaluate.calibration import CalibrationSettings, calibration_analysis
from medfoundry.evaluate.cells import CellKey, CellOutput, CellStore
from medfoundry.evaluate.compare import paired_difference
from medfoundry.evaluate.metrics import METRICS, MetricValue, compute_metrics
from medfoundry.evaluate.predictions import Predictions, read_predictions, write_predictions
from medfoundry.evaluate.subgroups import SubgroupSettings, check_subgroups, subgroup_analysis
from medfoundry.io_utils import write_json_atomic
from medfoundry.models.backbones import Encoder
from medfoundry.models.checkpoint import weights_hash

# The first metric is the headline one (ordinal grades are judged by quadratic kappa, as in the DR-grading
# literature); ECE is last because it says how far to trust the probabilities, not how well they rank.
KIND_METRICS: dict[str, tuple[str, ...]] = {
    "binary": ("auroc", "balanced_accuracy", "f1", "ece"),
    "multiclass": ("auroc", "balanced_accuracy", "accuracy", "f1", "ece"),
    "ordinal": ("kappa", "balanced_accuracy", "auroc", "ece"),
    # Per-label AUROC averaged over labels: the metrics that pick one class per case do not apply.
    "multilabel": ("auroc",),
}
# Prototypes are class means: a case with several labels belongs to no single class.
SINGLE_LABEL_ADAPTERS = ("fewshot",)


def _deterministic(adapter: str) -> bool:
    # Declared by each adapter where it registers (adapt/*.py): same cases and features give the same fit.
    return bool(ADAPTERS.metadata(adapter).get("deterministic", False))


# Part of every classification cell's inputs: cells stored before the validation predictions were kept (for
# temperature scaling) are recomputed once rather than analysed without them.
CELL_EXTRAS = "val-predictions-1"


@dataclass
class ClassificationTask(Task):
    """A classification task plus what its post-cell analyses found (written to results.json's task metadata)."""

    calibration: dict[str, Any] = field(default_factory=dict)
    subgroups: dict[str, Any] = field(default_factory=dict)
    subgroup_notes: list[str] = field(default_factory=list)

    def metadata(self) -> dict[str, Any]:
        out = super().metadata()
        if self.calibration:
            out["calibration"] = self.calibration
        if self.subgroups:
            out["subgroups"] = self.subgroups
        return out


@dataclass
class ProbaOutput(CellOutput):
    """A cell's output plus its probabilities on the validation split (for temperature scaling)."""

    val_proba: np.ndarray | None = None


def budgets(config: SuiteConfig) -> LabelBudgets:
    return LabelBudgets(list(config.adapt.label_fractions), list(config.adapt.seeds), config.adapt.min_per_class)


# Part of the inputs of fine-tuning and from-scratch cells: their early stopping and decision threshold use a
# validation subset of the cell's own label fraction (cells stored before, on the whole val split, recompute).
VAL_PROTOCOL = "val-subset-of-the-label-fraction-1"


def val_budget(task: Task, config: SuiteConfig, fraction: float, seed: int) -> ImageSet:
    """The validation images a fine-tuning or from-scratch cell may look at: the same fraction of the val split as
    of the train split (stratified, at least ``min_per_class`` per class, drawn with the cell's seed).

    A network trained on 1% of the labels must not choose its best epoch and threshold on a validation split 30
    times larger than its training set: a user with that few labels has no such split, so the number would
    flatter low-label results. The probes choose their regularisation by cross-validation inside the labelled
    subset instead (adapt/selection.py)."""
    if fraction >= 1.0:
        return task.val
    chosen = budgets(config).subset(np.asarray(task.val.labels), fraction, seed)
    return task.val.subset(chosen, f"{task.val.name}[{fraction:g}, seed {seed}]")


@dataclass
class ClassificationScorer:
    """Metrics with patient-bootstrap CIs on the test split, and the per-case probabilities as CSV."""

    task: Task
    metrics: list[str]
    evaluate: EvaluateConfig

    @property
    def n_test(self) -> int:
        return len(self.task.test)

    def score(self, output: CellOutput, seed: int) -> Mapping[str, MetricValue]:
        return compute_metrics(
            np.asarray(self.task.test.labels),
            output.proba,
            self.task.test.patient_ids,
            metrics=tuple(self.metrics),
            n_bootstrap=self.evaluate.n_bootstrap,
            confidence=self.evaluate.confidence,
            seed=seed,
            threshold=output.threshold,
        )

    def save_predictions(self, path: Path, output: CellOutput) -> None:
        test = self.task.test
        write_predictions(
            path, Predictions(list(test.ids), list(test.patient_ids), np.asarray(test.labels), output.proba)
        )
        # Beside the test predictions: the validation ones (temperature scaling) and the decision threshold
        # (subgroup metrics must threshold as the cell's own metrics did).
        val_proba = getattr(output, "val_proba", None)
        if val_proba is not None:
            val = self.task.val
            write_predictions(
                val_predictions_path(path),
                Predictions(list(val.ids), list(val.patient_ids), np.asarray(val.labels), val_proba),
            )
        write_json_atomic(extras_path(path), {"threshold": output.threshold})


def val_predictions_path(predictions: Path) -> Path:
    """``tasks/<task>/val_predictions/<cell>.csv`` beside ``tasks/<task>/predictions/<cell>.csv``."""
    return predictions.parent.parent / "val_predictions" / predictions.name


def extras_path(predictions: Path) -> Path:
    return predictions.parent.parent / "val_predictions" / predictions.with_suffix(".json").name


class ClassificationKind(TaskKind[Task]):
    def __init__(self, name: str) -> None:
        self.name = name
        self.default_metrics = KIND_METRICS[name]

    def load(self, config: TaskConfig) -> Task:
        splits, carved = open_splits(config)
        labels = [labels_of(splits[role], config.name, role) for role in ("train", "val", "test")]
        multilabel = labels[0].ndim == 2
        n_classes = labels[0].shape[1] if multilabel else int(max(int(y.max()) for y in labels) + 1)
        if n_classes < 2 and not multilabel:
            raise DataError(f"task '{config.name}' has a single class", config.source or config.train.source)
        kind = config.kind or ("multilabel" if multilabel else "binary" if n_classes == 2 else "multiclass")
        where = config.source or (config.train.source if config.train else None)
        if (kind == "multilabel") != multilabel:
            shape = "(N, K) label columns" if multilabel else "one label per case"
            raise DataError(f"task '{config.name}' is declared {kind} but its labels have {shape}", where)
        if kind == "binary" and n_classes != 2:
            raise DataError(f"task '{config.name}' is declared binary but has {n_classes} classes", where)
        metrics = list(config.metrics or KIND_METRICS[kind])
        unknown = [m for m in metrics if m not in METRICS]
        if unknown:
            raise MedfoundryError(f"task '{config.name}': unknown metric(s) {unknown}; known: {sorted(METRICS)}")
        train = splits["train"]
        task = ClassificationTask(
            config, train, splits["val"], splits["test"], kind, n_classes, metrics, carved, is_feature_set(train)
        )
        if config.subgroup_file:
            join_subgroup_file(task.test, Path(config.subgroup_file), config.subgroup_id_column)
        if config.subgroups:
            source = config.subgroup_file or task.test.source
            task.subgroup_notes = check_subgroups(task.test.metadata, config.subgroups, config.min_group_size, source)
        return task

    def skipped_adapters(self, adapters: list[str]) -> list[str]:
        return [a for a in adapters if self.name == "multilabel" and a in SINGLE_LABEL_ADAPTERS]

    def scorer(self, task: Task, evaluate: EvaluateConfig) -> ClassificationScorer:
        return ClassificationScorer(task, task.metrics, evaluate)

    def encoder_cells(self, ctx: EngineContext, task: Task, spec: EncoderConfig, encoder: Encoder) -> Iterator[Cell]:
        config = ctx.config
        y_train, y_val = np.asarray(task.train.labels), np.asarray(task.val.labels)
        features = ctx.embed(spec.name, encoder, task)
        adapters = [a for a in config.adapt.adapters if a not in self.skipped_adapters(config.adapt.adapters)]
        identity = [weights_hash(encoder.backbone), encoder.pool] if not task.precomputed else ["precomputed"]

        def probe(adapter: str, subset: np.ndarray, seed: int) -> CellOutput:
            model = create_adapter(adapter, config.adapt, seed, task.n_classes)
            model.fit(features["train"].features[subset], y_train[subset], features["val"].features, y_val)
            proba = model.predict_proba(features["test"].features)
            val_proba = model.predict_proba(features["val"].features)
            threshold = getattr(model, "threshold_", None)
            return ProbaOutput(proba, len(subset), model.trainable_parameters_, threshold, val_proba)

        inputs = [*identity, config.adapt.model_dump(mode="json"), CELL_EXTRAS]
        yield from grid_cells(
            spec.name, adapters, budgets(config), y_train, inputs, probe, deterministic=_deterministic
        )
        if not (config.finetune.modes and spec.finetune) or task.precomputed:
            return
        tune = finetune_settings(config.finetune, spec)

        def finetune(adapter: str, subset: np.ndarray, seed: int, fraction: float) -> CellOutput:
            mode = adapter.removeprefix("finetune-")
            tuner = FineTuner(encoder, task.n_classes, mode=mode, seed=seed, **tune.model_dump(exclude={"modes"}))
            tuner.fit(task.train.subset(subset), val_budget(task, config, fraction, seed))
            proba = tuner.predict_proba(task.test)
            val_proba = tuner.predict_proba(task.val)
            return ProbaOutput(proba, len(subset), tuner.trainable_parameters_, tuner.threshold_, val_proba)

        modes = [f"finetune-{mode}" for mode in tune.modes]
        inputs = [*identity, tune.model_dump(mode="json"), CELL_EXTRAS, VAL_PROTOCOL]
        for mode in modes:
            for fraction in config.finetune_label_fractions or budgets(config).fractions:
                fit = partial(finetune, fraction=fraction)
                yield from grid_cells(spec.name, [mode], budgets(config), y_train, inputs, fit, [fraction])

    def baseline_cells(self, ctx: EngineContext, task: Task) -> Iterator[Cell]:
        baseline = ctx.config.supervised_baseline
        if baseline is None or not baseline.enabled or task.precomputed:
            return

        def from_scratch(adapter: str, subset: np.ndarray, seed: int, fraction: float) -> CellOutput:
            model = SupervisedFromScratch(baseline, task.train.num_channels, task.n_classes, seed)
            model.fit(task.train.subset(subset), val_budget(task, ctx.config, fraction, seed))
            proba = model.predict_proba(task.test)
            val_proba = model.predict_proba(task.val)
            return ProbaOutput(proba, len(subset), model.trainable_parameters_, model.threshold_, val_proba)

        inputs = [baseline.model_dump(mode="json"), CELL_EXTRAS, VAL_PROTOCOL]
        model = scratch_model_name(ctx.config)
        for fraction in budgets(ctx.config).fractions:
            fit = partial(from_scratch, fraction=fraction)
            yield from grid_cells(
                model, ["supervised"], budgets(ctx.config), np.asarray(task.train.labels), inputs, fit, [fraction]
            )

    def comparisons(self, ctx: EngineContext, task: Task, records: list[Any]) -> list[dict[str, Any]]:
        if isinstance(task, ClassificationTask):
            analyse_cells(ctx, task, records)
        return paired_comparisons(ctx.config, task, records)


def finetune_settings(tune: FineTuneConfig, spec: EncoderConfig) -> FineTuneConfig:
    """The suite's fine-tuning settings for one encoder. Layer-wise lr decay protects pre-trained lower layers; an
    encoder from random weights has nothing to protect, and decayed its patch embedding would barely move (0.75 ** 7,
    13% of the lr, on a 6-block ViT), so it trains every layer at one lr: the same ViT trained from scratch."""
    return tune.model_copy(update={"layer_decay": 1.0}) if spec.random_weights else tune


def join_subgroup_file(images: Any, path: Path, id_column: str) -> None:
    """Give ``images`` the columns of a metadata CSV, joined by sample id; every case must have a row."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            # Header cells are stripped: spreadsheet exports keep trailing spaces ("Risk of macular edema ").
            rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    except OSError as exc:
        raise DataError(f"cannot read subgroup file: {exc}", path) from exc
    columns = [c for c in (rows[0] if rows else {}) if c]
    if id_column not in columns:
        raise DataError(f"subgroup file has no id column {id_column!r}; columns found: {columns}", path)
    by_id = {row[id_column]: row for row in rows}
    # Readers may prefix ids with their folder ("test/IDRiD_001"); a file listing bare names still joins.
    keys = [sid if sid in by_id else sid.rsplit("/", 1)[-1] for sid in images.ids]
    missing = [sid for sid, key in zip(images.ids, keys, strict=True) if key not in by_id]
    if missing:
        raise DataError(f"{len(missing)} test case(s) have no row in the subgroup file, e.g. {missing[0]!r}", path)
    joined = {c: [by_id[key][c] for key in keys] for c in columns if c != id_column}
    images.metadata = {**(images.metadata or {}), **joined}


def analyse_cells(ctx: EngineContext, task: ClassificationTask, records: list[Any]) -> None:
    """Calibration (ECE, Brier and reliability bins, before and after temperature scaling) and subgroup metrics of
    every cell's saved predictions; the results go to the task's metadata in results.json."""
    config, spec = ctx.config, task.config
    store = CellStore(config.output_dir / "tasks" / task.name)
    keys = list(dict.fromkeys(CellKey(r.model, r.adapter, r.label_fraction, r.seed) for r in records))
    test = task.test
    y = np.asarray(test.labels)
    evaluate = config.evaluate
    calibration_rows, subgroup_rows = [], []
    seconds = {"calibration": 0.0, "subgroups": 0.0}
    for note in task.subgroup_notes:
        ctx.echo(f"  [{task.name}] {note}")
    for key in keys:
        path = store.predictions_path(key)
        if not path.is_file():
            continue
        predictions = read_predictions(path)
        if list(predictions.ids) != list(test.ids):
            raise DataError(
                "predictions do not list the task's test cases in order; delete the file to recompute", path
            )
        extras = json.loads(extras_path(path).read_text()) if extras_path(path).is_file() else {}
        cell = key.as_dict()
        if task.kind != "multilabel":
            started = time.perf_counter()
            val_file = val_predictions_path(path)
            val = read_predictions(val_file) if spec.temperature_scaling and val_file.is_file() else None
            settings = CalibrationSettings(evaluate.n_bootstrap, evaluate.confidence, key.seed)
            analysis = calibration_analysis(
                y, predictions.proba, test.patient_ids, settings,
                None if val is None else val.labels, None if val is None else val.proba,
            )  # fmt: skip
            calibration_rows.append({**cell, **analysis})
            seconds["calibration"] += time.perf_counter() - started
        if spec.subgroups and test.metadata:
            started = time.perf_counter()
            settings_sg = SubgroupSettings(
                tuple(spec.subgroups), spec.min_group_size, evaluate.n_bootstrap, evaluate.confidence, key.seed
            )
            analysis_sg = subgroup_analysis(
                y, predictions.proba, test.patient_ids, test.metadata, task.metrics, settings_sg,
                extras.get("threshold"),
            )  # fmt: skip
            subgroup_rows += [{**cell, **entry} for entry in analysis_sg]
            seconds["subgroups"] += time.perf_counter() - started
    if calibration_rows:
        task.calibration = {"temperature_scaling": spec.temperature_scaling, "cells": calibration_rows}
        ctx.durations[f"{task.name}/calibration"] = seconds["calibration"]
    if subgroup_rows:
        metadata = test.metadata or {}
        task.subgroups = {
            "columns": list(spec.subgroups),
            "min_group_size": spec.min_group_size,
            "groups": {c: sorted(set(metadata[c])) for c in spec.subgroups},
            "cells": subgroup_rows,
        }
        ctx.durations[f"{task.name}/subgroups"] = seconds["subgroups"]


def scratch_model_name(config: SuiteConfig) -> str | None:
    baseline = config.supervised_baseline
    return f"{baseline.backbone}-scratch" if baseline is not None and baseline.enabled else None


def comparison_pairs(config: SuiteConfig, models: list[str], adapters: list[str]) -> list[tuple[str, str, str, str]]:
    """(model A, adapter A, model B, adapter B): each encoder against the baseline encoder with the same adapter,
    each adapter against the reference adapter on the same encoder, and each against the from-scratch network."""
    pairs: list[tuple[str, str, str, str]] = []
    baseline, reference = config.comparisons.baseline_encoder, config.comparisons.reference_adapter
    scratch = scratch_model_name(config)
    encoders = [m for m in models if m != scratch]
    probes = [a for a in adapters if a != "supervised"]
    if baseline in encoders:
        pairs += [(m, a, baseline, a) for m in encoders if m != baseline for a in probes]
    if reference in probes:
        pairs += [(m, a, m, reference) for m in encoders for a in probes if a != reference]
    if config.comparisons.scratch_baseline and scratch in models:
        pairs += [(m, a, scratch, "supervised") for m in encoders for a in probes]
    return pairs


def _runs(store: CellStore, model: str, adapter: str, fraction: float, seeds: list[int]) -> list[np.ndarray] | None:
    """The test predictions of every seed the cell ran at (one where seeds could not differ); None if it never ran."""
    paths = [store.predictions_path(CellKey(model, adapter, fraction, seed)) for seed in seeds]
    runs = [read_predictions(path).proba for path in paths if path.is_file()]
    return runs or None


def paired_comparisons(config: SuiteConfig, task: Task, records: list[Any]) -> list[dict[str, Any]]:
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
                    "n_seeds": max(len(runs_a), len(runs_b)),
                    "confidence": config.evaluate.confidence,
                }
            )
    return comparisons


for _name in KIND_METRICS:
    TASK_KINDS.add(_name, ClassificationKind(_name))
