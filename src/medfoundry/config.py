"""Typed configs (pydantic), loadable from YAML, with dotted overrides from the command line.

A recipe is a YAML file whose keys mirror these models; ``pretrain.epochs=40`` on the command line
overrides one value. Unknown keys are errors, so a typo never silently falls back to a default.

Each component declares its typed settings beside itself (``DinoConfig`` in ``ssl/dino.py``, ``AdaptConfig`` in
``adapt/registry.py``, ...); this module composes them into recipes and re-exports them, so recipes and callers
name them all from here. Names of registered components (SSL methods, adapters) are checked against their
registries, not against a copy of the names.
"""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from medfoundry.adapt.finetune import FineTuneConfig
from medfoundry.adapt.registry import AdaptConfig
from medfoundry.adapt.supervised import SupervisedBaselineConfig
from medfoundry.errors import MedfoundryError
from medfoundry.packaged import resolve_config_path
from medfoundry.registry import did_you_mean, unknown_name_error
from medfoundry.settings import StrictModel
from medfoundry.ssl.base import SSL_METHODS
from medfoundry.ssl.byol import BYOLConfig
from medfoundry.ssl.dino import DinoConfig
from medfoundry.ssl.distill import DistillConfig
from medfoundry.ssl.ibot import IBOTConfig
from medfoundry.ssl.mae import MAEConfig
from medfoundry.ssl.mocov3 import MoCoV3Config
from medfoundry.ssl.simclr import SimCLRConfig
from medfoundry.transforms.view import ViewsConfig
from medfoundry.vlm.clip import CLIPConfig

# Settings declared beside their components, importable from here as before.
__all__ = [
    "AdaptConfig",
    "BYOLConfig",
    "CLIPConfig",
    "DinoConfig",
    "FineTuneConfig",
    "IBOTConfig",
    "MAEConfig",
    "MoCoV3Config",
    "SimCLRConfig",
    "StrictModel",
    "SupervisedBaselineConfig",
    "ViewsConfig",
]

T = TypeVar("T", bound=BaseModel)


class PretrainSourceConfig(StrictModel):
    """One unlabeled source in a pre-training mixture."""

    source: str = Field(description="dataset spec: file.npz, folder, slide.svs, or prefix:path")
    split: str = "train"
    weight: float = Field(1.0, gt=0, description="share of each epoch's draws, relative to the other sources")
    options: dict[str, Any] = Field(default_factory=dict, description="reader arguments, e.g. {tile_size: 224}")


class DatasetSpec(StrictModel):
    """One labelled dataset given for one role of a task (its train, val or test cases)."""

    source: str = Field(description="dataset spec: file.npz, folder, csv:..., features.h5, or prefix:path")
    options: dict[str, Any] = Field(default_factory=dict, description="reader arguments, e.g. {image_size: 64}")
    split: str | None = Field(None, description="which split of the source (default: its only split, or the role)")


