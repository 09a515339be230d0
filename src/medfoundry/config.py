"""Typed configs (pydantic), loadable from YAML, with dotted overrides from the command line.

A recipe is a YAML file whose keys mirror these models; ``pretrain.epochs=40`` on the command line
overrides one value. Unknown keys are errors, so a typo never silently falls back to a default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from medfoundry.errors import MedfoundryError

T = TypeVar("T", bound=BaseModel)


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PretrainSourceConfig(StrictModel):
    """One unlabeled source in a pre-training mixture."""

    source: str = Field(description="dataset spec: file.npz, folder, slide.svs, or prefix:path")
    split: str = "train"
    weight: float = Field(1.0, gt=0, description="share of each epoch's draws, relative to the other sources")
    options: dict[str, Any] = Field(default_factory=dict, description="reader arguments, e.g. {tile_size: 224}")


class DataConfig(StrictModel):
    """Where images come from (see ``medfoundry.data.registry``)."""

    source: str = Field("data/breastmnist/breastmnist.npz", description="npz / csv / folder, or prefix:path")
    task: str = Field("breastmnist", description="name used in results and report")
    pretrain_split: str = Field("train", description="split whose images (not labels) are used for SSL")
    pretrain_sources: list[PretrainSourceConfig] = Field(
        default_factory=list,
        description="pre-train on these sources mixed by weight instead of source/pretrain_split",
    )


class ModelConfig(StrictModel):
    backbone: str = "vit_tiny_28"
    img_size: int = 28
    in_chans: int = 1
    mean: list[float] | None = None
    std: list[float] | None = None
    pool: Literal["default", "token+avg"] = "default"


class ViewsConfig(StrictModel):
    """Multi-crop views (lightly's DINOTransform). Defaults suit 1-channel 28 px ultrasound.

    Two-view methods (SimCLR, MoCo v3, BYOL) use the global-crop fields only; the local-crop fields are DINO's.
    MAE uses one view: a global crop (size and scale) with horizontal flip, nothing else.

    Crop scales are larger than DINO's ImageNet defaults: at 28 px a crop of a fifth of the image keeps too
    few pixels. On BreastMNIST, global 0.5-1 / local 0.2-0.5 beat 0.3-1 / 0.1-0.4 slightly at equal budget.
    """

    global_crop_size: int = 28
    global_crop_scale: tuple[float, float] = (0.5, 1.0)
    local_crop_size: int = 16
    local_crop_scale: tuple[float, float] = (0.2, 0.5)
    n_local_views: int = 4
    hflip_prob: float = 0.5
    vflip_prob: float = 0.0
    rotation_degrees: float = 10.0
    rotation_prob: float = 0.5
    color_jitter_prob: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.0
    hue: float = 0.0
    blur_prob: float = 0.2
    blur_sigmas: tuple[float, float] = (0.1, 1.0)
    solarization_prob: float = 0.0
    # Domain presets (medfoundry.transforms.presets, docs/views.md) fill in the fields not set explicitly.
    # Frozen: the preset is applied when the config is built, so a later assignment could not re-apply it.
    domain: Literal["natural", "pathology", "radiology", "ophthalmology", "oct"] = Field(
        "natural", frozen=True, description="view preset; 'natural' keeps the views above unchanged"
    )
    rot90_prob: float = Field(0.0, ge=0.0, le=1.0, description="90-degree rotation; with both flips at 0.5, all 8")
    hed_scale: float = Field(0.0, ge=0.0, description="H&E stain density scale jitter: alpha ~ U(1-s, 1+s)")
    hed_shift: float = Field(0.0, ge=0.0, description="H&E stain density shift jitter: beta ~ U(-s, s)")
    window_level_shift: float = Field(0.0, ge=0.0, description="grey window centre shift, a fraction of the range")
    window_width_range: tuple[float, float] = Field((1.0, 1.0), description="grey window width factor range")
    gamma_range: tuple[float, float] = Field((1.0, 1.0), description="gamma range, drawn log-uniformly")
    affine_translate: float = Field(0.0, ge=0.0, le=1.0, description="random shift, a fraction of the crop size")
    affine_scale: tuple[float, float] = Field((1.0, 1.0), description="random zoom range after the crop")
    fov_mask: bool = Field(False, description="keep the circular field of view of fundus photos (black outside)")
    speckle_sigma: float = Field(
        0.0, ge=0.0, le=1.0, description="multiplicative speckle noise (OCT): x * (1 + s * N(0, 1)), s ~ U(0, sigma)"
    )

    @model_validator(mode="before")
    @classmethod
    def _fill_domain_preset(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("domain", "natural") == "natural":
            return data
        from medfoundry.transforms.presets import DOMAIN_PRESETS  # here: keeps the config's imports light

        # An unknown domain is left to the field's own validation, which names the choices.
        return {**DOMAIN_PRESETS.get(data["domain"], {}), **data}

    @model_validator(mode="after")
    def _check_ranges(self) -> ViewsConfig:
        for name in ("window_width_range", "gamma_range", "affine_scale"):
            low, high = getattr(self, name)
            if not 0 < low <= high:
                raise ValueError(f"{name} must be (low, high) with 0 < low <= high, got ({low}, {high})")
        return self


class DinoConfig(StrictModel):
    """DINO with DINOv2's guards against collapse (Sinkhorn-Knopp targets and KoLeo)."""

    out_dim: int = 1024
    hidden_dim: int = 512
    bottleneck_dim: int = 128
    teacher_targets: Literal["sinkhorn", "centering"] = "sinkhorn"
    sinkhorn_iterations: int = 3
    koleo_weight: float = 0.1
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 5
    momentum_start: float = 0.99
    momentum_end: float = 1.0
    freeze_last_layer_epochs: int = 1


class IBOTConfig(DinoConfig):
    """iBOT / DINOv2-style: DINO on the CLS token plus masked-patch self-distillation (ViT only).

    The student sees block-masked global crops and predicts, at each masked position, the teacher's prototype
    distribution for the unmasked patch. Masking follows DINOv2 (a share of images masked, 10-50% of their
    patches in blocks); the patch prototypes go through the same head as the CLS token unless
    ``separate_patch_head`` (iBOT shares it, DINOv2 separates them).
    """

    patch_loss_weight: float = 1.0
    separate_patch_head: bool = False
    mask_sample_ratio: float = Field(0.5, ge=0.0, le=1.0, description="share of global crops that are masked")
    mask_ratio_min: float = Field(0.1, ge=0.0, lt=1.0)
    mask_ratio_max: float = Field(0.5, gt=0.0, lt=1.0)


class SimCLRConfig(StrictModel):
    """SimCLR: NT-Xent over two views with in-batch negatives.

    The CPU trial on BreastMNIST found temperature 0.2 with batch 64 and AdamW lr 1e-3 good.
    """

    temperature: float = 0.2
    hidden_dim: int = 512
    out_dim: int = 128
    num_layers: int = 2


class MoCoV3Config(StrictModel):
    """MoCo v3: query encoder with projection and prediction heads against an EMA key encoder."""

    temperature: float = 0.2
    hidden_dim: int = 512
    out_dim: int = 128
    projection_layers: int = 3
    prediction_hidden_dim: int = 512
    momentum_start: float = 0.99
    momentum_end: float = 1.0


class BYOLConfig(StrictModel):
    """BYOL: online encoder with projection and prediction heads regressing an EMA target."""

    hidden_dim: int = 512
    out_dim: int = 128
    prediction_hidden_dim: int = 512
    momentum_start: float = 0.99
    momentum_end: float = 1.0


class MAEConfig(StrictModel):
    """MAE (as in RETFound): a ViT encodes the kept patches of one view, a small decoder predicts the masked ones.

    Mask ratio and per-patch normalised targets as in MAE; the decoder is much smaller than MAE's (512 wide,
    8 blocks) so that 28 px images train on a CPU.
    """

    mask_ratio: float = Field(0.75, gt=0.0, lt=1.0)
    decoder_dim: int = 128
    decoder_depth: int = 2
    decoder_heads: int = 4
    norm_pix_loss: bool = True


class CLIPConfig(StrictModel):
    """CLIP-style image-text pre-training (medfoundry.vlm, docs/vision-language.md).

    ``data.source`` names image-text pairs (pairs.csv, pairs.json or vqa_rad:PATH); ``model`` is the image
    encoder. The text tower is a small BERT trained from scratch with a tokenizer trained on the training texts,
    or the Hugging Face checkpoint folder ``text_checkpoint`` (which must hold a tokenizer.json).
    """

    embed_dim: int = Field(128, ge=8, description="shared image-text embedding size")
    max_tokens: int = Field(128, ge=8, description="longer texts are truncated (and counted in a warning)")
    # BPE by default: WordPiece training in Hugging Face tokenizers is not deterministic (tokenizers issue #1794),
    # so two runs with the same seed would get different vocabularies.
    tokenizer: Literal["bpe", "wordpiece"] = "bpe"
    vocab_size: int = Field(4000, ge=100)
    min_frequency: int = Field(2, ge=1)
    text_checkpoint: Path | None = Field(None, description="local Hugging Face text model folder instead of scratch")
    text_width: int = 128
    text_layers: int = 2
    text_heads: int = 4
    text_dropout: float = Field(0.1, ge=0.0, lt=1.0)
    text_pooling: Literal["mean", "cls"] = "mean"
    init_temperature: float = Field(0.07, gt=0)
    max_logit_scale: float = Field(100.0, gt=1, description="CLIP clamps exp(logit_scale) at 100")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="held-out images (split by patient/image)")
    split_seed: int = 0
    crop_scale: tuple[float, float] = Field((0.7, 1.0), description="random resized crop area range")


