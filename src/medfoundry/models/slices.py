"""2.5D encoders: a 2D encoder applied to the slices of a volume, its slice features aggregated into one.

Radiologists read CT slice by slice, and 2D FMs (RAD-DINO, DINOv2, our own 2D checkpoints) are far more
plentiful than 3D ones, so "2.5D" is the usual bridge: every axial slice (with ``context`` neighbours on each
side stacked as channels, so a 1-channel CT becomes the 3-channel input an RGB encoder expects when
``context=1``) goes through the 2D network, and the ``(D, F)`` slice features are pooled into ``(F,)``:

* ``mean``: the average slice feature (no parameters; what a frozen 2D FM can do as is);
* ``attention``: gated attention pooling (Ilse et al. 2018, as in ABMIL), whose few parameters train with
  the rest during SSL or fine-tuning, so informative slices weigh more.

Volumes are ``(B, C, D, H, W)`` with D the slice axis (z, as medfoundry's volume readers store them). The 2D
network's own input normalisation (``slice_mean`` / ``slice_std``, per stacked channel) is applied here after
stacking, so the wrapping :class:`~medfoundry.models.backbones.Encoder` passes 0..1 volumes through unchanged.

``2.5d:NAME`` builds one over a preset or timm name (random weights); :func:`slice_encoder_from` wraps a loaded
2D encoder (a checkpoint or public model) with its weights.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medfoundry.errors import ModelError
from medfoundry.models.backbones import ARCHITECTURES, Encoder, create_timm_backbone, pool_features, resolve_backbone

#: The architecture name written to a checkpoint's config.json.
SLICES_ARCHITECTURE = "medfoundry.slices2d"
AGGREGATES = ("mean", "attention")


class GatedAttentionPool(nn.Module):
    """Gated attention over a set of feature vectors (Ilse et al. 2018): softmax(w^T (tanh(Vh) * sigmoid(Uh)))."""

    def __init__(self, dim: int, hidden: int = 128) -> None:
        super().__init__()
        self.value = nn.Linear(dim, hidden)
        self.gate = nn.Linear(dim, hidden)
        self.score = nn.Linear(hidden, 1)

    def weights(self, features: torch.Tensor) -> torch.Tensor:
        """(B, N, F) features -> (B, N) attention weights summing to 1 over N."""
        scores = self.score(torch.tanh(self.value(features)) * torch.sigmoid(self.gate(features)))
        return scores.squeeze(-1).softmax(dim=-1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return (self.weights(features).unsqueeze(-1) * features).sum(dim=1)


def stack_slices(volumes: torch.Tensor, context: int, stride: int = 1) -> torch.Tensor:
    """(B, C, D, H, W) -> (B, D', C * (2 * context + 1), H, W): each kept slice with its neighbours as channels.

    The volume's first and last slices are repeated at its ends, so edge slices get neighbours too.
    """
    if context > 0:
        padded = F.pad(volumes, (0, 0, 0, 0, context, context), mode="replicate")
        windows = padded.unfold(2, 2 * context + 1, 1)  # (B, C, D, H, W, 2k+1)
        stacked = windows.permute(0, 2, 1, 5, 3, 4)  # (B, D, C, 2k+1, H, W)
        batch, depth, chans, span, height, width = stacked.shape
        stacked = stacked.reshape(batch, depth, chans * span, height, width)
    else:
        stacked = volumes.permute(0, 2, 1, 3, 4)
    return stacked[:, ::stride]


class SliceEncoder(nn.Module):
    """A 2D backbone over a volume's slices, aggregated by ``mean`` or gated ``attention``."""

    spatial_dims = 3

    def __init__(
        self,
        slice_model: str,
        slice_kwargs: dict[str, Any] | None = None,
        in_chans: int = 1,
        context: int = 1,
        aggregate: str = "mean",
        slice_stride: int = 1,
        slice_mean: list[float] | None = None,
        slice_std: list[float] | None = None,
        slice_pool: str = "default",
        img_size: int | None = None,
    ) -> None:
        super().__init__()
        if aggregate not in AGGREGATES:
            raise ModelError(f"2.5D aggregate must be one of {AGGREGATES}, got '{aggregate}'")
        if context < 0 or slice_stride < 1:
            raise ModelError(f"2.5D needs context >= 0 and slice_stride >= 1, got {context} and {slice_stride}")
        timm_name, kwargs = resolve_backbone(slice_model, **(slice_kwargs or {}))
        stacked = in_chans * (2 * context + 1)
        kwargs["in_chans"] = stacked
        if img_size is not None:
            kwargs["img_size"] = img_size
        self.slice_model, self.slice_kwargs = timm_name, kwargs
        self.in_chans, self.context, self.aggregate, self.slice_stride = in_chans, context, aggregate, slice_stride
        self.backbone2d = create_timm_backbone(timm_name, kwargs)
        # The 2D network's own pooled feature (a wrapped FM keeps its token choice, e.g. CLS + mean of patches).
        self.slice_pool, self._pool_features = slice_pool, pool_features
        width = int(self.backbone2d.num_features)
        self.num_features = 2 * width if slice_pool == "token+avg" else width
        mean = slice_mean if slice_mean is not None else [0.5] * stacked
        std = slice_std if slice_std is not None else [0.5] * stacked
        if len(mean) != stacked or len(std) != stacked:
            raise ModelError(f"2.5D slice normalisation needs {stacked} values (channels x slices), got {mean} / {std}")
        self.register_buffer("slice_mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("slice_std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        self.pool = GatedAttentionPool(self.num_features) if aggregate == "attention" else None

    def slice_features(self, volumes: torch.Tensor) -> torch.Tensor:
        """(B, C, D, H, W) volumes in 0..1 -> (B, D', F) features of the kept slices."""
        if volumes.ndim != 5 or volumes.shape[1] != self.in_chans:
            raise ModelError(
                f"this 2.5D encoder takes volumes (B, {self.in_chans}, D, H, W); got shape {tuple(volumes.shape)}"
            )
        stacked = stack_slices(volumes, self.context, self.slice_stride)
        batch, depth = stacked.shape[:2]
        flat = (stacked.flatten(0, 1) - self.slice_mean) / self.slice_std
        return self._pool_features(self.backbone2d, flat, self.slice_pool).view(batch, depth, -1)

    def forward(self, volumes: torch.Tensor) -> torch.Tensor:
        features = self.slice_features(volumes)
        return features.mean(dim=1) if self.pool is None else self.pool(features)


def slice_encoder_kwargs(
    slice_model: str,
    slice_kwargs: dict[str, Any],
    in_chans: int,
    aggregate: str,
    context: int = 1,
    slice_mean: list[float] | None = None,
    slice_std: list[float] | None = None,
    slice_pool: str = "default",
) -> dict[str, Any]:
    """The keyword arguments (as written to config.json) of a :class:`SliceEncoder`."""
    return {
        "slice_pool": slice_pool,
        "slice_model": slice_model,
        "slice_kwargs": {k: v for k, v in slice_kwargs.items() if k not in ("in_chans", "num_classes")},
        "in_chans": in_chans,
        "context": context,
        "aggregate": aggregate,
        "slice_mean": slice_mean,
        "slice_std": slice_std,
    }


# Registered with its config.json writer, which "2.5d:NAME" names resolve through (models.backbones).
ARCHITECTURES.add(
    SLICES_ARCHITECTURE,
    SliceEncoder,
    sized=True,
    wraps_2d=True,
    normalises_input=True,
    kwargs_for=slice_encoder_kwargs,
)


def slice_encoder_from(encoder: Encoder, aggregate: str = "mean") -> Encoder:
    """A 2.5D encoder over 1-channel volumes whose slice network is ``encoder`` (a 2D checkpoint or FM), weights
    copied. An RGB encoder sees each slice with its two neighbours as its three channels, with its own
    normalisation; a 1-channel encoder sees single slices."""
    if encoder.is_3d:
        raise ModelError(f"a 2.5D encoder wraps a 2D encoder; '{encoder.timm_name}' is already 3D")
    if aggregate not in AGGREGATES:
        raise ModelError(f"2.5D aggregate must be one of {AGGREGATES}, got '{aggregate}'")
    if encoder.in_chans % 2 == 0:
        raise ModelError(f"a 2.5D encoder stacks 2k+1 slices as channels; this encoder takes {encoder.in_chans}")
    kwargs = slice_encoder_kwargs(
        encoder.timm_name,
        encoder.timm_kwargs,
        1,
        aggregate,
        (encoder.in_chans - 1) // 2,
        encoder.mean.flatten().tolist(),
        encoder.std.flatten().tolist(),
        encoder.pool,
    )
    backbone = create_timm_backbone(SLICES_ARCHITECTURE, kwargs)
    backbone.backbone2d.load_state_dict(encoder.backbone.state_dict())
    return Encoder(backbone, SLICES_ARCHITECTURE, kwargs, (0.0,), (1.0,), "default")
