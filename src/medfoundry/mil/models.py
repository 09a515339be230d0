"""Multiple-instance learning heads that turn a bag of tile features into slide-level logits.

All models take a padded batch of bags ``x`` (B, N, D) with a boolean ``mask`` (B, N) that is True for real
instances (a single bag (N, D) is accepted too) and return an ``MILOutput``: logits (B, K) and, where the model
defines one, a per-instance attention score (B, N) that sums to 1 over each bag's real instances.

Why not a library: MONAI's ``MILModel`` runs its own image backbone on image tiles (input (B, N, C, H, W)),
has a fixed 2048-wide attention layer, no gated variant, and does not return attention scores; its
``att_trans`` mode is Myronenko et al. (2021), not TransMIL. The models here are small enough to keep local and
work on cached features, which is what slide-level training on foundation-model embeddings needs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from medfoundry.registry import Registry, UnknownModelError


@dataclass
class MILOutput:
    """Slide logits (B, K) and per-instance attention (B, N), zero on padding; ``None`` for mean pooling."""

    logits: torch.Tensor
    attention: torch.Tensor | None


# Every MIL model is registered in this file (a new one too), so the registry imports nothing on lookup.
MIL_MODELS: Registry[Callable[..., nn.Module]] = Registry("MIL model", error=UnknownModelError)


def _as_batch(x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    if x.ndim == 2:
        x = x.unsqueeze(0)
        mask = None if mask is None else mask.reshape(1, -1)
    if x.ndim != 3:
        raise ValueError(f"a bag must be (N, D) or a batch of bags (B, N, D), got shape {tuple(x.shape)}")
    if mask is None:
        mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    return x, mask


def _masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=1)


def _projection(in_dim: int, hidden: int, dropout: float) -> nn.Sequential:
    # Every model first maps the encoder's features to a small width, as in the ABMIL/CLAM/TransMIL papers;
    # this is where most of the trainable parameters sit when D is 768-1536.
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))


@MIL_MODELS.register("mean")
class MeanPoolMIL(nn.Module):
    """Baseline: project each instance, average over the bag, classify the average.

    Averaging dilutes a rare positive instance by the bag size, so "any tumour tile" rules are learnt less
    sharply than with attention, which can put all its weight on that one tile.
    """

    def __init__(self, in_dim: int, n_classes: int, hidden: int = 64, dropout: float = 0.0) -> None:
        super().__init__()
        self.project = _projection(in_dim, hidden, dropout)
        self.classifier = nn.Linear(hidden, n_classes)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        x, mask = _as_batch(x, mask)
        h = self.project(x) * mask.unsqueeze(-1)
        pooled = h.sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        return MILOutput(self.classifier(pooled), None)


@MIL_MODELS.register("abmil")
class AttentionMIL(nn.Module):
    """Attention-based deep MIL (Ilse, Tomczak & Welling, ICML 2018), plain or gated.

    Attention a_i = softmax_i(w^T tanh(V h_i)); the gated form multiplies by sigmoid(U h_i) elementwise
    before w, which the paper found helps because tanh alone is nearly linear for small inputs.
    """

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        hidden: int = 64,
        attention_dim: int = 32,
        gated: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.project = _projection(in_dim, hidden, dropout)
        self.attention_v = nn.Sequential(nn.Linear(hidden, attention_dim), nn.Tanh())
        self.attention_u = nn.Sequential(nn.Linear(hidden, attention_dim), nn.Sigmoid()) if gated else None
        self.attention_w = nn.Linear(attention_dim, 1)
        self.classifier = nn.Linear(hidden, n_classes)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        x, mask = _as_batch(x, mask)
        h = self.project(x)
        gate = self.attention_v(h)
        if self.attention_u is not None:
            gate = gate * self.attention_u(h)
        attention = _masked_softmax(self.attention_w(gate).squeeze(-1), mask)
        pooled = torch.einsum("bn,bnd->bd", attention, h)
        return MILOutput(self.classifier(pooled), attention)


class _AttentionBlock(nn.Module):
    """Pre-norm transformer block that also returns its head-averaged attention matrix.

    ``nn.TransformerEncoderLayer`` does not expose attention weights, which the heatmaps need.
    """

    def __init__(self, dim: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, n_heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor, padding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.norm1(x)
        attended, weights = self.attn(y, y, y, key_padding_mask=padding, need_weights=True)
        x = x + attended
        return x + self.mlp(self.norm2(x)), weights


@MIL_MODELS.register("transmil")
class TransMIL(nn.Module):
    """A compact TransMIL (Shao et al., NeurIPS 2021): projection, class token, two transformer layers.

    Differences from the paper, stated so nobody mistakes this for a reproduction: the paper uses Nyström
    attention to scale to tens of thousands of tiles; here attention is exact (``nn.MultiheadAttention``),
    which is the same function and fine for the few thousand tiles of a slide at 20x on CPU/GPU, but memory
    grows with N^2 (Nyström would need the unmaintained ``nystrom-attention`` package). The PPEG
    position-encoding module is omitted: it folds the tile sequence into a square image in list order, not
    by the tiles' slide coordinates, so its "positions" depend on how the tiler ordered the tiles.
    The attention score of a tile is the class token's attention to it in the last layer, averaged over heads.
    """

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        hidden: int = 64,
        n_heads: int = 4,
        n_layers: int = 2,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.project = _projection(in_dim, hidden, dropout)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden))
        nn.init.normal_(self.cls_token, std=0.02)
        self.blocks = nn.ModuleList(_AttentionBlock(hidden, n_heads, dropout) for _ in range(n_layers))
        self.norm = nn.LayerNorm(hidden)
        self.classifier = nn.Linear(hidden, n_classes)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        x, mask = _as_batch(x, mask)
        h = self.project(x)
        h = torch.cat([self.cls_token.expand(h.shape[0], -1, -1), h], dim=1)
        cls_valid = torch.ones(mask.shape[0], 1, dtype=torch.bool, device=mask.device)
        padding = ~torch.cat([cls_valid, mask], dim=1)
        weights = h.new_zeros(0)
        for block in self.blocks:
            h, weights = block(h, padding)
        # Drop the class token's attention to itself and renormalise over the bag's tiles.
        to_tiles = weights[:, 0, 1:] * mask
        attention = to_tiles / to_tiles.sum(1, keepdim=True).clamp(min=1e-12)
        return MILOutput(self.classifier(self.norm(h[:, 0])), attention)


@MIL_MODELS.register("gated_abmil")
def gated_attention_mil(in_dim: int, n_classes: int, **kwargs: Any) -> AttentionMIL:
    """ABMIL with the gated attention of Ilse et al. (2018)."""
    return AttentionMIL(in_dim, n_classes, gated=True, **kwargs)


def create_mil_model(name: str, in_dim: int, n_classes: int, **kwargs: object) -> nn.Module:
    """Build a registered MIL model; ``kwargs`` (hidden, dropout, ...) go to its constructor."""
    return MIL_MODELS.get(name)(in_dim, n_classes, **kwargs)


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