class TaskSource(StrictModel):
    """Where a task's labelled cases come from, how they are split, and how they are scored.

    Either ``source`` (one dataset with a train split and optionally val/test splits; missing ones are carved from
    train by patient) or ``train`` plus optionally ``val`` and ``test`` as separate datasets (nothing is carved
    that is given). Embedding files (``.h5`` from ``medfoundry embed``) may stand for images: the task then probes
    those features directly.
    """

    source: str | None = Field(None, description="dataset spec: file.npz, folder, csv:..., idrid:..., prefix:path")
    options: dict[str, Any] = Field(default_factory=dict, description="reader arguments, e.g. {image_size: 64}")
    train: DatasetSpec | None = None
    val: DatasetSpec | None = None
    test: DatasetSpec | None = None
    kind: str | None = Field(None, description="task kind (binary, multiclass, ordinal, multilabel); else inferred")
    metrics: list[str] | None = Field(None, description="default by kind; the first is the headline metric")
    val_split: str = "val"
    test_split: str = "test"
    val_fraction: float = Field(0.2, gt=0, lt=1, description="carved from train, by patient, when there is no val")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="carved from train, by patient, when there is no test")
    split_seed: int = 0
    segmentation: dict[str, Any] | None = Field(
        None,
        description="a segmentation task: CT volumes, label maps, classes, z split and decoders "
        "(medfoundry.segment.config.SegmentTaskConfig); implies kind segmentation",
    )
    labels: str | None = Field(
        None,
        description="slide-mil: CSV of slide_id, patient_id, label (and optionally split: train/val/test); "
        "source is then the folder of per-slide feature files (medfoundry wsi embed)",
    )
    mil: dict[str, Any] | None = Field(
        None, description="slide-mil: MIL models, cross-validation folds, training (medfoundry.mil.train.MILTaskConfig)"
    )
    zero_shot: dict[str, Any] | None = Field(
        None,
        description="zero-shot: CLIP checkpoint folder, classes and prompt templates "
        "(medfoundry.vlm.zeroshot.ZeroShotConfig)",
    )
    survival: dict[str, Any] | None = Field(
        None,
        description="survival: time, event, patient and feature columns, baseline, horizons "
        "(medfoundry.bench.survival.SurvivalConfig); source is the CSV",
    )
    temperature_scaling: bool = Field(
        False,
        description="classification: also fit one temperature on the val split's predictions and report "
        "calibration (ECE, Brier, reliability diagram) before and after it (docs/calibration.md)",
    )
    subgroups: list[str] = Field(
        default_factory=list,
        description="classification: per-sample metadata columns (manifest columns, folder group_regex groups, "
        "subgroup_file columns) whose groups every metric is reported for; survival: columns of the survival "
        "table, Harrell's C per group (docs/subgroups.md)",
    )
    subgroup_file: str | None = Field(
        None, description="CSV of per-sample metadata joined to the test cases by sample id (subgroup_id_column)"
    )
    subgroup_id_column: str = Field("id", description="the subgroup_file column holding the sample ids")
    min_group_size: int = Field(
        10, ge=2, description="test cases a subgroup needs; smaller groups are reported as too small, not as numbers"
    )
    min_group_events: int = Field(
        5,
        ge=1,
        description="survival: events a subgroup needs in the test split for its C-index; groups with fewer are "
        "reported as too few events, not as numbers",
    )

    @model_validator(mode="after")
    def _one_way_in(self) -> TaskSource:
        self._kind_sections()
        if self.segmentation is not None or self.kind == "segmentation":
            return self._segmentation_task()
        if self.train is not None and "source" in self.model_fields_set:
            raise ValueError("give either source (one dataset with splits) or train/val/test, not both")
        if self.train is None and (self.val is not None or self.test is not None):
            raise ValueError("val and test datasets go with a train dataset")
        if self.train is None and self.source is None:
            raise ValueError("a task needs a source or a train dataset")
        if self.kind is not None:
            from medfoundry.bench.kinds import TASK_KINDS  # here: the engine imports this module

            TASK_KINDS.get(self.kind)
        return self

    def _kind_sections(self) -> None:
        # Here: medfoundry.mil and medfoundry.vlm declare these settings beside themselves and import this module's
        # peers. Each section belongs to one kind, and those kinds need theirs.
        from medfoundry.bench.survival import SurvivalConfig
        from medfoundry.mil.train import MILTaskConfig
        from medfoundry.vlm.zeroshot import ZeroShotConfig

        sections: tuple[tuple[str, str, type[BaseModel]], ...] = (
            ("mil", "slide-mil", MILTaskConfig),
            ("zero_shot", "zero-shot", ZeroShotConfig),
            ("survival", "survival", SurvivalConfig),
        )
        for field_name, kind, model in sections:
            section = getattr(self, field_name)
            if section is not None and self.kind != kind:
                raise ValueError(f"a {field_name} section goes with kind {kind}")
            if self.kind == kind:
                if section is None and kind == "zero-shot":
                    raise ValueError("a zero-shot task needs a zero_shot section (checkpoint, classes)")
                if section is None and kind == "survival":
                    raise ValueError("a survival task needs a survival section (time, event and patient columns)")
                try:
                    model.model_validate(section or {})
                except ValidationError as error:
                    problems = [f"{field_name}.{_problem(model, e)}" for e in error.errors()]
                    raise ValueError("; ".join(problems)) from None
        if (self.labels is not None) != (self.kind == "slide-mil"):
            raise ValueError("a slide-mil task needs labels (a slide CSV), and labels go with kind slide-mil")
        if self.kind == "slide-mil" and (self.source is None or self.train is not None):
            raise ValueError("a slide-mil task's source is its folder of per-slide feature files (no train/val/test)")

    def _segmentation_task(self) -> TaskSource:
        if self.segmentation is None or self.kind not in (None, "segmentation"):
            raise ValueError("a segmentation task has kind segmentation and a segmentation section (volumes, classes)")
        if self.train is not None or "source" in self.model_fields_set:
            raise ValueError("a segmentation task lists its volumes under segmentation, not as source or train")
        # Here: medfoundry.segment imports this module.
        from medfoundry.segment.config import SegmentTaskConfig

        try:
            SegmentTaskConfig.model_validate(self.segmentation)
        except ValidationError as error:
            where = ["segmentation" + ("." if e["loc"] else "") for e in error.errors()]
            problems = [w + _problem(SegmentTaskConfig, e) for w, e in zip(where, error.errors(), strict=True)]
            raise ValueError("; ".join(problems)) from None
        if self.kind is None:
            self.kind = "segmentation"  # validated again on assignment: kind is then set, so it stops there
        return self


