"""BYOL over lightly's parts: BYOL heads, negative cosine similarity, EMA target, two-view transform."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from lightly.loss import NegativeCosineSimilarity
from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
from torch import nn

from medfoundry.models.backbones import Encoder
from medfoundry.settings import StrictModel
from medfoundry.ssl.base import SSLMethod, StepOutput, StepValues, register_method
from medfoundry.ssl.ema import frozen_copy, update_teachers

if TYPE_CHECKING:
    from medfoundry.config import PretrainConfig


class BYOLConfig(StrictModel):
    """BYOL: online encoder with projection and prediction heads regressing an EMA target."""

    hidden_dim: int = 512
    out_dim: int = 128
    prediction_hidden_dim: int = 512
    momentum_start: float = 0.99
    momentum_end: float = 1.0


@register_method("byol")
class BYOL(SSLMethod):
    def __init__(self, encoder: Encoder, config: PretrainConfig) -> None:
        super().__init__()
        cfg = config.byol
        # Kept in a list so nn.Module does not register the backbone twice in the state dict.
        self._template = [encoder]
        self.backbone = encoder.backbone
        self.projection = BYOLProjectionHead(int(encoder.backbone.num_features), cfg.hidden_dim, cfg.out_dim)
        self.prediction = BYOLPredictionHead(cfg.out_dim, cfg.prediction_hidden_dim, cfg.out_dim)
        self.target_backbone = frozen_copy(self.backbone)
        self.target_projection = frozen_copy(self.projection)
        self.criterion = NegativeCosineSimilarity()

    def trainable_modules(self) -> list[nn.Module]:
        return [self.backbone, self.projection, self.prediction]

    def training_step(self, views: list[torch.Tensor], values: StepValues) -> StepOutput:
        # Each view through the networks separately, as in BYOL (per-view batch-norm statistics).
        features = [self.backbone(view) for view in views[:2]]
        predictions = [self.prediction(self.projection(f)) for f in features]
        with torch.no_grad():
            targets = [self.target_projection(self.target_backbone(view)) for view in views[:2]]
        with torch.autocast(views[0].device.type, enabled=False):
            # Symmetric: each view's prediction regresses the target of the other view. -1 is perfect agreement.
            loss = 0.5 * (
                self.criterion(predictions[0].float(), targets[1].float())
                + self.criterion(predictions[1].float(), targets[0].float())
            )
        return StepOutput(
            loss=loss,
            logs={"loss": float(loss.detach())},
            monitor_features=features[0].detach(),
            monitor_extra={},
        )

    def after_optimizer_step(self, values: StepValues) -> None:
        update_teachers(
            [(self.backbone, self.target_backbone), (self.projection, self.target_projection)], values.momentum
        )

    def export_encoder(self) -> Encoder:
        # BYOL evaluates the online encoder; the target is only its slow-moving average.
        return copy.deepcopy(self._template[0])
