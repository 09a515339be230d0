"""The slide-mil task kind: MIL heads on cached tile features, slide-level metrics with patient-bootstrap CIs.

How slide-level MIL maps onto the engine's cells (training itself is :mod:`medfoundry.mil`):

* a task is a folder of per-slide feature files (``medfoundry wsi embed``; the task's ``source``) and a CSV of slide
  labels (``labels``: slide_id, patient_id, label and optionally split). The task is *precomputed*: no encoder runs,
  and its cells are named after the features folder, which stands for the encoder that made the features;
* the **adapters are the task's MIL models** (``mil.models``: mean, abmil, gated_abmil, transmil), recorded as
  ``mil-<model>``; ``grid_cells`` crosses them with the suite's label fractions and seeds, a fraction drawing a
  stratified subset (nested per seed) of the labelled training slides;
* **splits**: a ``split`` column fixes train / val / test; whatever it lacks (everything, without the column) is
  carved by patient (``test_fraction``, ``val_fraction``, ``split_seed``), and no patient is in two splits. A cell
  trains on its subset of train, early-stops on val and predicts the test slides;
* **cross-validation** (``mil.folds: k``, what ``medfoundry mil`` runs): the test set is every slide. A cell cuts k
  patient-grouped folds with its seed (so seeds repeat the cross-validation on other partitions), trains one model
  per fold on the labelled slides outside it (early-stopped on a patient-grouped part of them) and predicts the
  fold; the cell is scored once on all out-of-fold predictions, each from a model that never saw that patient;
* the scorer is the classification kind's (metrics with patient-bootstrap CIs, a per-slide predictions CSV) and so
  are the paired comparisons, with ``mil-mean`` as the reference adapter of a task that runs it;
* with ``mil.heatmaps``, the full-label cells of the first seed draw each predicted slide's attention over its
  thumbnail into ``tasks/<task>/heatmaps/<model>/<slide>.png`` (models with attention, slides that can be opened).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from medfoundry.bench.classification import KIND_METRICS, ClassificationScorer, budgets, paired_comparisons
from medfoundry.bench.grid import Cell, grid_cells
from medfoundry.bench.kinds import TASK_KINDS, EngineContext, TaskKind
from medfoundry.bench.task_parts import ConfiguredTask
from medfoundry.config import EncoderConfig, EvaluateConfig, TaskConfig
from medfoundry.data.splits import patient_split
from medfoundry.errors import DataError, MedfoundryError
from medfoundry.evaluate.cells import CellOutput
from medfoundry.evaluate.metrics import METRICS
from medfoundry.mil.data import BagSet, load_bags
from medfoundry.mil.heatmap import write_attention_heatmaps
from medfoundry.mil.models import count_trainable
from medfoundry.mil.train import MILTaskConfig, cross_validate_mil, predict_mil, train_mil

KIND = "slide-mil"
ADAPTER_PREFIX = "mil-"
# Mean pooling is the baseline every attention model should beat: the reference of the paired comparisons.
REFERENCE_MODEL = "mean"
ROLES = ("train", "val", "test")


@dataclass
class SlideCases:
    """Slides a cell is scored on: what the classification scorer and comparisons read of a test split."""

    ids: list[str]
    patient_ids: list[str]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class SlideTask(ConfiguredTask):
    """A slide-mil task's bags, splits (or folds) and metrics; the engine reads the same attributes as of a Task."""

    config: TaskConfig
    bags: BagSet
    settings: MILTaskConfig
    # Slide indices per role; empty under cross-validation, where every slide is predicted out of fold.
    splits: dict[str, np.ndarray]
    metrics: list[str]
    carved: list[str] = field(default_factory=list)
    kind: str = KIND
    precomputed: bool = True

    @property
    def model_name(self) -> str:
        return Path(str(self.config.source)).resolve().name

    @property
    def n_classes(self) -> int:
        return max(len(self.bags.classes), 2)

    @property
    def folds(self) -> int | None:
        return self.settings.folds

    def indices(self, role: str) -> np.ndarray:
        return np.arange(len(self.bags.bags)) if self.folds else self.splits[role]

    @cached_property
    def test(self) -> SlideCases:
        index = self.indices("test")
        bags = [self.bags.bags[i] for i in index]
        return SlideCases([b.slide_id for b in bags], [b.patient_id for b in bags], self.bags.labels[index])

    @cached_property
    def _fingerprint(self) -> str:
        digest = hashlib.sha256(repr((self.bags.classes, self.folds)).encode())
        role_of = {int(i): role for role, index in self.splits.items() for i in index}
        for i, bag in enumerate(self.bags.bags):
            digest.update(f"{bag.slide_id}:{bag.patient_id}:{bag.label}:{role_of.get(i)}:{bag.features.shape}".encode())
            digest.update(np.ascontiguousarray(bag.features).tobytes())
        return digest.hexdigest()[:16]

    def fingerprint(self) -> str:
        """Changes whenever a slide's features, label, patient or split changes."""
        return self._fingerprint

    def grouping(self) -> str:
        if self.folds:
            n_patients = len(set(self.bags.patient_ids))
            return f"{self.folds}-fold cross-validation grouped by patient ({n_patients} patients, each in one fold)"
        counts = "/".join(str(len({self.bags.patient_ids[i] for i in self.splits[r]})) for r in ROLES)
        carved = f"; {' and '.join(self.carved)} carved by patient id" if self.carved else ""
        return f"grouped by patient id ({counts} patients in train/val/test, none in two splits){carved}"

    def metadata(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "n_classes": self.n_classes,
            "classes": list(self.bags.classes),
            "n_slides": len(self.bags.bags),
            "skipped_slides": len(self.bags.skipped),
            "splits": {role: len(self.indices(role)) for role in ROLES} if not self.folds else {"folds": self.folds},
            "carved_from_train": self.carved,
            "grouping": self.grouping(),
            "precomputed_features": True,
            "mil_models": list(self.settings.models),
        }

    def describe(self) -> str:
        if self.folds:
            layout = f"{self.folds}-fold cross-validation by patient over {len(self.bags.bags)} slides"
        else:
            carved = f" ({', '.join(self.carved)} carved by patient)" if self.carved else ""
            layout = "train/val/test " + "/".join(str(len(self.splits[r])) for r in ROLES) + f" slides{carved}"
        skipped = f", {len(self.bags.skipped)} slide(s) skipped" if self.bags.skipped else ""
        return (
            f"{self.name}: {self.kind}, {self.n_classes} classes, {layout}{skipped}; "
            f"MIL models {', '.join(self.settings.models)}; headline metric {self.metrics[0]}"
        )