class PretrainConfig(StrictModel):
    method: Literal["dino", "ibot", "simclr", "mocov3", "byol", "mae", "clip"] = "dino"
    epochs: int = 20
    batch_size: int = 64
    lr: float = 5e-4
    min_lr: float = 1e-6
    warmup_epochs: int = 2
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
    clip: CLIPConfig = CLIPConfig()


class EmbedConfig(StrictModel):
    batch_size: int = 128
    num_workers: int = 0


class AdaptConfig(StrictModel):
    adapters: list[Literal["linear", "knn", "fewshot", "mlp"]] = ["linear", "knn"]
    label_fractions: list[float] = [0.01, 0.1, 1.0]
    seeds: list[int] = [0, 1, 2]
    min_per_class: int = 2
    knn_k: int = 20
    knn_temperature: float = 0.07
    linear_c_grid: list[float] = Field(default_factory=lambda: [10.0**e for e in range(-4, 5)])
    fewshot_temperature: float = Field(0.1, gt=0, description="softmax temperature on squared CL2N distances")
    mlp_hidden_dim: int = Field(256, ge=1)
    mlp_alpha_grid: list[float] = Field(default_factory=lambda: [1e-4, 1e-2, 1.0, 10.0], description="L2 strengths")
    mlp_max_iter: int = Field(200, ge=1, description="L-BFGS iterations per fit")


