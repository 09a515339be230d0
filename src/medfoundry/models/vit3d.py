"""A 3D ViT for volumes, from MONAI's patch embedding and transformer blocks, shaped like a timm ViT.

MONAI's own ``monai.networks.nets.ViT`` returns ``(tokens, hidden_states)``, puts the class token after the
position embedding and brings a classification head; the rest of medfoundry (Encoder pooling, SSL methods)
expects timm's ViT surface instead: ``num_features``, ``embed_dim``, ``num_prefix_tokens``, ``patch_embed``,
``blocks``, ``forward_features(x) -> (B, 1 + N, D)`` normalised tokens and ``forward(x) -> CLS token``. This
module is that surface over MONAI's ``PatchEmbeddingBlock`` (conv patches + learnable position embedding) and
``TransformerBlock`` (pre-norm attention and MLP), so the weights keep MONAI's parameter names.
"""

from __future__ import annotations

import torch
from monai.networks.blocks import PatchEmbeddingBlock, TransformerBlock
from torch import nn

from medfoundry.errors import ModelError

#: The architecture name written to a checkpoint's config.json (not a timm name: timm has no 3D ViT).
VIT3D_ARCHITECTURE = "medfoundry.vit3d"


class ViT3D(nn.Module):
    """ViT over cubic volumes ``(B, C, S, S, S)`` with cubic patches; one class token, no registers."""

    spatial_dims = 3

    def __init__(
        self,
        img_size: int = 28,
        patch_size: int = 7,
        in_chans: int = 1,
        embed_dim: int = 192,
        depth: int = 6,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
    ) -> None:
        super().__init__()
        if img_size % patch_size != 0:
            raise ModelError(f"3D ViT needs img_size ({img_size}) to be a multiple of patch_size ({patch_size})")
        self.img_size = img_size
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.embed_dim = self.num_features = embed_dim
        self.num_prefix_tokens = 1
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size**3
        self.patch_embed = PatchEmbeddingBlock(
            in_channels=in_chans,
            img_size=img_size,
            patch_size=patch_size,
            hidden_size=embed_dim,
            num_heads=num_heads,
            proj_type="conv",
            pos_embed_type="learnable",
            spatial_dims=3,
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # use_flash_attention: PyTorch's fused scaled_dot_product_attention, about twice as fast on a CPU as
        # MONAI's einsum path, with the same result.
        self.blocks = nn.Sequential(
            *[
                TransformerBlock(
                    embed_dim, int(embed_dim * mlp_ratio), num_heads, qkv_bias=qkv_bias, use_flash_attention=True
                )
                for _ in range(depth)
            ]
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        # timm's ViT initialisation (truncated normal 0.02 for linear layers and the class token) rather than
        # PyTorch's default: MONAI's TransformerBlock keeps the default, which trains less stably from scratch.
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for module in [*self.blocks.modules(), self.norm]:
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def prepare_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens with their position embedding, the class token first: ``(B, 1 + N, D)``."""
        if x.ndim != 5 or tuple(x.shape[2:]) != (self.img_size,) * 3:
            raise ModelError(
                f"this 3D ViT takes volumes of shape (B, {self.in_chans}, {self.img_size}, {self.img_size}, "
                f"{self.img_size}); got {tuple(x.shape)}"
            )
        tokens = self.patch_embed(x)
        return torch.cat([self.cls_token.expand(x.shape[0], -1, -1).type_as(tokens), tokens], dim=1)

    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Transformer blocks and final norm over any subset of prepared tokens (MAE feeds the kept ones)."""
        return self.norm(self.blocks(tokens))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode_tokens(self.prepare_tokens(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)[:, 0]


def patchify_3d(volumes: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``(B, C, S, S, S)`` to ``(B, N, p**3 * C)`` in the ViT's token order (depth, height, width row-major).

    lightly's ``patchify`` is 2D only. Within a patch, voxels run (pd, ph, pw) with channels last, as lightly
    orders pixels in 2D.
    """
    b, c, d, h, w = volumes.shape
    p = patch_size
    if d % p or h % p or w % p:
        raise ModelError(f"volume of {(d, h, w)} voxels is not a whole number of {p}-voxel patches")
    patches = volumes.reshape(b, c, d // p, p, h // p, p, w // p, p)
    patches = patches.permute(0, 2, 4, 6, 3, 5, 7, 1)
    return patches.reshape(b, (d // p) * (h // p) * (w // p), p**3 * c)
