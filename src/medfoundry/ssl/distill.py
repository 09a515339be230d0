"""Distillation: a student backbone learns a frozen teacher's features on unlabeled images.

One more SSL method on the shared trainer (views, budgets, bf16, resume, DDP and the health monitor come with it).
The student is the run's ``model``; the teacher is any encoder medfoundry loads (``distill.teacher`` in the
model-name grammar of ``models/names.py``: a checkpoint folder, a preset or timm name, ``public:NAME:PATH``). Three
losses, each with its weight:

* pooled regression: the student's pooled feature, through a linear projection to the teacher's width, regresses
  the teacher's pooled feature (smooth L1 against the layer-normalised target, so the teacher's scale does not set
  the loss scale);
* patch-token regression: the same per patch token, the teacher's patch grid resized to the student's when they
  differ (ViTs and CNN feature maps, 2D or 3D);
* prototype loss (DINO-style, as H0-mini and Virchow2G-mini distil): the student's DINO head matches the teacher's
  distribution over K prototypes, centred and sharpened as DINO's teacher (lightly's ``DINOLoss``). A medfoundry
  checkpoint folder keeps no SSL head and a public FM comes without one, so the teacher's prototypes are a fixed,
  seeded random projection of its (layer-normalised, L2-normalised) pooled feature onto K unit vectors: a random
  partition of the teacher's feature space that the student must reproduce.

The teacher stays outside the module tree (kept in a list): it is not in the state or the exported encoder, not
in the optimiser, not wrapped by DDP (each rank loads the same weights), and stays in eval mode without gradients.
"""

from __future__ import annotations

import copy
import logging
import warnings
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from lightly.loss import DINOLoss
from lightly.models.modules import DINOProjectionHead
from pydantic import Field
from torch import nn

from medfoundry.errors import ModelError
from medfoundry.models.backbones import Encoder
from medfoundry.models.checkpoint import load_encoder_or_build
from medfoundry.models.names import parse_model_name
from medfoundry.settings import StrictModel
from medfoundry.ssl.base import SSLMethod, StepOutput, StepValues, register_method

if TYPE_CHECKING:
    from medfoundry.config import PretrainConfig

log = logging.getLogger("medfoundry.pretrain")


class DistillConfig(StrictModel):
    """Distillation from a frozen teacher (docs/distillation.md)."""

    teacher: str | None = Field(
        None, description="the teacher: a checkpoint folder, a preset or timm name, or public:NAME:PATH"
    )
    teacher_img_size: int | None = Field(
        None, gt=0, description="the teacher's input size (views are resized to it); default: its own, else the view's"
    )
    pooled_weight: float = Field(1.0, ge=0, description="weight of the pooled-feature regression")
    patch_weight: float = Field(1.0, ge=0, description="weight of the patch-token regression")
    prototype_weight: float = Field(1.0, ge=0, description="weight of the DINO-style loss on the teacher's prototypes")
    n_prototypes: int = Field(1024, ge=2, description="K: prototypes of the teacher's fixed random projection")
    prototype_seed: int = Field(0, description="seed of the teacher's random prototypes")
    hidden_dim: int = 512
    bottleneck_dim: int = 128
    student_temp: float = 0.1
    # Cosine logits lie in [-1, 1]: a low temperature gives the teacher distributions that say something.
    teacher_temp: float = 0.04
    center_momentum: float = 0.9
    standardize_targets: bool = Field(
        True,
        description="standardise each teacher feature dimension by running mean and variance before the losses: "
        "a teacher whose features share a large common direction otherwise gives near-constant targets",
    )
    target_momentum: float = Field(0.99, ge=0, lt=1, description="momentum of the running target statistics")


def _norm(features: torch.Tensor) -> torch.Tensor:
    """Layer norm without parameters: the regression target of one teacher feature or token."""
    return F.layer_norm(features.float(), features.shape[-1:])


