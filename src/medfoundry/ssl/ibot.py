"""iBOT / DINOv2-style pre-training: DINO on the CLS token plus masked-patch self-distillation (ViT only).

lightly provides the masked ViT wrapper (mask tokens in place of masked patches), DINOv2's block masking, the
DINO head, the iBOT patch loss for centred targets, KoLeo and the EMA update. With Sinkhorn-Knopp targets (the
default, as in DINOv2, because centring alone collapsed on BreastMNIST) lightly's IBOTPatchLoss cannot be used,
since it centres the teacher itself, so the per-image weighted cross-entropy is written here.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightly.loss import DINOLoss, IBOTPatchLoss
from lightly.models import utils
from lightly.models.modules import MaskedVisionTransformerTIMM
from lightly.models.modules.center import center_momentum
from lightly.transforms.multi_view_transform import MultiViewTransform
from lightly.utils import dist as lightly_dist
from pydantic import Field
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from medfoundry.distributed import rank_rows
from medfoundry.errors import ModelError
from medfoundry.models.backbones import Encoder
from medfoundry.ssl.base import SSLMethod, StepOutput, StepValues, register_method
from medfoundry.ssl.dino import (
    BatchKoLeo,
    DinoConfig,
    build_dino_head,
    cancel_last_layer_gradients,
    cross_view_cross_entropy,
    sinkhorn_targets,
    twin_head,
)
from medfoundry.ssl.ema import update_teachers
from medfoundry.ssl.monitor import prediction_entropy, teacher_readings
from medfoundry.ssl.views import build_dino_views, seeded_rng

if TYPE_CHECKING:
    from medfoundry.config import PretrainConfig


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


def masked_patch_cross_entropy(
    teacher_probs: torch.Tensor, student_logits: torch.Tensor, mask: torch.Tensor, student_temp: float
) -> torch.Tensor:
    """iBOT's patch loss for given targets: cross-entropy per masked patch, averaged per image, then over images.

    ``teacher_probs`` and ``student_logits`` hold the masked patches only, in ``mask``'s (row-major) order.
    Images without masked patches count as zero, as in DINOv2 and lightly's IBOTPatchLoss.
    """
    per_patch = -(teacher_probs * F.log_softmax(student_logits.float() / student_temp, dim=-1)).sum(dim=-1)
    masked_per_image = mask.flatten(1).sum(dim=1, keepdim=True).clamp(min=1)
    weights = (1.0 / masked_per_image).expand_as(mask.flatten(1))[mask.flatten(1)]
    return (per_patch * weights).sum() / mask.shape[0]


def patch_sinkhorn_targets(
    teacher_logits: torch.Tensor, teacher_temp: float, iterations: int, gather_distributed: bool = False
) -> torch.Tensor:
    """Sinkhorn-Knopp targets for the masked patches, balanced over all ranks' patches when ``gather_distributed``.

    On one process this is lightly's sinkhorn (:func:`sinkhorn_targets`). Across ranks it is written here because
    lightly's scales each rank's targets by the rank's own count, and the ranks hold different numbers of masked
    patches: as in DINOv2's SinkhornKnopp, the count is summed over the ranks. The operations are lightly's.
    """
    if not (gather_distributed and lightly_dist.world_size() > 1):
        return sinkhorn_targets(teacher_logits, teacher_temp, iterations)
    if iterations <= 0:
        return F.softmax(teacher_logits.float() / teacher_temp, dim=-1)
    probs = F.softmax(teacher_logits.float() / teacher_temp, dim=-1).T  # (prototypes, targets)
    num_prototypes = probs.shape[0]
    count = probs.new_tensor(float(probs.shape[1]))
    total = probs.sum()
    dist.all_reduce(count)
    dist.all_reduce(total)
    probs = probs / total
    for _ in range(iterations):
        row_sum = probs.sum(dim=1, keepdim=True)
        dist.all_reduce(row_sum)
        probs = probs / row_sum / num_prototypes
        probs = probs / probs.sum(dim=0, keepdim=True) / count
    return (probs * count).T


@register_method("ibot")
class IBOT(SSLMethod):
    def __init__(self, encoder: Encoder, config: PretrainConfig) -> None:
        super().__init__()
        cfg = config.ibot
        self.cfg = cfg
        backbone = encoder.backbone
        if not isinstance(backbone, VisionTransformer):
            raise ModelError(
                f"iBOT masks patch tokens, so it needs a ViT backbone; got {encoder.timm_name} "
                f"({type(backbone).__name__}). Use a timm VisionTransformer (e.g. vit_tiny_28) or DINO for CNNs."
            )
        if cfg.mask_ratio_max < cfg.mask_ratio_min:
            raise ModelError(
                f"ibot.mask_ratio_max ({cfg.mask_ratio_max}) is below ibot.mask_ratio_min ({cfg.mask_ratio_min})"
            )
        self.seed = config.seed
        self.patch_size = int(backbone.patch_embed.patch_size[0])
        self.num_prefix = int(backbone.num_prefix_tokens)
        # Kept in a list so nn.Module does not register the backbone twice in the state dict.
        self._template = [encoder]
        # The wrapper trains the encoder's own ViT (not a copy) and adds the learnable mask token. 'skip' keeps the
        # ViT's initialisation, so pre-training starts from the same network as the random-weights baseline.
        self.student = MaskedVisionTransformerTIMM(
            vit=backbone, weight_initialization="skip", pos_embed_initialization="skip"
        )
        width = int(backbone.num_features)
        self.student_head = build_dino_head(width, cfg)
        self.student_patch_head = build_dino_head(width, cfg) if cfg.separate_patch_head else None
        self.teacher = MaskedVisionTransformerTIMM(
            vit=copy.deepcopy(backbone), weight_initialization="skip", pos_embed_initialization="skip"
        )
        self.teacher.load_state_dict(self.student.state_dict())
        utils.deactivate_requires_grad(self.teacher)
        self.teacher_head = twin_head(self.student_head, width, cfg)
        self.teacher_patch_head = (
            twin_head(self.student_patch_head, width, cfg) if self.student_patch_head is not None else None
        )
        if cfg.teacher_targets == "centering":
            self.centering_loss: DINOLoss | None = DINOLoss(output_dim=cfg.out_dim, student_temp=cfg.student_temp)
            self.patch_centering_loss: IBOTPatchLoss | None = IBOTPatchLoss(
                output_dim=cfg.out_dim, student_temp=cfg.student_temp
            )
        else:
            self.centering_loss, self.patch_centering_loss = None, None
        self.koleo = BatchKoLeo()
        # Switched on under DDP by prepare_for_ddp: Sinkhorn-Knopp balances the targets over the global batch.
        self.gather_distributed = False

    def build_views(self, encoder: Encoder, config: PretrainConfig) -> MultiViewTransform:
        mean, std = encoder.mean.flatten().tolist(), encoder.std.flatten().tolist()
        return build_dino_views(config.views, encoder.in_chans, mean, std)

    def trainable_modules(self) -> list[nn.Module]:
        heads = [self.student_head] + ([self.student_patch_head] if self.student_patch_head is not None else [])
        return [self.student, *heads]

    def _global_block_masks(self, batch: int, grid: int, step: int) -> torch.Tensor:
        """DINOv2 block masks (batch, grid, grid) for the global batch, seeded by (run seed, step) so a resumed run
        masks the same."""
        cfg = self.cfg
        with seeded_rng(self.seed, step, 1):
            return utils.random_block_mask(
                (batch, grid, grid),
                batch_mask_ratio=cfg.mask_sample_ratio,
                min_image_mask_ratio=cfg.mask_ratio_min,
                max_image_mask_ratio=cfg.mask_ratio_max,
            )

    def _block_masks(self, batch: int, grid: int, step: int, device: torch.device, views: int = 1) -> torch.Tensor:
        """This rank's block masks for its ``batch`` rows (``views`` views of its images, view after view).

        Under DDP the masks are drawn for the global batch and the rank keeps its rows, so each image gets the
        mask one process would give it (drawing per rank would give the i-th image of every rank the same mask).
        """
        masks = self._global_block_masks(batch * lightly_dist.world_size(), grid, step)
        return rank_rows(masks, views).to(device)

    def training_step(self, views: list[torch.Tensor], values: StepValues) -> StepOutput:
        cfg = self.cfg
        n_global = 2
        global_views = torch.cat(views[:n_global])
        if global_views.shape[-1] % self.patch_size or global_views.shape[-1] != global_views.shape[-2]:
            raise ModelError(
                f"iBOT needs square global crops that are a multiple of the patch size {self.patch_size}; "
                f"got {tuple(global_views.shape[-2:])}"
            )
        grid = global_views.shape[-1] // self.patch_size
        world = lightly_dist.world_size()
        global_mask = self._global_block_masks(global_views.shape[0] * world, grid, values.step)
        mask = rank_rows(global_mask, n_global).to(global_views.device)
        flat_mask = mask.flatten(1)
        # Decided on the global masks, so that all ranks take the same branch (the Sinkhorn sums are collective).
        any_masked = bool(global_mask.any())
        # Whether every rank's share has a masked patch: the per-rank monitor values are then all defined.
        every_rank_masked = bool(global_mask.flatten(1).any(1).view(n_global, world, -1).any(2).any(0).all())
        # Prefix tokens (CLS) are never masked.
        token_mask = F.pad(flat_mask, (self.num_prefix, 0), value=False)

        teacher_patch_head = self.teacher_patch_head or self.teacher_head
        student_patch_head = self.student_patch_head or self.student_head
        with torch.no_grad():
            teacher_tokens = self.teacher.encode(global_views)
            teacher_cls = self.teacher_head(teacher_tokens[:, 0])
            teacher_patches = teacher_patch_head(teacher_tokens[:, self.num_prefix :][flat_mask])

        student_tokens = self.student.encode(global_views, mask=token_mask)
        student_cls_features = list(student_tokens[:, 0].chunk(n_global))
        for local in views[n_global:]:
            student_cls_features.append(self.student.encode(local)[:, 0])
        student_cls = [self.student_head(f) for f in student_cls_features]
        student_patches = student_patch_head(student_tokens[:, self.num_prefix :][flat_mask])

        teacher_cls_views = list(teacher_cls.chunk(n_global))
        if self.centering_loss is not None and self.patch_centering_loss is not None:
            dino_loss = self.centering_loss(teacher_cls_views, student_cls, teacher_temp=values.teacher_temp)
            patch_loss = (
                self._centered_patch_loss(
                    self.patch_centering_loss, teacher_patches, student_patches, mask, values.teacher_temp
                )
                if any_masked
                else student_patches.sum() * 0.0
            )
        else:
            gather = self.gather_distributed
            targets = sinkhorn_targets(teacher_cls, values.teacher_temp, cfg.sinkhorn_iterations, gather)
            dino_loss = cross_view_cross_entropy(list(targets.chunk(n_global)), student_cls, cfg.student_temp)
            if any_masked:
                patch_targets = patch_sinkhorn_targets(
                    teacher_patches, values.teacher_temp, cfg.sinkhorn_iterations, gather
                )
                patch_loss = masked_patch_cross_entropy(patch_targets, student_patches, mask, cfg.student_temp)
            else:
                patch_loss = student_patches.sum() * 0.0

        koleo = sum(self.koleo(f.float()) for f in student_cls_features[:n_global]) / n_global
        loss = dino_loss + cfg.patch_loss_weight * patch_loss + cfg.koleo_weight * koleo
        extra = teacher_readings(teacher_cls, values.teacher_temp)
        if every_rank_masked:
            extra["teacher_patch_entropy"], _ = prediction_entropy(teacher_patches, values.teacher_temp)
        return StepOutput(
            loss=loss,
            logs={
                "loss": float(loss.detach()),
                "dino_loss": float(dino_loss.detach()),
                "ibot_loss": float(patch_loss.detach()),
                "koleo": float(koleo.detach()),
                "masked_share": float(flat_mask.float().mean()),
            },
            monitor_features=student_cls_features[0].detach(),
            monitor_extra=extra,
        )

    def _centered_patch_loss(
        self,
        loss_fn: IBOTPatchLoss,
        teacher_patches: torch.Tensor,
        student_patches: torch.Tensor,
        mask: torch.Tensor,
        teacher_temp: float,
    ) -> torch.Tensor:
        """lightly's iBOT patch loss with centring; under DDP its centre is then set from all ranks' patches."""
        if not (self.gather_distributed and lightly_dist.world_size() > 1):
            return loss_fn(teacher_patches, student_patches, mask, teacher_temp=teacher_temp)
        previous = loss_fn.center.center.clone()
        loss = loss_fn(teacher_patches, student_patches, mask, teacher_temp=teacher_temp)
        # lightly's update averages the ranks' means of their masked patches: ranks with fewer patches weigh more,
        # and a rank without any makes the centre NaN. The mean over all masked patches replaces it.
        sums = torch.cat([teacher_patches.float().sum(dim=0), teacher_patches.new_tensor([teacher_patches.shape[0]])])
        dist.all_reduce(sums)
        batch_center = (sums[:-1] / sums[-1]).view_as(previous)
        loss_fn.center.center = center_momentum(previous, batch_center, loss_fn.center.momentum)
        return loss

    def before_optimizer_step(self, values: StepValues) -> None:
        for head in (self.student_head, self.student_patch_head):
            cancel_last_layer_gradients(head, values)

    def after_optimizer_step(self, values: StepValues) -> None:
        pairs: list[tuple[nn.Module, nn.Module]] = [
            (self.student, self.teacher),
            (self.student_head, self.teacher_head),
        ]
        if self.student_patch_head is not None and self.teacher_patch_head is not None:
            pairs.append((self.student_patch_head, self.teacher_patch_head))
        update_teachers(pairs, values.momentum)

    def export_encoder(self) -> Encoder:
        # As in DINO and iBOT, the teacher (the EMA of the student) is the encoder kept.
        encoder = copy.deepcopy(self._template[0])
        encoder.backbone.load_state_dict(self.teacher.vit.state_dict())
        return encoder
