"""SimCLR over lightly's parts: projection head, NT-Xent loss with in-batch negatives, two-view transform."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from lightly.loss import NTXentLoss
from lightly.models.modules import SimCLRProjectionHead
from torch import nn

from medfoundry.models.backbones import Encoder
from medfoundry.settings import StrictModel
from medfoundry.ssl.base import SSLMethod, StepOutput, StepValues, register_method

if TYPE_CHECKING:
    from medfoundry.config import PretrainConfig


class SimCLRConfig(StrictModel):
    """SimCLR: NT-Xent over two views with in-batch negatives.

    The CPU trial on BreastMNIST found temperature 0.2 with batch 64 and AdamW lr 1e-3 good.
    """

    temperature: float = 0.2
    hidden_dim: int = 512
    out_dim: int = 128
    num_layers: int = 2


@register_method("simclr")
class SimCLR(SSLMethod):
    def __init__(self, encoder: Encoder, config: PretrainConfig) -> None:
        super().__init__()
        cfg = config.simclr
        # Kept in a list so nn.Module does not register the backbone twice in the state dict.
        self._template = [encoder]
        self.backbone = encoder.backbone
        self.projection = SimCLRProjectionHead(
            int(encoder.backbone.num_features), cfg.hidden_dim, cfg.out_dim, num_layers=cfg.num_layers
        )
        self.criterion = NTXentLoss(temperature=cfg.temperature)

    def trainable_modules(self) -> list[nn.Module]:
        return [self.backbone, self.projection]

    def training_step(self, views: list[torch.Tensor], values: StepValues) -> StepOutput:
        # Both views in one batch, as SimCLR does: batch-norm statistics are shared across the views.
        features = self.backbone(torch.cat(views[:2]))
        z0, z1 = self.projection(features).chunk(2)
        # The loss in fp32: under bf16 autocast, logits at temperature 0.2 lose too much precision.
        with torch.autocast(z0.device.type, enabled=False):
            loss = self.criterion(z0.float(), z1.float())
        return StepOutput(
            loss=loss,
            logs={"loss": float(loss.detach())},
            monitor_features=features.chunk(2)[0].detach(),
            monitor_extra={},
        )

    def export_encoder(self) -> Encoder:
        # SimCLR has one encoder; the projection head is dropped, as in the paper's evaluation.
        return copy.deepcopy(self._template[0])