def features_and_grid(backbone: nn.Module, x: torch.Tensor, pool: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The pooled feature under ``pool`` (as ``models.backbones.pool_features``) and the patch-feature grid
    (B, D, h, w) or (B, D, d, h, w), from one forward pass; the grid is None for a backbone without timm's
    ``forward_features`` surface or with a token count that is not a square (cube)."""
    if not hasattr(backbone, "forward_features"):
        return backbone(x), None
    out = backbone.forward_features(x)
    spatial = x.ndim - 2
    if out.ndim == 3:  # ViT tokens: the prefix tokens (CLS, registers) first
        prefix = int(getattr(backbone, "num_prefix_tokens", 1))
        tokens = out[:, prefix:]
        if pool == "avg":
            pooled = tokens.mean(dim=1)
        elif pool == "token+avg":
            pooled = torch.cat([out[:, 0], tokens.mean(dim=1)], dim=1)
        else:
            pooled = backbone.forward_head(out, pre_logits=True) if hasattr(backbone, "forward_head") else backbone(x)
        side = round(tokens.shape[1] ** (1 / spatial))
        if side**spatial != tokens.shape[1]:
            return pooled, None
        grid = tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *([side] * spatial))
        return pooled, grid
    pooled = backbone.forward_head(out, pre_logits=True) if hasattr(backbone, "forward_head") else backbone(x)
    return pooled, out if out.ndim == x.ndim else None


def teacher_input(views: torch.Tensor, student: Encoder, teacher: Encoder, size: int | None) -> torch.Tensor:
    """The student's normalised views as the teacher's input: its channels, size and normalisation."""
    shape = (1, -1) + (1,) * (views.ndim - 2)
    images = views.float() * student.std.view(shape) + student.mean.view(shape)
    if images.shape[1] != teacher.in_chans:
        # Grey to RGB by repetition, RGB to grey by the mean: as the readers convert channels.
        images = images.mean(dim=1, keepdim=True) if teacher.in_chans == 1 else images[:, :1]
        images = images.expand(-1, teacher.in_chans, *images.shape[2:])
    spatial = images.ndim - 2
    if size is not None and tuple(images.shape[2:]) != (size,) * spatial:
        mode = "bilinear" if spatial == 2 else "trilinear"
        images = F.interpolate(images, size=(size,) * spatial, mode=mode, align_corners=False, antialias=spatial == 2)
    return teacher.normalize(images.clamp(0.0, 1.0))


def build_teacher(spec: str, student: Encoder, config: PretrainConfig) -> Encoder:
    """The frozen teacher ``spec`` names, in eval mode without gradients."""
    parsed = parse_model_name(spec)
    if not parsed.loads_weights:
        log.warning("distillation teacher '%s' has random weights: it teaches nothing (fine for a smoke test)", spec)
    teacher = load_encoder_or_build(spec, in_chans=student.in_chans, img_size=student.img_size, seed=config.seed)
    if teacher.is_3d != student.is_3d:
        kinds = {True: "volumes", False: "2D images"}
        raise ModelError(
            f"distill.teacher '{parsed.name}' takes {kinds[teacher.is_3d]} and the student {student.timm_name} takes "
            f"{kinds[student.is_3d]}: give a teacher and a student of the same kind"
        )
    teacher.eval()
    for param in teacher.parameters():
        param.requires_grad_(False)
    return teacher


def random_prototypes(width: int, count: int, seed: int) -> torch.Tensor:
    """K unit vectors in the teacher's feature space, the same for every run with the same seed."""
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(count, width, generator=generator), dim=1)


