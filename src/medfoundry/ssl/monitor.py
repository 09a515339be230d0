"""Collapse monitors: feature spread, effective rank, and (for DINO) teacher entropy.

In a BreastMNIST trial, plain DINO centring collapsed within minutes; these numbers flagged it within
two (shared/reference/cpu-ssl-trial.md). A warning is raised after ``patience`` bad readings in a row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@torch.no_grad()
def feature_std(features: torch.Tensor) -> float:
    """Mean per-dimension std of L2-normalised features, scaled by sqrt(dim) so ~1 means well spread."""
    normalized = F.normalize(features.float(), dim=1)
    return float(normalized.std(dim=0).mean() * math.sqrt(features.shape[1]))


@torch.no_grad()
def effective_rank(features: torch.Tensor) -> float:
    """RankMe (Garrido et al. 2023): exp of the entropy of the normalised singular values."""
    singular = torch.linalg.svdvals(features.float() - features.float().mean(dim=0))
    p = singular / singular.sum().clamp_min(1e-12) + 1e-12
    return float(torch.exp(-(p * p.log()).sum()))


@torch.no_grad()
def prediction_entropy(logits: torch.Tensor, temperature: float) -> tuple[float, float]:
    """Mean entropy of softmax(logits / T) relative to its maximum log(K), and the share of used prototypes."""
    probs = F.softmax(logits.float() / temperature, dim=-1)
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(dim=-1).mean()
    used = probs.argmax(dim=-1).unique().numel()
    return float(entropy / math.log(logits.shape[-1])), used / logits.shape[-1]


@dataclass
class CollapseMonitor:
    """Flags collapse when the spread or the effective rank of features stays too low."""

    # Backbone features (a ViT's CLS token above all) share a large common direction even when healthy: a
    # SimCLR run whose probes beat random features by 0.05-0.1 AUROC read 0.08 here. Near-identical vectors
    # read below 0.05, so only that is flagged.
    min_feature_std: float = 0.05
    min_effective_rank: float = 2.0
    patience: int = 3
    bad_readings: int = 0
    history: list[dict[str, float]] = field(default_factory=list)

    def update(self, step: int, features: torch.Tensor, extra: dict[str, float] | None = None) -> dict[str, float]:
        reading = {
            "step": float(step),
            "feature_std": feature_std(features),
            "effective_rank": effective_rank(features),
            **(extra or {}),
        }
        collapsed = reading["feature_std"] < self.min_feature_std or reading["effective_rank"] < self.min_effective_rank
        self.bad_readings = self.bad_readings + 1 if collapsed else 0
        self.history.append(reading)
        return reading

    @property
    def collapsed(self) -> bool:
        return self.bad_readings >= self.patience

    def message(self) -> str:
        last = self.history[-1]
        reasons = []
        if last["feature_std"] < self.min_feature_std:
            reasons.append(f"feature spread {last['feature_std']:.3f} < {self.min_feature_std}")
        if last["effective_rank"] < self.min_effective_rank:
            reasons.append(f"effective rank {last['effective_rank']:.1f} < {self.min_effective_rank}")
        return (
            f"representation collapse suspected at step {int(last['step'])}: {' and '.join(reasons)} "
            f"for {self.bad_readings} readings in a row"
        )