class DataConfig(TaskSource):
    """The labelled task of a ``run`` (a one-task suite) and the unlabeled images pre-training uses."""

    source: str | None = Field("data/breastmnist/breastmnist.npz", description="npz / csv / folder, or prefix:path")
    task: str = Field("breastmnist", description="name used in results and report")
    pretrain_split: str = Field("train", description="split whose images (not labels) are used for SSL")
    pretrain_sources: list[PretrainSourceConfig] = Field(
        default_factory=list,
        description="pre-train on these sources mixed by weight instead of source/pretrain_split",
    )

    def as_task(self) -> TaskConfig:
        given = set(self.model_fields_set) & set(TaskSource.model_fields)
        if self.train is None:
            given.add("source")  # the default source counts as given when no train dataset is
        return TaskConfig(name=self.task, **{key: getattr(self, key) for key in given})


class ModelConfig(StrictModel):
    backbone: str = "vit_tiny_28"
    img_size: int = 28
    in_chans: int = 1
    mean: list[float] | None = None
    std: list[float] | None = None
    pool: Literal["default", "token+avg"] = "default"


# CLIP pre-trains on image-text pairs with its own trainer (vlm/train.py), so it is no SSLMethod over image views.
IMAGE_TEXT_METHODS = ("clip",)


# The budget when a recipe gives none.
DEFAULT_PRETRAIN_EPOCHS = 20