def _carve(index: np.ndarray, bags: BagSet, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept, carved) slide indices: ``share`` of ``index``'s patients carved out, stratified by label."""
    patients = [bags.patient_ids[i] for i in index]
    if len(set(patients)) < 2:
        raise DataError(f"cannot carve a split from {len(set(patients))} patient(s)")
    parts = patient_split(patients, bags.labels[index], (1.0 - share, share), seed)
    return index[parts["train"]], index[parts["val"]]


def slide_splits(bags: BagSet, config: TaskConfig) -> tuple[dict[str, np.ndarray], list[str]]:
    """Train / val / test slide indices from the CSV's split column, the missing ones carved from train by patient."""
    given = bags.splits
    roles = np.asarray([role or "train" for role in given])
    splits = {role: np.flatnonzero(roles == role) for role in ROLES}
    if len(splits["train"]) == 0:
        raise DataError(f"task '{config.name}': no slide is in the train split", config.labels)
    carved = []
    if len(splits["test"]) == 0:
        splits["train"], splits["test"] = _carve(splits["train"], bags, config.test_fraction, config.split_seed)
        carved.append("test")
    if len(splits["val"]) == 0:
        share = config.val_fraction / (1.0 - config.test_fraction) if "test" in carved else config.val_fraction
        splits["train"], splits["val"] = _carve(splits["train"], bags, share, config.split_seed)
        carved.append("val")
    patients = {role: {bags.patient_ids[i] for i in index} for role, index in splits.items()}
    for i, first in enumerate(ROLES):
        for second in ROLES[i + 1 :]:
            shared = sorted(patients[first] & patients[second])
            if shared:
                raise DataError(
                    f"task '{config.name}': {len(shared)} patient(s) have slides in both {first} and {second} "
                    f"(e.g. {shared[0]!r}); splits must not share patients",
                    config.labels,
                )
    return splits, carved


