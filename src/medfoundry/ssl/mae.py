"""MAE (masked autoencoder, as in RETFound) over lightly's parts: masked ViT encoder, ViT decoder, one-view transform.

The encoder sees only the kept patches of one view; a small ViT decoder fills in mask tokens and predicts the
pixels of the masked patches, scored by mean squared error on those patches alone (with per-patch normalised
targets, MAE's ``norm_pix_loss``). 2D timm ViTs and medfoundry's 3D ViT (``vit3d_*``, volumes): in 3D the patches
are cubes, the decoder's fixed sine-cosine position embedding is MONAI's 3D one, and the views are MONAI crops.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from lightly.models import utils
from lightly.models.modules import MaskedVisionTransformerDecoderTIMM, MaskedVisionTransformerTIMM
from lightly.models.modules.masked_vision_transformer_timm import init_weights
from lightly.transforms.multi_view_transform import MultiViewTransform
from lightly.transforms.torchvision_v2_compatibility import torchvision_transforms as T
from lightly.utils import dist as lightly_dist
from monai.networks.blocks.pos_embed_utils import build_sincos_position_embedding
from PIL import Image
from pydantic import Field
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from medfoundry.distributed import rank_rows
from medfoundry.errors import ModelError
from medfoundry.models.backbones import Encoder, is_vit
from medfoundry.models.vit3d import ViT3D, patchify_3d
from medfoundry.settings import StrictModel
from medfoundry.ssl.base import SSLMethod, StepOutput, StepValues, register_method
from medfoundry.ssl.views import seeded_rng
from medfoundry.ssl.views3d import volume_views_for

if TYPE_CHECKING:
    from medfoundry.config import PretrainConfig


class MAEConfig(StrictModel):
    """MAE (as in RETFound): a ViT encodes the kept patches of one view, a small decoder predicts the masked ones.

    Mask ratio and per-patch normalised targets as in MAE; the decoder is much smaller than MAE's (512 wide,
    8 blocks) so that 28 px images train on a CPU.
    """

    mask_ratio: float = Field(0.75, gt=0.0, lt=1.0)
    decoder_dim: int = 128
    decoder_depth: int = 2
    decoder_heads: int = 4
    norm_pix_loss: bool = True


def build_mae_view(config: PretrainConfig, mean: list[float], std: list[float]) -> MultiViewTransform:
    """One view per image, as in MAE: random resized crop (bicubic), horizontal flip, normalisation.

    lightly's MAETransform has the same steps but fixes the crop's upper scale at 1 and the flip at 0.5, so its
    steps are composed here from ``config.views`` instead.
    """
    views = config.views
    return MultiViewTransform(
        [
            T.Compose(
                [
                    T.RandomResizedCrop(
                        views.global_crop_size,
                        scale=tuple(views.global_crop_scale),
                        interpolation=T.InterpolationMode.BICUBIC,
                    ),
                    T.RandomHorizontalFlip(p=views.hflip_prob),
                    T.ToTensor(),
                    T.Normalize(mean=list(mean), std=list(std)),
                ]
            )
        ]
    )


class MaskedViT3D(nn.Module):
    """What lightly's MaskedVisionTransformerTIMM does for MAE, for the 3D ViT (lightly's wrapper needs timm's
    VisionTransformer): position-embedded tokens, the kept ones only, through the blocks."""

    def __init__(self, vit: ViT3D) -> None:
        super().__init__()
        self.vit = vit

    def encode(self, images: torch.Tensor, idx_keep: torch.Tensor) -> torch.Tensor:
        tokens = self.vit.prepare_tokens(images)
        return self.vit.encode_tokens(utils.get_at_index(tokens, idx_keep))


def sincos_3d(grid: int, dim: int, num_prefix: int) -> torch.Tensor:
    """MAE's fixed sine-cosine decoder positions for a cube of ``grid**3`` patches, prefix tokens at zero.

    MONAI's 3D embedding needs a width divisible by 6 (sine and cosine per axis); the remaining 0-5 channels
    (e.g. 2 of a 128-wide decoder) stay zero rather than forcing decoder_dim to a multiple of 6.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # MONAI calls torch.meshgrid without indexing= ('ij' is meant)
        table = build_sincos_position_embedding([grid] * 3, dim - dim % 6, spatial_dims=3).detach()
    out = torch.zeros(1, num_prefix + grid**3, dim)
    out[:, num_prefix:, : table.shape[-1]] = table
    return out