class SupervisedBaselineConfig(StrictModel):
    """A network trained from scratch on the same labelled subset (the bar SSL must clear)."""

    enabled: bool = True
    backbone: str = "resnet18"
    max_steps: int = 200
    eval_every_steps: int = 20
    patience_evals: int = 4
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4


class FineTuneConfig(StrictModel):
    """End-to-end adaptation of the pre-trained encoder on the same label subsets (off by default: it is the slow
    rung of the ladder). ``full`` trains everything with layer-wise LR decay, ``lora`` only low-rank qkv updates."""

    modes: list[Literal["full", "lora"]] = Field(default_factory=list)
    lr: float = 1e-3
    layer_decay: float = 0.75
    weight_decay: float = 0.05
    max_steps: int = 200
    eval_every_steps: int = 20
    patience_evals: int = 4
    batch_size: int = 64
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0


class EvaluateConfig(StrictModel):
    metrics: list[str] = ["auroc", "accuracy", "balanced_accuracy"]
    n_bootstrap: int = 1000
    confidence: float = 0.95
    eval_split: str = "test"
    val_split: str = "val"


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


TaskKind = Literal["binary", "multiclass", "ordinal", "multilabel"]
# Defaults per task kind: the first metric is the headline one (ordinal grades are judged by quadratic kappa, as in
# the DR-grading literature); ECE is last because it says how far to trust the probabilities, not how good they rank.
KIND_METRICS: dict[str, list[str]] = {
    "binary": ["auroc", "balanced_accuracy", "f1", "ece"],
    "multiclass": ["auroc", "balanced_accuracy", "accuracy", "f1", "ece"],
    "ordinal": ["kappa", "balanced_accuracy", "auroc", "ece"],
    # Per-label AUROC averaged over labels: the metrics that pick one class per case do not apply.
    "multilabel": ["auroc"],
}