class SlideMILKind(TaskKind[SlideTask]):
    name = KIND
    default_metrics = KIND_METRICS["binary"]

    def load(self, config: TaskConfig) -> SlideTask:
        assert config.source is not None and config.labels is not None  # TaskSource checks a slide-mil task
        settings = MILTaskConfig.model_validate(config.mil or {})
        bags = load_bags(config.source, config.labels)
        if len(bags.classes) < 2 or len(set(bags.labels.tolist())) < 2:
            raise DataError(f"task '{config.name}' has a single class among its slides", config.labels)
        kind = "binary" if len(bags.classes) == 2 else "multiclass"
        metrics = list(config.metrics or KIND_METRICS[kind])
        unknown = [m for m in metrics if m not in METRICS]
        if unknown:
            raise MedfoundryError(f"task '{config.name}': unknown metric(s) {unknown}; known: {sorted(METRICS)}")
        if settings.folds:
            if any(split is not None for split in bags.splits):
                raise DataError(
                    f"task '{config.name}': the labels have a split column and mil.folds asks for cross-validation; "
                    "drop one of them",
                    config.labels,
                )
            return SlideTask(config, bags, settings, {}, metrics)
        splits, carved = slide_splits(bags, config)
        return SlideTask(config, bags, settings, splits, metrics, carved)

    def scorer(self, task: SlideTask, evaluate: EvaluateConfig) -> ClassificationScorer:
        # The scorer reads only task.test (ids, patient ids, labels), which SlideCases provides.
        return ClassificationScorer(task, task.metrics, evaluate)  # type: ignore[arg-type]

    def encoder_cells(self, ctx: EngineContext, task: SlideTask, spec: EncoderConfig, encoder: Any) -> Iterator[Cell]:
        config, settings = ctx.config, task.settings
        features, labels, patients = task.bags.features, task.bags.labels, task.bags.patient_ids
        train = task.indices("train")
        first_seed = config.adapt.seeds[0]
        heatmaps = config.output_dir / "tasks" / task.name / "heatmaps"

        def draw(model: str, index: np.ndarray, attention: list[np.ndarray | None], n_train: int, seed: int) -> None:
            # One picture per slide is enough: the model that saw every label, at the first seed.
            wanted = settings.heatmaps and n_train == len(train) and seed == first_seed
            if wanted and any(a is not None for a in attention):
                write_attention_heatmaps([task.bags.bags[i] for i in index], attention, heatmaps / model)

        def split_fit(adapter: str, subset: np.ndarray, seed: int) -> CellOutput:
            model, chosen = adapter.removeprefix(ADAPTER_PREFIX), train[subset]
            val, test = task.indices("val"), task.indices("test")
            fit = train_mil(
                model,
                [features[i] for i in chosen],
                labels[chosen],
                patient_ids=[patients[i] for i in chosen],
                n_classes=task.n_classes,
                config=settings.train,
                seed=seed,
                validation=([features[i] for i in val], labels[val]),
            )
            prediction = predict_mil(fit.model, [features[i] for i in test])
            draw(model, test, prediction.attention, len(subset), seed)
            return CellOutput(prediction.proba, len(subset), count_trainable(fit.model))

        def cv_fit(adapter: str, subset: np.ndarray, seed: int) -> CellOutput:
            model = adapter.removeprefix(ADAPTER_PREFIX)
            assert task.folds is not None
            cv = cross_validate_mil(
                model, features, labels, patients, n_folds=task.folds, seed=seed, config=settings.train,
                n_classes=task.n_classes, labelled=subset,
            )  # fmt: skip
            draw(model, np.arange(len(labels)), cv.attention, len(subset), seed)
            # Every fold model has the same architecture: one's parameter count is the adapter's.
            return CellOutput(cv.proba, len(subset), count_trainable(cv.fits[0].model))

        adapters = [f"{ADAPTER_PREFIX}{m}" for m in settings.models]
        inputs = ["precomputed", settings.model_dump(mode="json")]
        fit = cv_fit if task.folds else split_fit
        yield from grid_cells(task.model_name, adapters, budgets(config), labels[train], inputs, fit)

    def comparisons(self, ctx: EngineContext, task: SlideTask, records: list[Any]) -> list[dict[str, Any]]:
        config = ctx.config
        reference = f"{ADAPTER_PREFIX}{REFERENCE_MODEL}"
        if REFERENCE_MODEL in task.settings.models and config.comparisons.reference_adapter != reference:
            comparisons = config.comparisons.model_copy(update={"reference_adapter": reference})
            config = config.model_copy(update={"comparisons": comparisons})
        return paired_comparisons(config, task, records)  # type: ignore[arg-type]


TASK_KINDS.add(KIND, SlideMILKind())
