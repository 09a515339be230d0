"""The zero-shot task kind: a CLIP model classifies labelled images from class prompts alone, scored like any
classification task (metrics with patient-bootstrap CIs, per-case predictions, results.json, report).

How zero-shot maps onto the engine's cells (the prompt ensembling itself is :mod:`medfoundry.vlm.zeroshot`):

* the task names its CLIP model folder, classes and templates in its ``zero_shot:`` section, and ``source`` the
  labelled images (``test_split`` of it, or its only split; nothing is carved, no label is used). The CLIP folder is
  an image *and* text model, which a suite's encoders (image encoders) cannot describe, so the task carries its own
  model and is marked precomputed: the suite needs no encoder for it, and its cells are named after the CLIP folder
  (``<run>-clip`` for ``<run>/pretrain/clip``);
* one adapter, ``zero-shot``, at label fraction 0 (``grid_cells``' empty subset: n_train 0) and a **single seed**,
  the suite's first: zero-shot has no randomness, so more seeds would repeat the same predictions and differ only
  in the bootstrap draws;
* the cell's fingerprint holds the CLIP weights, the prompts and the input size, so a changed prompt or model is
  recomputed on resume and an unchanged one is reused;
* probabilities are in the data's label order (the given classes are matched to the data's class names), so the
  classification scorer, predictions CSV and comparisons apply unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medfoundry.bench.classification import KIND_METRICS, ClassificationScorer
from medfoundry.bench.grid import Cell, LabelBudgets, grid_cells
from medfoundry.bench.kinds import TASK_KINDS, EngineContext, TaskKind
from medfoundry.bench.tasks import Task
from medfoundry.config import EncoderConfig, EvaluateConfig, TaskConfig
from medfoundry.data.splits import has_patient_ids
from medfoundry.errors import MedfoundryError
from medfoundry.evaluate.cells import CellOutput
from medfoundry.evaluate.metrics import METRICS
from medfoundry.models.checkpoint import weights_hash
from medfoundry.vlm.clip import LoadedCLIP, load_clip, model_label
from medfoundry.vlm.zeroshot import (
    ADAPTER,
    ZeroShotConfig,
    class_prompts,
    classes_in_label_order,
    open_images,
    zero_shot_proba_of,
)

KIND = "zero-shot"


@dataclass
class ZeroShotTask(Task):
    """A zero-shot task: empty train and val splits, the labelled images as test, and the CLIP model to use."""

    settings: ZeroShotConfig | None = None
    clip: LoadedCLIP | None = field(default=None, repr=False)
    classes: dict[str, list[str]] = field(default_factory=dict)  # in label order

    @property
    def model_name(self) -> str:
        assert self.settings is not None
        return model_label(self.settings.checkpoint)

    @property
    def prompts(self) -> dict[str, list[str]]:
        assert self.settings is not None
        return class_prompts(self.classes, self.settings.templates)

    def grouping(self) -> str:
        if not has_patient_ids(self.test):
            return f"test split only ({len(self.test)} images; the data names no patients); no label is used"
        n_patients = len(set(self.test.patient_ids))
        return f"test split only ({len(self.test)} images of {n_patients} patients); no label is used"

    def metadata(self) -> dict[str, Any]:
        assert self.settings is not None
        return {
            "kind": self.kind,
            "n_classes": self.n_classes,
            "splits": {"train": 0, "val": 0, "test": len(self.test)},
            "patients": {"test": len(set(self.test.patient_ids))},
            "grouping": self.grouping(),
            "precomputed_features": False,
            "clip_model": str(self.settings.checkpoint),
            "classes": self.classes,
            "templates": list(self.settings.templates),
            "n_prompts_per_class": {name: len(p) for name, p in self.prompts.items()},
            "note": "zero-shot: no labels used (label fraction 0, n_train 0)",
        }

    def describe(self) -> str:
        return (
            f"{self.name}: zero-shot with {self.model_name}, {self.n_classes} classes "
            f"({', '.join(self.classes)}), {len(self.test)} test images; headline metric {self.metrics[0]}"
        )


class ZeroShotKind(TaskKind[ZeroShotTask]):
    name = KIND
    default_metrics = KIND_METRICS["binary"]

    def load(self, config: TaskConfig) -> ZeroShotTask:
        assert config.source is not None and config.zero_shot is not None  # TaskSource checks a zero-shot task
        settings = ZeroShotConfig.model_validate(config.zero_shot)
        loaded = load_clip(settings.checkpoint)
        size, channels = loaded.image_size, loaded.model.image_encoder.in_chans
        images = open_images(config.source, config.options, config.test_split, size, channels)
        classes = classes_in_label_order(images, settings.classes, config.source)
        n_classes = len(classes)
        metrics = list(config.metrics or KIND_METRICS["binary" if n_classes == 2 else "multiclass"])
        unknown = [m for m in metrics if m not in METRICS]
        if unknown:
            raise MedfoundryError(f"task '{config.name}': unknown metric(s) {unknown}; known: {sorted(METRICS)}")
        empty = images.subset(np.zeros(0, dtype=np.int64), name=f"{images.name}-unused")
        return ZeroShotTask(
            config, empty, empty, images, KIND, n_classes, metrics, precomputed=True,
            settings=settings, clip=loaded, classes=classes,
        )  # fmt: skip

    def scorer(self, task: Task, evaluate: EvaluateConfig) -> ClassificationScorer:
        return ClassificationScorer(task, task.metrics, evaluate)

    def encoder_cells(
        self, ctx: EngineContext, task: ZeroShotTask, spec: EncoderConfig, encoder: Any
    ) -> Iterator[Cell]:
        assert task.clip is not None and task.settings is not None
        loaded, prompts, batch_size = task.clip, task.prompts, task.settings.batch_size

        def classify(adapter: str, subset: np.ndarray, seed: int) -> CellOutput:
            return CellOutput(zero_shot_proba_of(loaded, task.test, prompts, batch_size), len(subset), 0)

        # Fraction 0 (no label) and one seed: the predictions do not depend on a seed (module docstring).
        budgets = LabelBudgets([0.0], list(ctx.config.adapt.seeds[:1]), ctx.config.adapt.min_per_class)
        inputs = [weights_hash(loaded.model), prompts, loaded.image_size]
        yield from grid_cells(task.model_name, [ADAPTER], budgets, np.zeros(0, dtype=np.int64), inputs, classify)


TASK_KINDS.add(KIND, ZeroShotKind())