class PretrainConfig(StrictModel):
    """Pre-training: the method (a registered SSL method, or clip), the budget, the optimisation, and each method's
    settings.

    The budget is one of ``epochs``, ``max_steps`` or ``max_minutes`` (20 epochs when none is given); warm-ups are
    fractions of the run, whatever its budget (docs/pretraining.md).
    """

    method: str = Field("dino", description="a registered SSL method (medfoundry.ssl.base.SSL_METHODS) or clip")
    epochs: int | None = Field(None, gt=0, description="budget: passes over the images (20 when no budget is given)")
    max_steps: int | None = Field(None, gt=0, description="budget: optimisation steps")
    max_minutes: float | None = Field(
        None,
        gt=0,
        description="budget: minutes of training; the step count for the schedules is estimated from the speed of the "
        "first steps, and the run stops when the time is up",
    )
    batch_size: int = 64
    lr: float = 5e-4
    min_lr: float = 1e-6
    warmup_fraction: float = Field(0.1, ge=0, lt=1, description="share of the run over which the lr warms up")
    warmup_epochs: int | None = Field(
        None, ge=0, description="older recipes: the lr warm-up in whole epochs; now warmup_fraction"
    )
    threads: int | None = Field(
        None, ge=1, description="CPU threads for torch (torch.set_num_threads); default: torch's"
    )
    init_from: str | None = Field(
        None,
        description="continue pre-training from this encoder (a checkpoint folder or public:NAME:PATH) with fresh SSL "
        "heads; it replaces the model section's random weights",
    )
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    clip_grad: float = 3.0
    bf16: bool = False
    num_workers: int = 0
    seed: int = 0
    checkpoint_every_steps: int = 50
    log_every_steps: int = 10
    monitor_every_steps: int = 25
    stop_on_collapse: bool = False
    tensorboard: bool = True
    views: ViewsConfig = ViewsConfig()
    dino: DinoConfig = DinoConfig()
    ibot: IBOTConfig = IBOTConfig()
    simclr: SimCLRConfig = SimCLRConfig()
    mocov3: MoCoV3Config = MoCoV3Config()
    byol: BYOLConfig = BYOLConfig()
    mae: MAEConfig = MAEConfig()
    distill: DistillConfig = DistillConfig()
    clip: CLIPConfig = CLIPConfig()

    @field_validator("method")
    @classmethod
    def _registered_method(cls, name: str) -> str:
        if name not in IMAGE_TEXT_METHODS and name not in SSL_METHODS:
            raise unknown_name_error("pre-training method", name, [*SSL_METHODS.names(), *IMAGE_TEXT_METHODS])
        return name

    @model_validator(mode="after")
    def _one_budget(self) -> PretrainConfig:
        given = {name: getattr(self, name) for name in ("epochs", "max_steps", "max_minutes")}
        given = {name: value for name, value in given.items() if value is not None}
        if len(given) > 1:
            listed = " and ".join(f"{name}={value}" for name, value in given.items())
            keep = list(given)[-1]
            drop = " ".join(f"-s pretrain.{name}=null" for name in given if name != keep)
            raise ValueError(f"give one budget, epochs, max_steps or max_minutes (got {listed}); e.g. {drop}")
        if not given:
            self.epochs = DEFAULT_PRETRAIN_EPOCHS  # validated again on assignment: one budget then, so it stops there
        if self.warmup_epochs is not None and "warmup_fraction" in self.model_fields_set:
            raise ValueError("warmup_epochs is now warmup_fraction (a share of the run); give only warmup_fraction")
        return self


class EmbedConfig(StrictModel):
    batch_size: int = 128
    num_workers: int = 0


class EvaluateConfig(StrictModel):
    """How every metric's confidence interval is computed (patients resampled)."""

    n_bootstrap: int = 1000
    confidence: float = 0.95

    @model_validator(mode="before")
    @classmethod
    def _moved_fields(cls, data: Any) -> Any:
        # Recipes written before the one evaluation engine set these here; say where they live now.
        if isinstance(data, dict):
            moved = {"metrics": "data.metrics", "eval_split": "data.test_split", "val_split": "data.val_split"}
            found = [f"evaluate.{key} is now {moved[key]}" for key in moved if key in data]
            if found:
                raise ValueError("; ".join(found) + " (set per task)")
        return data


class ExperimentConfig(StrictModel):
    """The whole spine: SSL pre-training, embeddings, adapters, baselines, results and report."""

    name: str = "experiment"
    output_dir: Path = Path("runs/experiment")
    seed: int = 0
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    pretrain: PretrainConfig = PretrainConfig()
    embed: EmbedConfig = EmbedConfig()
    adapt: AdaptConfig = AdaptConfig()
    supervised_baseline: SupervisedBaselineConfig = SupervisedBaselineConfig()
    finetune: FineTuneConfig = FineTuneConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    random_init_baseline: bool = True


