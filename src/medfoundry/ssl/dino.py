"""DINO over lightly's parts, with DINOv2's guards against collapse.

lightly provides the projection head, the centring loss, the Sinkhorn-Knopp normaliser (from MSN), KoLeo
and the EMA update. lightly's DINOLoss only centres the teacher, and on BreastMNIST centring alone
collapsed (shared/reference/cpu-ssl-trial.md), so for Sinkhorn targets the cross-entropy is written here.
"""

from __future__ import annotations

import copy
import warnings
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from lightly.loss import DINOLoss, KoLeoLoss
from lightly.loss.msn_loss import sinkhorn
from lightly.models.modules import DINOProjectionHead
from lightly.models.utils import deactivate_requires_grad
from lightly.transforms.multi_view_transform import MultiViewTransform
from lightly.utils import dist as lightly_dist
from pydantic import Field, model_validator
from torch import nn

from medfoundry.errors import ModelError
from medfoundry.models.backbones import Encoder
from medfoundry.settings import StrictModel
from medfoundry.ssl.base import SSLMethod, StepOutput, StepValues, register_method
from medfoundry.ssl.ema import frozen_copy, update_teachers
from medfoundry.ssl.monitor import teacher_readings
from medfoundry.ssl.views import build_dino_views

if TYPE_CHECKING:
    from medfoundry.config import PretrainConfig


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
    # Shares of the run (any budget). At the former default of 20 epochs they equal the former 5 and 1 epochs.
    warmup_teacher_temp_fraction: float = Field(
        0.25, ge=0, le=1, description="share of the run over which the teacher temperature rises to teacher_temp"
    )
    freeze_last_layer_fraction: float = Field(
        0.05, ge=0, le=1, description="share of the run at the start during which the heads' last layer stays fixed"
    )
    warmup_teacher_temp_epochs: int | None = Field(
        None, ge=0, description="older recipes: the warm-up in whole epochs; now warmup_teacher_temp_fraction"
    )
    freeze_last_layer_epochs: int | None = Field(
        None, ge=0, description="older recipes: the freeze in whole epochs; now freeze_last_layer_fraction"
    )
    momentum_start: float = 0.99
    momentum_end: float = 1.0

    @model_validator(mode="after")
    def _one_way_per_warmup(self) -> DinoConfig:
        for old, new in (
            ("warmup_teacher_temp_epochs", "warmup_teacher_temp_fraction"),
            ("freeze_last_layer_epochs", "freeze_last_layer_fraction"),
        ):
            if getattr(self, old) is not None and new in self.model_fields_set:
                raise ValueError(f"{old} is now {new} (a share of the run); give only {new}")
        return self


def cross_view_cross_entropy(
    teacher_probs: list[torch.Tensor], student_logits: list[torch.Tensor], student_temp: float
) -> torch.Tensor:
    """Mean cross-entropy between each teacher view and every student view except the same view."""
    total, terms = torch.zeros((), device=student_logits[0].device), 0
    log_probs = [F.log_softmax(s.float() / student_temp, dim=-1) for s in student_logits]
    for t_index, target in enumerate(teacher_probs):
        for s_index, log_prob in enumerate(log_probs):
            if s_index == t_index:
                continue
            total = total - (target * log_prob).sum(dim=-1).mean()
            terms += 1
    return total / terms


def build_dino_head(width: int, cfg: DinoConfig) -> DINOProjectionHead:
    # lightly's head uses torch's older weight_norm, which warns on every construction.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        # The freeze is scheduled in steps (StepValues.freeze_last_layer, see cancel_last_layer_gradients below).
        return DINOProjectionHead(width, cfg.hidden_dim, cfg.bottleneck_dim, cfg.out_dim, freeze_last_layer=-1)


def cancel_last_layer_gradients(head: DINOProjectionHead | None, values: StepValues) -> None:
    """Keep the head's last layer fixed while the schedule says so: as DINO's freeze, counted in steps."""
    if head is not None and values.freeze_last_layer:
        for param in head.last_layer.parameters():
            param.grad = None


def twin_head(head: DINOProjectionHead, width: int, cfg: DinoConfig) -> DINOProjectionHead:
    """A frozen copy of a DINO head for the teacher.

    weight_norm heads cannot be deep-copied (torch #103001): build a twin and copy its weights.
    """
    twin = build_dino_head(width, cfg)
    twin.load_state_dict(head.state_dict())
    deactivate_requires_grad(twin)
    return twin


def sinkhorn_targets(
    teacher_logits: torch.Tensor, teacher_temp: float, iterations: int, gather_distributed: bool = False
) -> torch.Tensor:
    """DINOv2's teacher targets: Sinkhorn-Knopp-balanced softmax over the batch (lightly's MSN sinkhorn).

    With ``gather_distributed`` the prototype sums run over all ranks, so the balance is over the global batch.
    lightly scales each rank's targets by the rank's own count, which is exact only when every rank holds
    equally many rows (one per image and view, as here).
    """
    probs = F.softmax(teacher_logits.float() / teacher_temp, dim=-1)
    return sinkhorn(probs, iterations=iterations, gather_distributed=gather_distributed)