class SuiteTaskConfig(StrictModel):
    """One labelled task of a suite: a dataset, its splits and how it is scored."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="used in results, report and file names")
    source: str = Field(description="dataset spec: file.npz, folder, csv:..., idrid:..., or prefix:path")
    options: dict[str, Any] = Field(default_factory=dict, description="reader arguments, e.g. {image_size: 64}")
    kind: TaskKind | None = Field(
        None, description="binary / multiclass / ordinal / multilabel; inferred from the labels if unset"
    )
    metrics: list[str] | None = Field(None, description="default by kind; the first is the headline metric")
    val_split: str = "val"
    test_split: str = "test"
    val_fraction: float = Field(0.2, gt=0, lt=1, description="carved from train, by patient, when there is no val")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="carved from train, by patient, when there is no test")
    split_seed: int = 0


class SuiteEncoderConfig(StrictModel):
    """One encoder of a suite, from exactly one of: a checkpoint folder, a backbone name (random weights), or a
    pre-training recipe (pre-trained once inside the suite's folder; ``untrained: true`` gives the recipe's model
    with its random initial weights, the fair baseline for it)."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
    checkpoint: Path | None = Field(
        None, description="a checkpoint folder, a public model from local weights (public:NAME:PATH) or 2.5d:FOLDER"
    )
    backbone: str | None = None
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

    @model_validator(mode="after")
    def _one_source(self) -> SuiteEncoderConfig:
        given = [name for name in ("checkpoint", "backbone", "recipe") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"encoder '{self.name}' needs exactly one of checkpoint, backbone, recipe (got {given})")
        if (self.untrained or self.pretrain_task or self.overrides) and self.recipe is None:
            raise ValueError(f"encoder '{self.name}': untrained, overrides and pretrain_task go with a recipe")
        return self


class SuiteComparisonConfig(StrictModel):
    """Which paired comparisons the suite computes (on each task's headline metric, per label fraction)."""

    baseline_encoder: str | None = Field(
        None, description="compare every other encoder with this one, adapter by adapter"
    )
    reference_adapter: str | None = Field("linear", description="compare every other adapter of an encoder with it")
    n_bootstrap: int = Field(2000, ge=100)


class SuiteConfig(StrictModel):
    """Tasks x encoders x adapters x label fractions x seeds (``medfoundry eval suite.yaml``).

    ``adapt`` lists the probes on frozen embeddings and ``finetune.modes`` the end-to-end rungs; both run on the
    same label subsets. ``evaluate`` gives the bootstrap settings; metrics and splits are set per task.
    """

    name: str = "suite"
    output_dir: Path = Path("runs/suite")
    tasks: list[SuiteTaskConfig] = Field(min_length=1)
    encoders: list[SuiteEncoderConfig] = Field(min_length=1)
    embed: EmbedConfig = EmbedConfig()
    adapt: AdaptConfig = AdaptConfig()
    finetune: FineTuneConfig = FineTuneConfig()
    finetune_label_fractions: list[float] | None = Field(
        None, description="fractions fine-tuning runs at (default: adapt.label_fractions); it is the slow rung"
    )
    evaluate: EvaluateConfig = EvaluateConfig()
    comparisons: SuiteComparisonConfig = SuiteComparisonConfig()

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
        path = Path(path)
        if not path.is_file():
            raise MedfoundryError("config file does not exist", path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise MedfoundryError(f"not valid YAML: {error}", path) from None
        if not isinstance(data, dict):
            raise MedfoundryError("config must be a mapping of sections", path)
    data = apply_overrides(data, overrides or [])
    try:
        return model.model_validate(data)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors())
        raise MedfoundryError(f"invalid config: {problems}", path) from None


def dump_config(config: BaseModel) -> dict[str, Any]:
    return config.model_dump(mode="json")