class TaskConfig(TaskSource):
    """One labelled task of a suite: a dataset, its splits and how it is scored."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="used in results, report and file names")


class EncoderConfig(StrictModel):
    """One encoder of a suite, from exactly one of: a checkpoint folder, a backbone name (random weights), a model
    section (random weights, as a recipe's ``model``), or a pre-training recipe (pre-trained once inside the suite's
    folder; ``untrained: true`` gives the recipe's model with its random initial weights, the fair baseline)."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
    checkpoint: Path | None = Field(
        None, description="a checkpoint folder, a public model from local weights (public:NAME:PATH) or 2.5d:FOLDER"
    )
    backbone: str | None = None
    model: ModelConfig | None = Field(None, description="a recipe's model section; random weights from `seed`")
    recipe: Path | None = Field(None, description="an ExperimentConfig YAML whose model and pretrain sections are used")
    untrained: bool = False
    overrides: list[str] = Field(default_factory=list, description="dotted recipe overrides, e.g. pretrain.epochs=10")
    pretrain_task: str | None = Field(
        None, description="pre-train on this task's train split (labels unused) instead of the recipe's data"
    )
    tasks: list[str] | None = Field(None, description="tasks this encoder runs on (default: all)")
    finetune: bool = Field(True, description="run the suite's fine-tuning modes on this encoder")
    in_chans: int = 3
    img_size: int | None = None
    pool: Literal["default", "token+avg"] | None = None
    seed: int = 0

    @property
    def random_weights(self) -> bool:
        """True when the encoder starts from random weights (a backbone name, a model section, or untrained)."""
        return self.untrained or self.backbone is not None or self.model is not None

    @model_validator(mode="after")
    def _one_source(self) -> EncoderConfig:
        given = [name for name in ("checkpoint", "backbone", "model", "recipe") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(
                f"encoder '{self.name}' needs exactly one of checkpoint, backbone, model, recipe (got {given})"
            )
        if (self.untrained or self.pretrain_task or self.overrides) and self.recipe is None:
            raise ValueError(f"encoder '{self.name}': untrained, overrides and pretrain_task go with a recipe")
        return self


class ComparisonConfig(StrictModel):
    """Which paired comparisons the suite computes (on each task's headline metric, per label fraction)."""

    baseline_encoder: str | None = Field(
        None, description="compare every other encoder with this one, adapter by adapter"
    )
    reference_adapter: str | None = Field("linear", description="compare every other adapter of an encoder with it")
    scratch_baseline: bool = Field(
        True, description="compare every encoder and adapter with the supervised-from-scratch baseline, if it runs"
    )
    n_bootstrap: int = Field(2000, ge=100)


class SuiteConfig(StrictModel):
    """Tasks x encoders x adapters x label fractions x seeds (``medfoundry eval suite.yaml``).

    ``adapt`` lists the probes on frozen embeddings and ``finetune.modes`` the end-to-end rungs; both run on the
    same label subsets, and so does ``supervised_baseline`` (a network trained from scratch) when given.
    ``evaluate`` gives the bootstrap settings; metrics and splits are set per task.
    """

    name: str = "suite"
    output_dir: Path = Path("runs/suite")
    tasks: list[TaskConfig] = Field(min_length=1)
    encoders: list[EncoderConfig] = Field(default_factory=list, description="none only for feature-file tasks")
    embed: EmbedConfig = EmbedConfig()
    adapt: AdaptConfig = AdaptConfig()
    finetune: FineTuneConfig = FineTuneConfig()
    finetune_label_fractions: list[float] | None = Field(
        None, description="fractions fine-tuning runs at (default: adapt.label_fractions); it is the slow rung"
    )
    supervised_baseline: SupervisedBaselineConfig | None = Field(
        None, description="train this network from scratch on every task's label subsets (off when absent)"
    )
    evaluate: EvaluateConfig = EvaluateConfig()
    comparisons: ComparisonConfig = ComparisonConfig()

    @model_validator(mode="after")
    def _consistent(self) -> SuiteConfig:
        tasks = [t.name for t in self.tasks]
        encoders = [e.name for e in self.encoders]
        for kind, names in (("task", tasks), ("encoder", encoders)):
            duplicated = sorted({n for n in names if names.count(n) > 1})
            if duplicated:
                raise ValueError(f"{kind} names must be unique; repeated: {duplicated}")
        for encoder in self.encoders:
            unknown = [t for t in (encoder.tasks or []) + ([encoder.pretrain_task] if encoder.pretrain_task else [])]
            unknown = [t for t in unknown if t not in tasks]
            if unknown:
                raise ValueError(f"encoder '{encoder.name}' names unknown task(s) {unknown}; tasks: {tasks}")
        baseline = self.comparisons.baseline_encoder
        if baseline is not None and baseline not in encoders:
            raise ValueError(f"comparisons.baseline_encoder '{baseline}' is not an encoder; encoders: {encoders}")
        extra = sorted(set(self.finetune_label_fractions or []) - set(self.adapt.label_fractions))
        if extra:
            raise ValueError(f"finetune_label_fractions {extra} are not among adapt.label_fractions")
        return self


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides; values are parsed as YAML (numbers, lists, booleans)."""
    for override in overrides:
        if "=" not in override:
            raise MedfoundryError(f"override '{override}' is not of the form key.path=value")
        key, raw = override.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise MedfoundryError(f"override '{override}': '{part}' is not a section")
        node[parts[-1]] = yaml.safe_load(raw)
    return data


def load_config(model: type[T], path: Path | None = None, overrides: list[str] | None = None) -> T:
    """Load a YAML recipe into ``model``, apply overrides, and validate with clear messages."""
    data: dict[str, Any] = {}
    if path is not None:
        # A relative configs/... path falls back to the recipes shipped in the package (an installed wheel).
        path = resolve_config_path(path)
        if not path.is_file():
            raise MedfoundryError("config file does not exist", path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise MedfoundryError(f"not valid YAML: {_yaml_problem(error)}", path) from None
        if not isinstance(data, dict):
            raise MedfoundryError("config must be a mapping of sections", path)
    data = apply_overrides(data, overrides or [])
    try:
        return model.model_validate(data)
    except ValidationError as error:
        problems = "; ".join(_problem(model, e) for e in error.errors())
        raise MedfoundryError(f"invalid config: {problems}", path) from None


def _yaml_problem(error: yaml.YAMLError) -> str:
    """One line for a YAML error (PyYAML's own message spans several lines and quotes the file)."""
    if isinstance(error, yaml.MarkedYAMLError):
        mark = error.problem_mark or error.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        what = error.problem or error.context or "cannot parse"
        return where + what
    return " ".join(str(error).split())


def _problem(model: type[BaseModel], error: Any) -> str:
    loc = [str(part) for part in error["loc"]]
    key = ".".join(loc)
    if error["type"] == "extra_forbidden":
        # Suggested among the section's own fields, then named in full: "pretrain.epoch" -> "pretrain.epochs".
        section = "".join(f"{part}." for part in loc[:-1])
        hint = did_you_mean(loc[-1], _fields_at(model, error["loc"][:-1]), prefix=section)
        return f"{key}: unknown key;{hint}" if hint else f"{key}: unknown key"
    # pydantic prefixes the message of a ValueError raised in a validator; the message says it all.
    return f"{key}: {error['msg'].removeprefix('Value error, ')}"


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The field names of the settings class at ``loc`` (list indices and dict keys passed through)."""
    current: Any = model
    for part in loc:
        if isinstance(current, type) and issubclass(current, BaseModel) and isinstance(part, str):
            if part not in current.model_fields:
                return []
            current = _settings_class(current.model_fields[part].annotation)
        elif current is None:
            return []
    return list(current.model_fields) if isinstance(current, type) and issubclass(current, BaseModel) else []


def _settings_class(annotation: Any) -> type[BaseModel] | None:
    """The BaseModel inside an annotation such as ``X``, ``X | None`` or ``list[X]``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType, list, tuple, dict):
        for arg in typing.get_args(annotation):
            found = _settings_class(arg)
            if found is not None:
                return found
    return None


def dump_config(config: BaseModel) -> dict[str, Any]:
    return config.model_dump(mode="json")
