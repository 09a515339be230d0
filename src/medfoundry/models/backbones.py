"""Backbones by name through timm, with presets for small medical images.

A preset is a named set of timm keyword arguments (like timm's own registry of decorated builders), so a
recipe can say ``vit_tiny_28`` and still end up with a plain timm ``VisionTransformer`` that timm can
rebuild from ``config.json`` alone. Any timm model name works too, with any input size and channel count.
The ``vit3d_*`` presets are the one exception: timm has no 3D ViT, so they build medfoundry's MONAI-based
:class:`~medfoundry.models.vit3d.ViT3D`, named ``medfoundry.vit3d`` in ``config.json``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import timm
import torch
from torch import nn

from medfoundry.errors import ModelError
from medfoundry.models.resnet3d import RESNET3D_ARCHITECTURE, ResNet3D
from medfoundry.models.slices import AGGREGATES, SLICES_ARCHITECTURE, SliceEncoder, slice_encoder_kwargs
from medfoundry.models.vit3d import VIT3D_ARCHITECTURE, ViT3D


@dataclass(frozen=True)
class BackbonePreset:
    timm_name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    description: str = ""


BACKBONE_PRESETS: dict[str, BackbonePreset] = {}
# Architectures medfoundry builds itself because timm has none (keyword arguments as in config.json).
NON_TIMM_ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    VIT3D_ARCHITECTURE: ViT3D,
    RESNET3D_ARCHITECTURE: ResNet3D,
    SLICES_ARCHITECTURE: SliceEncoder,
}
# Of those, the ones with a fixed input size (``img_size`` keyword); the 3D ResNet is fully convolutional.
_SIZED_ARCHITECTURES = (VIT3D_ARCHITECTURE, SLICES_ARCHITECTURE)
# "2.5d:NAME" (mean over slices) and "2.5d-attention:NAME" wrap a 2D preset or timm name (docs/volumes.md).
SLICES_PREFIXES = {"2.5d": "mean", "2.5d-attention": "attention"}


def register_preset(name: str, timm_name: str, description: str = "", **kwargs: Any) -> None:
    BACKBONE_PRESETS[name] = BackbonePreset(timm_name, kwargs, description)


# The CPU trial (shared/reference/cpu-ssl-trial.md) used a 6-block, 192-wide ViT with 4 px patches at 28 px:
# 49 tokens per image keeps 28 px images trainable on a laptop CPU.
register_preset(
    "vit_tiny_28",
    "vit_tiny_patch16_224",
    "ViT, dim 192, depth 6, 3 heads, 4 px patches, for 28 px images (2.7M parameters)",
    img_size=28,
    patch_size=4,
    depth=6,
)
register_preset(
    "vit_tiny_64",
    "vit_tiny_patch16_224",
    "ViT, dim 192, depth 6, 3 heads, 8 px patches, for 64 px images",
    img_size=64,
    patch_size=8,
    depth=6,
)
# 3D: 64 tokens per volume (as the 2D presets' 49) keeps volumes trainable on a CPU: on one core, forward and
# backward run at about 88 volumes/s for 28^3 with 7-voxel patches, against 12/s with 4-voxel patches (343 tokens).
register_preset(
    "vit3d_tiny_28",
    VIT3D_ARCHITECTURE,
    "3D ViT (MONAI blocks), dim 192, depth 6, 3 heads, 7-voxel patches, for 28^3 volumes (MedMNIST-3D)",
    img_size=28,
    patch_size=7,
    embed_dim=192,
    depth=6,
    num_heads=3,
)
register_preset(
    "vit3d_tiny_32",
    VIT3D_ARCHITECTURE,
    "3D ViT (MONAI blocks), dim 192, depth 6, 3 heads, 8-voxel patches, for 32^3 volumes (NIfTI crops)",
    img_size=32,
    patch_size=8,
    embed_dim=192,
    depth=6,
    num_heads=3,
)
register_preset(
    "vit3d_tiny_64",
    VIT3D_ARCHITECTURE,
    "3D ViT (MONAI blocks), dim 192, depth 6, 3 heads, 16-voxel patches, for 64^3 volumes (MedMNIST-3D 64)",
    img_size=64,
    patch_size=16,
    embed_dim=192,
    depth=6,
    num_heads=3,
)
register_preset(
    "resnet3d_10",
    RESNET3D_ARCHITECTURE,
    "3D ResNet-10 (MONAI, MedicalNet layout), any volume size (14M parameters)",
    depth=10,
)
register_preset(
    "resnet3d_18", RESNET3D_ARCHITECTURE, "3D ResNet-18 (MONAI), any volume size (33M parameters)", depth=18
)
register_preset(
    "resnet3d_50", RESNET3D_ARCHITECTURE, "3D ResNet-50 (MONAI), any volume size (46M parameters)", depth=50
)
# A quarter of the width and no max-pool: trainable on a laptop CPU at 28^3 to 64^3 (0.9M parameters).
register_preset(
    "resnet3d_tiny",
    RESNET3D_ARCHITECTURE,
    "3D ResNet-10 at 1/4 width, no max-pool, for small volumes on a CPU (0.9M parameters)",
    depth=10,
    widen_factor=0.25,
    no_max_pool=True,
)
register_preset("vit_small_224", "vit_small_patch16_224", "ViT-S/16 at 224 px (22M parameters)")
register_preset("resnet18", "resnet18", "ResNet-18 (11M parameters)")
register_preset("resnet50", "resnet50", "ResNet-50 (24M parameters)")


def resolve_backbone(name: str, **overrides: Any) -> tuple[str, dict[str, Any]]:
    """Return the timm architecture name and keyword arguments for a preset or timm model name."""
    prefix, _, inner = name.partition(":")
    if inner and prefix in SLICES_PREFIXES:
        slice_model, slice_kwargs = resolve_backbone(inner)
        if slice_model in NON_TIMM_ARCHITECTURES:
            raise ModelError(f"'{name}': a 2.5D encoder wraps a 2D model, and '{inner}' is not one")
        aggregate = overrides.pop("aggregate", SLICES_PREFIXES[prefix])
        context = overrides.pop("context", 1)
        kwargs = slice_encoder_kwargs(slice_model, {**slice_kwargs, **overrides}, 1, aggregate, context)
        return SLICES_ARCHITECTURE, kwargs
    if name in BACKBONE_PRESETS:
        preset = BACKBONE_PRESETS[name]
        return preset.timm_name, {**preset.kwargs, **overrides}
    if name in NON_TIMM_ARCHITECTURES or timm.is_model(name):
        return name, dict(overrides)
    close = timm.list_models(f"*{name.split('_')[0]}*")[:8] if name else []
    hint = f" Similar timm models: {', '.join(close)}." if close else ""
    raise ModelError(
        f"unknown model name '{name}'. Presets: {', '.join(sorted(BACKBONE_PRESETS))}; "
        f"or any timm model name (`medfoundry models list`).{hint}"
    )


# Learned tokens and position embeddings (timm's names, and MONAI's ``position_embeddings`` in the 3D ViT).
TOKEN_PARAMETERS = ("cls_token", "pos_embed", "reg_token", "dist_token", "mask_token", "position_embeddings")


def skips_weight_decay(name: str, param: nn.Parameter) -> bool:
    """Biases, norm scales, tokens and position embeddings are not shrunk towards zero (timm, DINO, BEiT)."""
    return param.ndim <= 1 or name.rsplit(".", 1)[-1] in TOKEN_PARAMETERS


def is_vit(model: nn.Module) -> bool:
    return hasattr(model, "patch_embed") and hasattr(model, "blocks")


def create_timm_backbone(timm_name: str, kwargs: dict[str, Any]) -> nn.Module:
    """Build a headless timm model (``num_classes=0``) with random weights; never touches a hub."""
    kwargs = dict(kwargs)
    if timm_name.startswith("medfoundry.") and timm_name not in NON_TIMM_ARCHITECTURES:
        import medfoundry.models.public  # noqa: F401  (registers the public models' own architectures: CT-FM)
    if timm_name in NON_TIMM_ARCHITECTURES:
        try:
            return NON_TIMM_ARCHITECTURES[timm_name](**kwargs)
        except TypeError as error:
            raise ModelError(f"model '{timm_name}' does not accept these arguments {kwargs}: {error}") from None
    if timm_name.startswith(("vit_", "deit", "eva", "beit")):
        # Multi-crop SSL feeds smaller local crops to the same ViT; timm interpolates position embeddings.
        kwargs.setdefault("dynamic_img_size", True)
    try:
        return timm.create_model(timm_name, pretrained=False, num_classes=0, **kwargs)
    except TypeError as error:
        raise ModelError(f"timm model '{timm_name}' does not accept these arguments {kwargs}: {error}") from None


PoolFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]


class Encoder(nn.Module):
    """A timm backbone plus what is needed to use it: input normalisation and the pooled feature.

    ``pool`` chooses the image feature: ``default`` is timm's own pooling (CLS token for ViTs, global
    average for CNNs); ``token+avg`` concatenates the CLS token and the mean of patch tokens (ViT only);
    ``avg`` is the mean of patch tokens alone, after the final norm (ViT only; RETFound-MAE's feature).
    """

    def __init__(
        self,
        backbone: nn.Module,
        timm_name: str,
        timm_kwargs: dict[str, Any],
        mean: tuple[float, ...],
        std: tuple[float, ...],
        pool: str = "default",
    ) -> None:
        super().__init__()
        if pool not in ("default", "token+avg", "avg"):
            raise ModelError(f"unknown pool '{pool}': use 'default', 'token+avg' or 'avg'")
        if pool in ("token+avg", "avg") and not is_vit(backbone):
            raise ModelError(f"pool '{pool}' needs a ViT backbone")
        self.backbone = backbone
        self.timm_name = timm_name
        self.timm_kwargs = dict(timm_kwargs)
        self.pool = pool
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    @property
    def in_chans(self) -> int:
        return int(self.mean.shape[1])

    @property
    def img_size(self) -> int | None:
        size = self.timm_kwargs.get("img_size")
        return int(size) if size is not None else None

    @property
    def is_3d(self) -> bool:
        """Whether the backbone takes volumes (B, C, D, H, W) rather than images."""
        return getattr(self.backbone, "spatial_dims", 2) == 3

    @property
    def embed_dim(self) -> int:
        width = int(self.backbone.num_features)
        return 2 * width if self.pool == "token+avg" else width

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (0..255) or float (0..1) images to the backbone's normalised float input."""
        if images.dtype == torch.uint8:
            images = images.float().div_(255.0)
        # The buffers are (1, C, 1, 1); volumes need one more trailing axis to broadcast over (B, C, D, H, W).
        shape = (1, -1) + (1,) * (images.ndim - 2)
        return (images - self.mean.view(shape)) / self.std.view(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features of already-normalised input."""
        return pool_features(self.backbone, x, self.pool)


def pool_features(backbone: nn.Module, x: torch.Tensor, pool: str) -> torch.Tensor:
    """``backbone``'s feature of ``x`` under ``pool`` (see :class:`Encoder`)."""
    if pool == "default":
        return backbone(x)
    tokens = backbone.forward_features(x)
    prefix = getattr(backbone, "num_prefix_tokens", 1)
    if pool == "avg":
        return tokens[:, prefix:].mean(dim=1)
    return torch.cat([tokens[:, 0], tokens[:, prefix:].mean(dim=1)], dim=1)


def create_encoder(
    name: str,
    in_chans: int = 3,
    img_size: int | None = None,
    pool: str = "default",
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    seed: int | None = None,
    **overrides: Any,
) -> Encoder:
    """Build an encoder with random weights from a preset or timm name.

    ``seed`` makes the random initialisation reproducible (the random-weights baseline must be the same
    network as the one pre-training starts from).
    """
    timm_name, kwargs = resolve_backbone(name, **overrides)
    kwargs["in_chans"] = in_chans
    if img_size is not None and "img_size" in _accepted_kwargs(timm_name, kwargs):
        kwargs["img_size"] = img_size
    if seed is not None:
        torch.manual_seed(seed)
    backbone = create_timm_backbone(timm_name, kwargs)
    if timm_name == SLICES_ARCHITECTURE:
        # The slice encoder normalises its stacked slices itself; the volume passes through as 0..1.
        mean, std = mean or (0.0,) * in_chans, std or (1.0,) * in_chans
    mean = mean or (0.5,) * in_chans
    std = std or (0.5,) * in_chans
    if len(mean) != in_chans or len(std) != in_chans:
        raise ModelError(f"normalisation mean/std need {in_chans} values, got {mean} / {std}")
    return Encoder(backbone, timm_name, kwargs, tuple(mean), tuple(std), pool)


def encoder_from_config(model: Any, seed: int | None = None) -> Encoder:
    """The encoder a recipe's ``model`` section (``medfoundry.config.ModelConfig``) describes, random weights."""
    return create_encoder(
        model.backbone,
        in_chans=model.in_chans,
        img_size=model.img_size,
        pool=model.pool,
        mean=tuple(model.mean) if model.mean else None,
        std=tuple(model.std) if model.std else None,
        seed=seed,
    )


def _accepted_kwargs(timm_name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    # CNNs in timm reject img_size; ViTs need it. Decide by family rather than by trial construction.
    if timm_name.startswith(("vit_", "deit", "eva", "beit", "swin")) or timm_name in _SIZED_ARCHITECTURES:
        return {**kwargs, "img_size": None}
    return kwargs


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


def list_backbones() -> list[tuple[str, str, str]]:
    """(name, timm architecture, description) for every preset."""
    return [(name, p.timm_name, p.description) for name, p in sorted(BACKBONE_PRESETS.items())]
