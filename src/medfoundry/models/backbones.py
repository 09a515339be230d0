"""Backbones by name through timm, with presets for small medical images.

A preset is a named set of timm keyword arguments (like timm's own registry of decorated builders), so a
recipe can say ``vit_tiny_28`` and still end up with a plain timm ``VisionTransformer`` that timm can
rebuild from ``config.json`` alone. Any timm model name works too, with any input size and channel count.
Architectures timm lacks (the 3D ViT and ResNet, the 2.5D slice encoder, CT-FM's encoder) are registered in
:data:`ARCHITECTURES` under a ``medfoundry.*`` name, which ``config.json`` records in place of a timm name.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from medfoundry.errors import ModelError
from medfoundry.models.names import parse_model_name
from medfoundry.models.resnet3d import RESNET3D_ARCHITECTURE, ResNet3D
from medfoundry.models.vit3d import VIT3D_ARCHITECTURE, ViT3D
from medfoundry.registry import Registry, UnknownModelError, did_you_mean


@dataclass(frozen=True)
class BackbonePreset:
    timm_name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    description: str = ""


BACKBONE_PRESETS: Registry[BackbonePreset] = Registry("backbone preset", error=UnknownModelError)

# Architectures medfoundry builds itself because timm has none, built from config.json's keyword arguments.
# Metadata: ``sized`` (takes a fixed ``img_size``), ``wraps_2d`` (the 2.5D slice encoder, built from a 2D model's
# name with ``slice_kwargs``), ``normalises_input`` (normalises its input itself: the Encoder passes 0..1 through).
# The modules register their own architectures on the first lookup; the 3D ones live below timm's level.
ARCHITECTURES: Registry[Callable[..., nn.Module]] = Registry(
    "architecture", modules=("medfoundry.models.slices", "medfoundry.models.public.ctfm"), error=UnknownModelError
)
ARCHITECTURES.add(VIT3D_ARCHITECTURE, ViT3D, sized=True)
ARCHITECTURES.add(RESNET3D_ARCHITECTURE, ResNet3D)


def register_preset(name: str, timm_name: str, description: str = "", **kwargs: Any) -> None:
    """Register ``name`` as ``timm_name`` built with ``kwargs`` (a preset is a value, hence no decorator)."""
    BACKBONE_PRESETS.add(name, BackbonePreset(timm_name, kwargs, description))


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
# img_size stated (timm's default is the same 224): callers that size inputs from the preset read it here.
register_preset("vit_small_224", "vit_small_patch16_224", "ViT-S/16 at 224 px (22M parameters)", img_size=224)
register_preset("resnet18", "resnet18", "ResNet-18 (11M parameters)")
register_preset("resnet50", "resnet50", "ResNet-50 (24M parameters)")


def resolve_backbone(name: str, **overrides: Any) -> tuple[str, dict[str, Any]]:
    """Return the timm architecture name and keyword arguments for a preset, timm name or ``2.5d:`` name."""
    parsed = parse_model_name(name)
    if parsed.kind == "slices":
        assert parsed.inner is not None
        if parsed.inner.loads_weights:
            raise ModelError(f"'{name}' loads weights: build it with models.checkpoint.load_encoder_or_build")
        slice_model, slice_kwargs = resolve_backbone(parsed.inner.spec)
        if slice_model in ARCHITECTURES:
            raise ModelError(f"'{name}': a 2.5D encoder wraps a 2D model, and '{parsed.inner.spec}' is not one")
        slices = _wrapping_architecture()
        aggregate = overrides.pop("aggregate", parsed.aggregate)
        context = overrides.pop("context", 1)
        kwargs = ARCHITECTURES.metadata(slices)["kwargs_for"](
            slice_model, {**slice_kwargs, **overrides}, 1, aggregate, context
        )
        return slices, kwargs
    if name in BACKBONE_PRESETS:
        preset = BACKBONE_PRESETS.get(name)
        return preset.timm_name, {**preset.kwargs, **overrides}
    if name in ARCHITECTURES or timm.is_model(name):
        return name, dict(overrides)
    close = timm.list_models(f"*{name.split('_')[0]}*")[:8] if name else []
    hint = f" Similar timm models: {', '.join(close)}." if close else ""
    raise ModelError(
        f"unknown model name '{name}'.{did_you_mean(name, BACKBONE_PRESETS.names())} Presets: "
        f"{', '.join(BACKBONE_PRESETS.names())}; or any timm model name (`medfoundry models list`).{hint}"
    )


def _wrapping_architecture() -> str:
    """The registered architecture that applies a 2D model to slices (the 2.5D encoder)."""
    return next(name for name in ARCHITECTURES if ARCHITECTURES.metadata(name).get("wraps_2d"))


# Learned tokens and position embeddings (timm's names, and MONAI's ``position_embeddings`` in the 3D ViT).
TOKEN_PARAMETERS = ("cls_token", "pos_embed", "reg_token", "dist_token", "mask_token", "position_embeddings")


def skips_weight_decay(name: str, param: nn.Parameter) -> bool:
    """Biases, norm scales, tokens and position embeddings are not shrunk towards zero (timm, DINO, BEiT)."""
    return param.ndim <= 1 or name.rsplit(".", 1)[-1] in TOKEN_PARAMETERS


def is_vit(model: nn.Module) -> bool:
    return hasattr(model, "patch_embed") and hasattr(model, "blocks")


# Keyword arguments that make timm read files, reach a hub or replace the network's own forward: never taken from a
# config. timm's loader parameters (create_model, build_model_with_cfg) are added to these below.
_LOADER_KWARGS = frozenset(
    {
        "checkpoint_path",
        "pretrained",
        "pretrained_cfg",
        "pretrained_cfg_overlay",
        "cache_dir",
        "pretrained_strict",
        "pretrained_filter_fn",
        "pretrained_model_args",
        "model_cfg",
        "kwargs_filter",
        "features_only",
        "feature_cfg",
        "feature_cls",
        "out_indices",
        "flatten_sequential",
        "device",
        "dtype",
    }
)
# Shape and regularisation arguments every timm family shares; a floor under the per-module derivation, for builders
# that construct a class from another module (timm's hybrid ViTs, for one).
STRUCTURAL_KWARGS = frozenset(
    {
        "img_size",
        "patch_size",
        "in_chans",
        "num_classes",
        "global_pool",
        "embed_dim",
        "depth",
        "depths",
        "dims",
        "num_heads",
        "mlp_ratio",
        "qkv_bias",
        "qk_norm",
        "init_values",
        "class_token",
        "no_embed_class",
        "reg_tokens",
        "pre_norm",
        "final_norm",
        "fc_norm",
        "dynamic_img_size",
        "dynamic_img_pad",
        "drop_rate",
        "pos_drop_rate",
        "patch_drop_rate",
        "proj_drop_rate",
        "attn_drop_rate",
        "drop_path_rate",
        "norm_layer",
        "act_layer",
        "window_size",
        "output_stride",
    }
)


def _loader_kwargs() -> frozenset[str]:
    from timm.models import build_model_with_cfg

    own = {
        name
        for fn in (timm.create_model, build_model_with_cfg)
        for name, param in inspect.signature(fn).parameters.items()
        if param.kind is not inspect.Parameter.VAR_KEYWORD and name not in ("model_name", "model_cls", "variant")
    }
    return _LOADER_KWARGS | own


def _init_parameters(builder: Callable[..., Any]) -> set[str]:
    """Named parameters of a class's ``__init__`` or a function, leaving out those whose default is a class or a
    function: those take code, which a JSON config cannot hold (timm's ``block_fn``, ``mlp_layer``, ...)."""
    try:
        params = inspect.signature(builder).parameters
    except (TypeError, ValueError):
        return set()
    return {
        name
        for name, param in params.items()
        if param.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        and name != "self"
        and (param.default is inspect.Parameter.empty or not callable(param.default))
    }


@functools.cache
def allowed_model_kwargs(architecture: str) -> frozenset[str]:
    """The keyword arguments a config may pass to build ``architecture``: its constructor's structural parameters.

    For a medfoundry architecture, its builder's parameters. For a timm model, the parameters of the network
    classes defined in the module holding timm's builder (``VisionTransformer``, ``ResNet``, ...), plus
    :data:`STRUCTURAL_KWARGS`, minus anything timm's loader consumes (``checkpoint_path`` would make timm read any
    file a crafted config names).
    """
    if architecture in ARCHITECTURES:
        return frozenset(_init_parameters(ARCHITECTURES.get(architecture)))
    from timm.models._registry import model_entrypoint

    module = sys.modules[model_entrypoint(architecture).__module__]
    names: set[str] = set(STRUCTURAL_KWARGS)
    for value in vars(module).values():
        if isinstance(value, type) and issubclass(value, nn.Module) and value.__module__ == module.__name__:
            names |= _init_parameters(value)
    return frozenset(names - _loader_kwargs())


def check_model_kwargs(architecture: str, kwargs: dict[str, Any], source: Path | None = None) -> None:
    """Refuse an architecture name or keyword argument a checkpoint has no business passing, naming the file.

    A checkpoint folder's ``config.json`` is data from whoever sent the folder: only a registered architecture
    name (never ``hf-hub:`` / ``local-dir:``, which make timm fetch or read files) and the structural arguments of
    that architecture are accepted.
    """
    if architecture not in ARCHITECTURES and not timm.is_model(architecture):
        raise ModelError(f"architecture '{architecture}' is neither a timm model nor a medfoundry one", source)
    allowed = allowed_model_kwargs(architecture)
    for key in kwargs:
        if key not in allowed:
            raise ModelError(
                f"model_kwargs key '{key}' is not a structural argument of {architecture} (refused: a checkpoint's "
                "config may only set the network's shape, not how or from where timm loads it)",
                source,
            )


def create_timm_backbone(timm_name: str, kwargs: dict[str, Any], source: Path | None = None) -> nn.Module:
    """Build a headless timm model (``num_classes=0``) with random weights; never touches a hub or a file.

    ``kwargs`` are checked against :func:`allowed_model_kwargs` first; ``source`` (the config they came from) is
    named in any error.
    """
    kwargs = dict(kwargs)
    check_model_kwargs(timm_name, kwargs, source)
    if timm_name in ARCHITECTURES:
        try:
            return ARCHITECTURES.get(timm_name)(**kwargs)
        except (TypeError, ValueError) as error:
            raise ModelError(f"model '{timm_name}' does not accept these arguments {kwargs}: {error}", source) from None
    if timm_name.startswith(("vit_", "deit", "eva", "beit")):
        # Multi-crop SSL feeds smaller local crops to the same ViT; timm interpolates position embeddings.
        kwargs.setdefault("dynamic_img_size", True)
    kwargs.pop("num_classes", None)  # always headless: a config's own num_classes would be passed twice
    try:
        return timm.create_model(timm_name, pretrained=False, num_classes=0, **kwargs)
    except (TypeError, ValueError, RuntimeError, KeyError, AssertionError) as error:
        # timm reports bad values in many ways (AssertionError for a patch size that does not divide the image).
        first = " ".join(str(error).split())[:300]
        raise ModelError(
            f"timm model '{timm_name}' cannot be built with {kwargs} ({type(error).__name__}: {first})", source
        ) from None


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
    if timm_name in ARCHITECTURES and ARCHITECTURES.metadata(timm_name).get("normalises_input"):
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
    sized = timm_name in ARCHITECTURES and ARCHITECTURES.metadata(timm_name).get("sized", False)
    if timm_name.startswith(("vit_", "deit", "eva", "beit", "swin")) or sized:
        return {**kwargs, "img_size": None}
    return kwargs


def list_backbones() -> list[tuple[str, str, str]]:
    """(name, timm architecture, description) for every preset."""
    return [(name, p.timm_name, p.description) for name, p in BACKBONE_PRESETS.items()]
