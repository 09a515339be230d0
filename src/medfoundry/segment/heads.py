"""Decoders over a frozen 3D ViT's patch tokens: a linear head and a small UNETR-style decoder.

* :class:`FrozenTokens` runs the encoder without gradients and returns the patch tokens after chosen blocks as
  feature maps ``(B, D, g, g, g)`` (``g`` = input size / patch size), each through the encoder's final norm (as
  DINOv2's ``get_intermediate_layers(norm=True)``), so every depth is on the same scale.
* :class:`LinearSegHead`: one 1x1x1 convolution from the (concatenated) tokens to class logits on the token
  grid, then trilinear upsampling to the input size (the 3D form of DINOv2's linear segmentation probe).
* :class:`UNETRDecoder`: UNETR's decoder (Hatamizadeh et al., 2022) built from MONAI's blocks, for any patch
  size ``2**n``: a conv block on the input volume at full resolution, ``n - 1`` intermediate token maps brought
  up to ``1/2 .. 1/2**(n-1)`` resolution by ``UnetrPrUpBlock``, and ``n`` ``UnetrUpBlock`` stages from the last
  token map back to full resolution, each joined with its skip. UNETR proper uses blocks 3, 6, 9, 12 of a
  16-voxel-patch ViT; here the depths are a parameter (default: evenly spaced, ending at the last block).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrPrUpBlock, UnetrUpBlock
from torch import nn

from medfoundry.errors import ModelError
from medfoundry.models.backbones import Encoder
from medfoundry.registry import Registry, UnknownModelError

# A decoder builder: (encoder, n_classes, blocks or None, feature_size) -> probe. All live in this file.
DecoderBuilder = Callable[[Encoder, int, "Sequence[int] | None", int], "SegmentationProbe"]
DECODERS: Registry[DecoderBuilder] = Registry("segmentation decoder", error=UnknownModelError)


def check_token_encoder(encoder: Encoder) -> None:
    backbone = encoder.backbone
    needed = ("prepare_tokens", "blocks", "norm", "patch_size", "img_size")
    if not encoder.is_3d or not all(hasattr(backbone, name) for name in needed):
        raise ModelError(
            f"the segmentation probe needs a 3D ViT encoder with patch tokens (medfoundry.vit3d, e.g. vit3d_tiny_32); "
            f"got {encoder.timm_name}"
        )


def default_blocks(depth: int, n: int) -> tuple[int, ...]:
    """``n`` block indices (1-based) evenly spread over ``depth`` blocks, the last one always included."""
    if n > depth:
        raise ModelError(f"{n} token depths asked of an encoder with {depth} blocks")
    return tuple(sorted({max(1, round(depth * (i + 1) / n)) for i in range(n)}))


class FrozenTokens(nn.Module):
    """The encoder, frozen, as a function from 0..1 volumes to token maps after ``blocks`` (1-based indices)."""

    def __init__(self, encoder: Encoder, blocks: Sequence[int]) -> None:
        super().__init__()
        check_token_encoder(encoder)
        depth = len(encoder.backbone.blocks)
        blocks = tuple(int(b) for b in blocks)
        if not blocks or any(not 1 <= b <= depth for b in blocks) or list(blocks) != sorted(set(blocks)):
            raise ModelError(f"token blocks must be increasing indices in 1..{depth}, got {list(blocks)}")
        self.encoder = encoder
        self.blocks = blocks
        self.encoder.requires_grad_(False)
        self.encoder.eval()

    @property
    def embed_dim(self) -> int:
        return int(self.encoder.backbone.embed_dim)

    @property
    def patch_size(self) -> int:
        return int(self.encoder.backbone.patch_size)

    @property
    def img_size(self) -> int:
        return int(self.encoder.backbone.img_size)

    def train(self, mode: bool = True) -> FrozenTokens:
        # The encoder stays in eval mode whatever the decoder does (no dropout or norm statistics to update).
        super().train(mode)
        self.encoder.eval()
        return self

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Token maps of ``images`` (B, C, X, Y, Z) in RAS+ order, the probe's volume layout, returned in that order.

        Encoders take volumes as (D, H, W) = (z, y, x), the layout every 3D reader hands to pre-training
        (``Volume.to_dhw``); a pre-trained encoder must see the axes it was trained on, so the volume is turned into
        that layout on the way in and the token maps are turned back on the way out.
        """
        backbone = self.encoder.backbone
        tokens = backbone.prepare_tokens(self.encoder.normalize(images.permute(0, 1, 4, 3, 2)))
        prefix = int(getattr(backbone, "num_prefix_tokens", 1))
        grid = self.img_size // self.patch_size
        maps = []
        for index, block in enumerate(backbone.blocks, start=1):
            tokens = block(tokens)
            if index in self.blocks:
                patch = backbone.norm(tokens)[:, prefix:]
                # ViT3D's tokens run over the input's three spatial axes in row-major order (conv + flatten).
                grid_dhw = patch.transpose(1, 2).reshape(images.shape[0], -1, grid, grid, grid)
                maps.append(grid_dhw.permute(0, 1, 4, 3, 2))
            if index == self.blocks[-1]:
                break
        return maps


