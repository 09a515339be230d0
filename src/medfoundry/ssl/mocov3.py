"""MoCo v3 over lightly's parts: MoCo v3 heads, EMA key encoder, two-view transform.

The loss is MoCo v3's ``ctr``: InfoNCE of each query against the keys of the other view, with the other
images of the batch as negatives, scaled by 2T. lightly's NTXentLoss is SimCLR's loss: it adds query-query
negatives and key-anchored rows, which MoCo v3 does not have, so the few lines are written here.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from lightly.models.modules import MoCoProjectionHead
from lightly.utils import dist as lightly_dist
from torch import nn

from medfoundry.models.backbones import Encoder
from medfoundry.settings import StrictModel
from medfoundry.ssl.base import SSLMethod, StepOutput, StepValues, register_method
from medfoundry.ssl.ema import frozen_copy, update_teachers

if TYPE_CHECKING:
    from medfoundry.config import PretrainConfig


class MoCoV3Config(StrictModel):
    """MoCo v3: query encoder with projection and prediction heads against an EMA key encoder."""

    temperature: float = 0.2
    hidden_dim: int = 512
    out_dim: int = 128
    projection_layers: int = 3
    prediction_hidden_dim: int = 512
    momentum_start: float = 0.99
    momentum_end: float = 1.0


def moco_v3_contrastive(
    query: torch.Tensor, key: torch.Tensor, temperature: float, gather_distributed: bool = False
) -> torch.Tensor:
    """Cross-entropy of each query's similarity to all keys, its own key being the positive (times 2T).

    With ``gather_distributed`` under torch.distributed the keys of every rank are the candidates (MoCo v3's
    concat_all_gather), so each query meets the negatives one process would give it over the global batch.
    """
    query, key = F.normalize(query.float(), dim=1), F.normalize(key.float(), dim=1)
    labels = torch.arange(query.shape[0], device=query.device)
    if gather_distributed and lightly_dist.world_size() > 1:
        # The keys come from the momentum encoder (no gradient), so a plain gather is enough.
        key = torch.cat(lightly_dist.gather(key.detach()))
        labels = labels + lightly_dist.rank() * query.shape[0]
    logits = query @ key.T / temperature
    return 2 * temperature * F.cross_entropy(logits, labels)


@register_method("mocov3")
class MoCoV3(SSLMethod):
    def __init__(self, encoder: Encoder, config: PretrainConfig) -> None:
        super().__init__()
        cfg = config.mocov3
        self.cfg = cfg
        # Kept in a list so nn.Module does not register the backbone twice in the state dict.
        self._template = [encoder]
        self.backbone = encoder.backbone
        width = int(encoder.backbone.num_features)
        # MoCo v3: 3-layer projection and 2-layer prediction MLPs, batch norm in every layer.
        self.projection = MoCoProjectionHead(
            width, cfg.hidden_dim, cfg.out_dim, num_layers=cfg.projection_layers, batch_norm=True
        )
        self.prediction = MoCoProjectionHead(
            cfg.out_dim, cfg.prediction_hidden_dim, cfg.out_dim, num_layers=2, batch_norm=True
        )
        self.momentum_backbone = frozen_copy(self.backbone)
        self.momentum_projection = frozen_copy(self.projection)
        # Switched on under DDP by prepare_for_ddp: the keys of all ranks become the negatives.
        self.gather_distributed = False

    def trainable_modules(self) -> list[nn.Module]:
        return [self.backbone, self.projection, self.prediction]

    def training_step(self, views: list[torch.Tensor], values: StepValues) -> StepOutput:
        # Each view through the encoders separately, as in MoCo v3's code (per-view batch-norm statistics).
        features = [self.backbone(view) for view in views[:2]]
        queries = [self.prediction(self.projection(f)) for f in features]
        with torch.no_grad():
            keys = [self.momentum_projection(self.momentum_backbone(view)) for view in views[:2]]
        # The loss in fp32: under bf16 autocast, logits at temperature 0.2 lose too much precision.
        with torch.autocast(views[0].device.type, enabled=False):
            temperature, gather = self.cfg.temperature, self.gather_distributed
            loss = moco_v3_contrastive(queries[0], keys[1], temperature, gather) + moco_v3_contrastive(
                queries[1], keys[0], temperature, gather
            )
        return StepOutput(
            loss=loss,
            logs={"loss": float(loss.detach())},
            monitor_features=features[0].detach(),
            monitor_extra={},
        )

    def after_optimizer_step(self, values: StepValues) -> None:
        update_teachers(
            [(self.backbone, self.momentum_backbone), (self.projection, self.momentum_projection)], values.momentum
        )

    def export_encoder(self) -> Encoder:
        # MoCo v3 evaluates the base (query) encoder, not the momentum encoder (moco-v3 main_lincls.py).
        return copy.deepcopy(self._template[0])