@register_method("mae")
class MAE(SSLMethod):
    # A constant encoder cannot reconstruct different patches, so MAE has no collapse of the joint-embedding kind,
    # while its mean-pooled patch tokens share a strong common direction: on the Kermany X-rays their spread read
    # 0.04 while the linear probe beat random weights (0.949 vs 0.928 AUROC). Only the effective rank is checked.
    spread_signals_collapse = False

    def __init__(self, encoder: Encoder, config: PretrainConfig) -> None:
        super().__init__()
        if encoder.is_3d:
            self._init_3d(encoder, config)
            return
        self.is_3d = False
        cfg = config.mae
        backbone = encoder.backbone
        if not is_vit(backbone) or not isinstance(backbone, VisionTransformer):
            raise ModelError(
                f"MAE needs a ViT backbone; got {encoder.timm_name} ({type(backbone).__name__}). "
                "Use a timm VisionTransformer, e.g. the vit_tiny_28 preset, or another SSL method for CNNs."
            )
        patch = tuple(backbone.patch_embed.patch_size)
        if patch[0] != patch[1]:
            raise ModelError(f"MAE needs square patches; {encoder.timm_name} has patches of {patch}")
        crop = config.views.global_crop_size
        if crop % patch[0] != 0:
            raise ModelError(f"MAE needs views.global_crop_size ({crop}) to be a multiple of the patch size {patch[0]}")
        if not getattr(backbone, "dynamic_img_size", False) and encoder.img_size not in (None, crop):
            raise ModelError(
                f"MAE crops of {crop} px do not fit this ViT built for {encoder.img_size} px without "
                "dynamic_img_size; set views.global_crop_size to the image size"
            )
        self.seed = config.seed
        self.mask_ratio = cfg.mask_ratio
        self.norm_pix_loss = cfg.norm_pix_loss
        self.patch_size = int(patch[0])
        self.num_patches = (crop // self.patch_size) ** 2
        self.num_prefix = int(backbone.num_prefix_tokens)
        if int(self.num_patches * (1 - self.mask_ratio)) < 1:
            raise ModelError(f"mask_ratio {self.mask_ratio} keeps no patch of {self.num_patches}; lower it")
        # Kept in a list so nn.Module does not register the backbone twice in the state dict.
        self._template = [encoder]
        # The wrapper holds the encoder's own ViT (not a copy), so training it trains the exported encoder.
        # Initialisation is skipped ('skip', not MAE's xavier weights and fixed sine-cosine position embedding):
        # pre-training then starts from the same network as the random-weights baseline built with the same seed,
        # and the position embedding stays learnable, as the exported ViT expects.
        self.encoder = MaskedVisionTransformerTIMM(
            vit=backbone, weight_initialization="skip", pos_embed_initialization="skip"
        )
        self.encoder.mask_token.requires_grad_(False)  # unused: MAE drops masked patches, it does not replace them
        width = int(backbone.embed_dim)
        # lightly's MaskedVisionTransformerDecoderTIMM keeps the input embedding and the pixel prediction head
        # outside the decoder (unlike the deprecated MAEDecoderTIMM), so those two linear layers are here,
        # initialised as MAE does (xavier uniform, zero bias).
        self.decoder_embed = nn.Linear(width, cfg.decoder_dim)
        self.decoder = MaskedVisionTransformerDecoderTIMM(
            num_patches=self.num_patches,
            embed_dim=cfg.decoder_dim,
            depth=cfg.decoder_depth,
            num_heads=cfg.decoder_heads,
            num_prefix_tokens=self.num_prefix,
        )
        self.decoder_pred = nn.Linear(cfg.decoder_dim, self.patch_size**2 * encoder.in_chans)
        self.decoder_embed.apply(init_weights)
        self.decoder_pred.apply(init_weights)

    def _init_3d(self, encoder: Encoder, config: PretrainConfig) -> None:
        """The same parts for the 3D ViT: cubic patches, 3D decoder positions, voxel targets."""
        cfg = config.mae
        backbone = encoder.backbone
        if not isinstance(backbone, ViT3D):
            raise ModelError(f"MAE on volumes needs medfoundry's 3D ViT; got {type(backbone).__name__}")
        self.is_3d = True
        self.seed = config.seed
        self.mask_ratio = cfg.mask_ratio
        self.norm_pix_loss = cfg.norm_pix_loss
        self.patch_size = int(backbone.patch_size)
        self.num_patches = int(backbone.num_patches)
        self.num_prefix = int(backbone.num_prefix_tokens)
        if int(self.num_patches * (1 - self.mask_ratio)) < 1:
            raise ModelError(f"mask_ratio {self.mask_ratio} keeps no patch of {self.num_patches}; lower it")
        self._template = [encoder]
        # As in 2D: the wrapper holds the encoder's own ViT, and the ViT keeps its initialisation.
        self.encoder = MaskedViT3D(backbone)
        self.decoder_embed = nn.Linear(backbone.embed_dim, cfg.decoder_dim)
        # lightly's decoder is sequence-only (timm blocks over tokens), so it serves 3D once its 2D sine-cosine
        # positions are replaced by 3D ones: it is built uninitialised and initialised here as lightly would.
        self.decoder = MaskedVisionTransformerDecoderTIMM(
            num_patches=self.num_patches,
            embed_dim=cfg.decoder_dim,
            depth=cfg.decoder_depth,
            num_heads=cfg.decoder_heads,
            num_prefix_tokens=self.num_prefix,
            initialize_weights=False,
        )
        nn.init.normal_(self.decoder.mask_token, std=0.02)
        self.decoder.pos_embed.data.copy_(sincos_3d(backbone.grid_size, cfg.decoder_dim, self.num_prefix))
        self.decoder.apply(init_weights)
        self.decoder_pred = nn.Linear(cfg.decoder_dim, self.patch_size**3 * encoder.in_chans)
        self.decoder_embed.apply(init_weights)
        self.decoder_pred.apply(init_weights)

    def build_views(self, encoder: Encoder, config: PretrainConfig) -> Callable[[Image.Image], list[torch.Tensor]]:
        if self.is_3d:
            return volume_views_for(encoder, config, mae=True)
        return build_mae_view(config, encoder.mean.flatten().tolist(), encoder.std.flatten().tolist())

    def trainable_modules(self) -> list[nn.Module]:
        return [self.encoder.vit, self.decoder_embed, self.decoder, self.decoder_pred]

    def _mask(self, batch_size: int, step: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices (into the token sequence, prefix tokens first) of kept and of masked tokens, per sample.

        Drawn from a generator seeded by (run seed, step) on the CPU, so a resumed run, any device and any
        number of workers mask the same patches at the same step. Prefix tokens (CLS, registers) are always kept.
        Under DDP the masks are drawn for the global batch and the rank keeps its rows, so each image gets the mask
        one process would give it (drawing per rank would give the i-th image of every rank the same mask).
        """
        with seeded_rng(self.seed, step):
            keep, mask = utils.random_token_mask(
                (batch_size * lightly_dist.world_size(), self.num_patches), self.mask_ratio, mask_class_token=True
            )
        keep, mask = rank_rows(keep), rank_rows(mask)
        prefix = torch.arange(self.num_prefix).expand(batch_size, -1)
        keep = torch.cat([prefix, keep + self.num_prefix], dim=1)
        return keep.to(device), (mask + self.num_prefix).to(device)

    def training_step(self, views: list[torch.Tensor], values: StepValues) -> StepOutput:
        images = views[0]
        batch_size = images.shape[0]
        spatial = images.shape[2:]
        if len(set(spatial)) != 1 or (spatial[0] // self.patch_size) ** len(spatial) != self.num_patches:
            raise ModelError(f"MAE was built for {self.num_patches} patches; got a view of {tuple(images.shape[1:])}")
        idx_keep, idx_mask = self._mask(batch_size, values.step, images.device)

        # Only the kept tokens go through the encoder (after position embeddings, resampled by dynamic_img_size).
        encoded = self.encoder.encode(images, idx_keep=idx_keep)
        embedded = self.decoder_embed(encoded)
        # Mask tokens everywhere, then the encoded tokens back at their places; the decoder adds its positions.
        tokens = utils.repeat_token(self.decoder.mask_token, (batch_size, self.num_prefix + self.num_patches))
        tokens = utils.set_at_index(tokens, idx_keep, embedded.type_as(tokens))
        decoded = self.decoder(tokens)
        predicted = self.decoder_pred(utils.get_at_index(decoded, idx_mask))

        # Pixel (voxel) targets from the normalised view, patch order as the ViT's tokens (row-major).
        patches = patchify_3d(images, self.patch_size) if self.is_3d else utils.patchify(images, self.patch_size)
        target = utils.get_at_index(patches, idx_mask - self.num_prefix)
        with torch.autocast(images.device.type, enabled=False):
            target = target.float()
            if self.norm_pix_loss:
                target = utils.normalize_mean_var(target, dim=-1)
            loss = nn.functional.mse_loss(predicted.float(), target)
        # Monitored: the mean of the encoded kept patch tokens (prefix tokens left out).
        features = encoded[:, self.num_prefix :].mean(dim=1).detach()
        return StepOutput(loss=loss, logs={"loss": float(loss.detach())}, monitor_features=features, monitor_extra={})

    def export_encoder(self) -> Encoder:
        # The encoder's ViT is the module the masked wrapper trained; the decoder is dropped, as in MAE.
        return copy.deepcopy(self._template[0])