class LinearSegHead(nn.Module):
    """1x1x1 conv from the concatenated token maps to class logits, upsampled trilinearly to ``out_size``."""

    def __init__(self, in_channels: int, n_classes: int, out_size: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_channels, n_classes, kernel_size=1)
        self.out_size = out_size

    def forward(self, images: torch.Tensor, features: list[torch.Tensor]) -> torch.Tensor:
        logits = self.conv(torch.cat(features, dim=1))
        return F.interpolate(logits, size=(self.out_size,) * 3, mode="trilinear", align_corners=False)


class UNETRDecoder(nn.Module):
    """UNETR's decoder over ``log2(patch_size)`` token maps and the input volume (see the module docstring)."""

    def __init__(
        self,
        embed_dim: int,
        patch_size: int,
        n_classes: int,
        in_channels: int = 1,
        feature_size: int = 16,
        norm_name: str = "instance",
    ) -> None:
        super().__init__()
        levels = int(round(math.log2(patch_size)))
        if patch_size < 2 or 2**levels != patch_size:
            raise ModelError(f"the UNETR decoder needs a power-of-two patch size, got {patch_size}; use 'linear'")
        self.levels = levels
        f = feature_size
        self.stem = UnetrBasicBlock(3, in_channels, f, 3, 1, norm_name, res_block=True)
        # Skip i (1..levels-1) brings an intermediate token map from 1/2**levels to 1/2**i resolution.
        self.skips = nn.ModuleList(
            UnetrPrUpBlock(3, embed_dim, f * 2**i, levels - 1 - i, 3, 1, 2, norm_name, res_block=True)
            for i in range(1, levels)
        )
        # Stage i (levels..1) goes from 1/2**i to 1/2**(i-1) resolution; the first takes the last token map.
        self.ups = nn.ModuleList(
            UnetrUpBlock(3, embed_dim if i == levels else f * 2**i, f * 2 ** (i - 1), 3, 2, norm_name, res_block=True)
            for i in range(levels, 0, -1)
        )
        self.out = UnetOutBlock(3, f, n_classes)

    @property
    def n_features(self) -> int:
        return self.levels

    def forward(self, images: torch.Tensor, features: list[torch.Tensor]) -> torch.Tensor:
        if len(features) != self.levels:
            raise ModelError(f"the UNETR decoder takes {self.levels} token maps, got {len(features)}")
        skips = [self.stem(images)] + [skip(feat) for skip, feat in zip(self.skips, features[:-1], strict=True)]
        x = features[-1]
        for up, skip in zip(self.ups, reversed(skips), strict=True):
            x = up(x, skip)
        return self.out(x)


class SegmentationProbe(nn.Module):
    """Frozen encoder tokens -> trainable decoder -> per-voxel logits ``(B, K, S, S, S)`` for 0..1 volumes."""

    def __init__(self, tokens: FrozenTokens, decoder: nn.Module) -> None:
        super().__init__()
        self.tokens = tokens
        self.decoder = decoder

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.tokens(images)
        # UNETR's stem sees the input in the encoder's normalisation, as the ViT does.
        return self.decoder(self.tokens.encoder.normalize(images), features)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.decoder.parameters() if p.requires_grad]


@DECODERS.register("linear")
def linear_probe(
    encoder: Encoder, n_classes: int, blocks: Sequence[int] | None, feature_size: int
) -> SegmentationProbe:
    """A 1x1x1 conv over the tokens of ``blocks`` (default: the last one)."""
    tokens = FrozenTokens(encoder, blocks or (len(encoder.backbone.blocks),))
    return SegmentationProbe(tokens, LinearSegHead(tokens.embed_dim * len(tokens.blocks), n_classes, tokens.img_size))


@DECODERS.register("unetr")
def unetr_probe(encoder: Encoder, n_classes: int, blocks: Sequence[int] | None, feature_size: int) -> SegmentationProbe:
    """UNETR's decoder over ``log2(patch_size)`` token maps (default: evenly spaced blocks) and the input."""
    patch = int(encoder.backbone.patch_size)
    levels = int(round(math.log2(max(patch, 1))))
    tokens = FrozenTokens(encoder, blocks or default_blocks(len(encoder.backbone.blocks), max(levels, 1)))
    head = UNETRDecoder(tokens.embed_dim, patch, n_classes, encoder.in_chans, feature_size)
    if len(tokens.blocks) != head.n_features:
        raise ModelError(f"the UNETR decoder for {patch}-voxel patches takes {head.n_features} token blocks")
    return SegmentationProbe(tokens, head)


def build_probe(
    encoder: Encoder,
    decoder: str,
    n_classes: int,
    blocks: Sequence[int] | None = None,
    feature_size: int = 16,
) -> SegmentationProbe:
    """A probe with a registered decoder (``linear``, ``unetr``) over ``encoder``'s tokens after ``blocks``
    (1-based); each decoder has its own default blocks."""
    builder = DECODERS.get(decoder)
    check_token_encoder(encoder)
    return builder(encoder, n_classes, blocks, feature_size)