@register_method("distill")
class Distill(SSLMethod):
    # The student copies the teacher's features, whose spread is the teacher's: a low spread is not a collapse
    # of this run (the effective rank is still checked), and there is no trainable teacher to judge.
    spread_signals_collapse = False

    def __init__(self, encoder: Encoder, config: PretrainConfig) -> None:
        super().__init__()
        cfg = config.distill
        if not cfg.teacher:
            raise ModelError(
                "distillation needs a teacher: pretrain.distill.teacher=FOLDER|NAME|public:NAME:PATH "
                "(or medfoundry distill --teacher ...)"
            )
        if cfg.pooled_weight + cfg.patch_weight + cfg.prototype_weight <= 0:
            raise ModelError("distill: every loss weight is 0; give pooled_weight, patch_weight or prototype_weight")
        self.cfg = cfg
        # Kept in lists so nn.Module registers neither the template twice nor the teacher at all (see the docstring).
        self._template = [encoder]
        self._teacher = [build_teacher(cfg.teacher, encoder, config)]
        self.teacher_spec = cfg.teacher
        teacher = self._teacher[0]
        self.teacher_size = cfg.teacher_img_size or teacher.img_size
        self.student = encoder.backbone
        self.pool = encoder.pool
        student_width, teacher_width = encoder.embed_dim, teacher.embed_dim
        token_student, token_teacher = int(encoder.backbone.num_features), int(teacher.backbone.num_features)
        # Projections on the student side, as in FitNets: identity when the widths agree. A loss of weight 0 gets
        # no module: under DDP every trainable parameter must take part in every step.
        self.pooled_projection = self._projection(student_width, teacher_width) if cfg.pooled_weight > 0 else None
        self.patch_projection = self._projection(token_student, token_teacher) if cfg.patch_weight > 0 else None
        self.student_head: nn.Module | None = None
        if cfg.prototype_weight > 0:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # lightly's head uses torch's older weight_norm
                self.student_head = DINOProjectionHead(
                    student_width, cfg.hidden_dim, cfg.bottleneck_dim, cfg.n_prototypes, freeze_last_layer=-1
                )
        self.register_buffer("prototypes", random_prototypes(teacher_width, cfg.n_prototypes, cfg.prototype_seed))
        # Running statistics of the teacher's targets (buffers: in the resumable state, so a resume is exact).
        self.register_buffer("pooled_stats", torch.stack([torch.zeros(teacher_width), torch.ones(teacher_width)]))
        self.register_buffer("token_stats", torch.stack([torch.zeros(token_teacher), torch.ones(token_teacher)]))
        self.register_buffer("stats_steps", torch.zeros((), dtype=torch.long))
        self.prototype_loss = DINOLoss(
            output_dim=cfg.n_prototypes,
            warmup_teacher_temp=cfg.teacher_temp,
            teacher_temp=cfg.teacher_temp,
            warmup_teacher_temp_epochs=0,
            student_temp=cfg.student_temp,
            center_momentum=cfg.center_momentum,
        )
        self._patch_warned = False

    @staticmethod
    def _projection(width: int, target: int) -> nn.Module:
        return nn.Identity() if width == target else nn.Linear(width, target)

    @property
    def teacher(self) -> Encoder:
        return self._teacher[0]

    def trainable_modules(self) -> list[nn.Module]:
        heads = (self.pooled_projection, self.patch_projection, self.student_head)
        return [self.student, *(head for head in heads if head is not None)]

    def _teacher_outputs(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        teacher = self.teacher
        if teacher.mean.device != batch.device:
            teacher.to(batch.device)  # outside the module tree, so .to() on the method does not move it
        with torch.no_grad():
            x = teacher_input(batch, self._template[0], teacher, self.teacher_size)
            pooled, grid = features_and_grid(teacher.backbone, x, teacher.pool)
        return pooled.float(), None if grid is None else grid.float()

    def _target(self, features: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
        """The regression target of teacher features (N, D): standardised per dimension by running statistics
        (``standardize_targets``), else layer-normalised per feature.

        A teacher's features often share one large common direction (a pre-trained ViT's pooled features have
        cosine similarities near 1 across images): layer-normalised, they are targets a student matches with one
        constant vector (cosine 0.999 after a few steps while learning nothing of what tells images apart), and their
        prototype distributions are uniform. Standardising each dimension over the data removes the common part, as
        AM-RADIO's PHI-S does for its teachers (here without the rotation: a diagonal scale is enough for one
        teacher)."""
        if not self.cfg.standardize_targets:
            return _norm(features)
        flat = features.float()
        if self.training:
            mean, var = flat.mean(0), flat.var(0, unbiased=False)
            if int(self.stats_steps) == 0:
                stats.copy_(torch.stack([mean, var]))
            else:
                stats.lerp_(torch.stack([mean, var]), 1.0 - self.cfg.target_momentum)
        return (flat - stats[0]) / torch.sqrt(stats[1] + 1e-6)

    def _patch_loss(self, student_grid: torch.Tensor | None, teacher_grid: torch.Tensor | None) -> torch.Tensor | None:
        assert self.patch_projection is not None
        if student_grid is None or teacher_grid is None:
            if not self._patch_warned:
                log.warning("distill: no patch grid from the student or the teacher; the patch-token loss is skipped")
                self._patch_warned = True
            return None
        if teacher_grid.shape[2:] != student_grid.shape[2:]:
            mode = "bilinear" if student_grid.ndim == 4 else "trilinear"
            teacher_grid = F.interpolate(teacher_grid, size=student_grid.shape[2:], mode=mode, align_corners=False)
        # (B, D, *grid) -> (B, tokens, D): the projection and the target's norm act on each token's features.
        student_tokens = self.patch_projection(student_grid.flatten(2).transpose(1, 2))
        tokens = teacher_grid.flatten(2).transpose(1, 2)
        target = self._target(tokens.reshape(-1, tokens.shape[-1]), self.token_stats).reshape(tokens.shape)
        return F.smooth_l1_loss(student_tokens.float(), target)

    def training_step(self, views: list[torch.Tensor], values: StepValues) -> StepOutput:
        pair = views[:2]
        batch = torch.cat(pair)
        teacher_pooled, teacher_grid = self._teacher_outputs(batch)
        student_pooled, student_grid = features_and_grid(self.student, batch, self.pool)
        zero = torch.zeros((), device=batch.device)
        logs: dict[str, float] = {}
        # The losses in fp32: under bf16 autocast, low-temperature softmaxes and small residuals lose precision.
        with torch.autocast(batch.device.type, enabled=False):
            loss = zero
            target = self._target(teacher_pooled, self.pooled_stats)
            if self.pooled_projection is not None:
                projected = self.pooled_projection(student_pooled.float())
                pooled_loss = F.smooth_l1_loss(projected, target)
                loss = loss + self.cfg.pooled_weight * pooled_loss
                logs["pooled_loss"] = float(pooled_loss.detach())
                logs["pooled_cosine"] = float(F.cosine_similarity(projected, target, dim=1).mean().detach())
            if self.patch_projection is not None:
                patch_loss = self._patch_loss(student_grid, teacher_grid)
                if patch_loss is not None:
                    loss = loss + self.cfg.patch_weight * patch_loss
                    logs["patch_loss"] = float(patch_loss.detach())
                else:
                    # No grid: the projection still takes part (with a zero gradient), as DDP requires.
                    loss = loss + sum(param.sum() * 0.0 for param in self.patch_projection.parameters())
            if self.student_head is not None:
                teacher_logits = F.normalize(target, dim=1) @ self.prototypes.float().T
                student_logits = self.student_head(student_pooled.float())
                prototype_loss = self.prototype_loss(
                    list(teacher_logits.chunk(len(pair))),
                    list(student_logits.chunk(len(pair))),
                    teacher_temp=values.teacher_temp,
                )
                loss = loss + self.cfg.prototype_weight * prototype_loss
                logs["prototype_loss"] = float(prototype_loss.detach())
        if self.training:
            self.stats_steps += 1
        return StepOutput(
            loss=loss,
            logs={"loss": float(loss.detach()), **logs},
            monitor_features=student_pooled.chunk(len(pair))[0].detach(),
            monitor_extra={},
        )

    def checkpoint_extra(self) -> dict[str, Any]:
        """What the checkpoint records of the teacher: its name, never a private path (the trainer's hook).

        ``settings`` replaces this method's section of the recorded pre-training config.
        """
        from medfoundry.ssl.trainer import init_name

        name = init_name(self.teacher_spec)
        return {"settings": {"distill": {**self.cfg.model_dump(mode="json"), "teacher": name}}, "distilled_from": name}

    def fingerprint_inputs(self) -> dict[str, Any]:
        """The teacher's weights (the trainer's hook): resuming with another teacher file is refused, not mixed."""
        from medfoundry.models.checkpoint import weights_hash

        return {"teacher_weights": weights_hash(self.teacher.backbone)}

    def export_encoder(self) -> Encoder:
        # The student alone; the projections and the head are dropped, the teacher was never part of it.
        return copy.deepcopy(self._template[0])