class BatchKoLeo(nn.Module):
    """lightly's KoLeo, over the global batch when ``gather_distributed`` is on (prepare_for_ddp does so).

    Each rank then computes KoLeo of all ranks' features: every sample's nearest neighbour is sought in the global
    batch, as one process would. The gather's backward sums the ranks' gradients and DDP averages them, so the
    gradient is that of the one global value. (DINOv2 computes KoLeo per GPU; here the global batch decides.)
    """

    def __init__(self) -> None:
        super().__init__()
        self.koleo = KoLeoLoss()
        self.gather_distributed = False

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.gather_distributed and lightly_dist.world_size() > 1:
            features = torch.cat(lightly_dist.gather(features))
        return self.koleo(features)


@register_method("dino")
class DINO(SSLMethod):
    def __init__(self, encoder: Encoder, config: PretrainConfig) -> None:
        super().__init__()
        cfg = config.dino
        if encoder.is_3d:
            raise ModelError(
                f"DINO's multi-crop views are 2D; {encoder.timm_name} takes volumes. Use simclr, mocov3, byol or "
                "mae for 3D encoders."
            )
        self.cfg = cfg
        # Kept in a list so nn.Module does not register the backbone twice in the state dict.
        self._template = [encoder]
        self.student = encoder.backbone
        width = int(encoder.backbone.num_features)
        self.student_head = build_dino_head(width, cfg)
        self.teacher = frozen_copy(self.student)
        self.teacher_head = twin_head(self.student_head, width, cfg)
        self.centering_loss = (
            DINOLoss(output_dim=cfg.out_dim, student_temp=cfg.student_temp)
            if cfg.teacher_targets == "centering"
            else None
        )
        self.koleo = BatchKoLeo()
        # Switched on under DDP by prepare_for_ddp: Sinkhorn-Knopp balances the targets over the global batch.
        # (The centring loss needs nothing: lightly averages the batch centre over the ranks.)
        self.gather_distributed = False

    def build_views(self, encoder: Encoder, config: PretrainConfig) -> MultiViewTransform:
        mean, std = encoder.mean.flatten().tolist(), encoder.std.flatten().tolist()
        return build_dino_views(config.views, encoder.in_chans, mean, std)

    def trainable_modules(self) -> list[nn.Module]:
        return [self.student, self.student_head]

    def _forward_views(self, backbone: nn.Module, views: list[torch.Tensor]) -> list[torch.Tensor]:
        # Views of equal size go through the backbone in one batch: fewer, larger matmuls on CPU.
        outputs: list[torch.Tensor] = []
        start = 0
        while start < len(views):
            end = start
            while end < len(views) and views[end].shape == views[start].shape:
                end += 1
            features = backbone(torch.cat(views[start:end]))
            outputs.extend(features.chunk(end - start))
            start = end
        return outputs

    def training_step(self, views: list[torch.Tensor], values: StepValues) -> StepOutput:
        global_views = views[:2]
        with torch.no_grad():
            teacher_logits = [self.teacher_head(f) for f in self._forward_views(self.teacher, global_views)]
        student_features = self._forward_views(self.student, views)
        student_logits = [self.student_head(f) for f in student_features]

        if self.centering_loss is not None:
            dino_loss = self.centering_loss(teacher_logits, student_logits, teacher_temp=values.teacher_temp)
        else:
            targets = sinkhorn_targets(
                torch.cat(teacher_logits), values.teacher_temp, self.cfg.sinkhorn_iterations, self.gather_distributed
            )
            dino_loss = cross_view_cross_entropy(
                list(targets.chunk(len(global_views))), student_logits, self.cfg.student_temp
            )

        koleo = sum(self.koleo(f.float()) for f in student_features[: len(global_views)]) / len(global_views)
        loss = dino_loss + self.cfg.koleo_weight * koleo
        return StepOutput(
            loss=loss,
            logs={
                "loss": float(loss.detach()),
                "dino_loss": float(dino_loss.detach()),
                "koleo": float(koleo.detach()),
            },
            monitor_features=student_features[0].detach(),
            monitor_extra=teacher_readings(torch.cat(teacher_logits), values.teacher_temp),
        )

    def before_optimizer_step(self, values: StepValues) -> None:
        cancel_last_layer_gradients(self.student_head, values)

    def after_optimizer_step(self, values: StepValues) -> None:
        update_teachers([(self.student, self.teacher), (self.student_head, self.teacher_head)], values.momentum)

    def export_encoder(self) -> Encoder:
        # DINO evaluates the teacher: the EMA of the student is the better encoder.
        encoder = copy.deepcopy(self._template[0])
        encoder.backbone.load_state_dict(self.teacher.state_dict())
        return encoder
