"""Views of volumes ``(C, D, H, W)`` from MONAI array transforms, reproducible under ``seeded_rng``.

The 2D views are lightly's PIL transforms; volumes need 3D ones, which MONAI has. Each view is a MONAI
``Compose`` over the same ``ViewsConfig`` fields as the 2D views:

* crop: ``RandScaleCrop`` draws each axis' side between ``global_crop_scale ** (1/3)`` and its upper bound to
  the power 1/3 of the volume's side (so the crop's volume share spans ``global_crop_scale``, as the area share
  does in 2D, with some aspect jitter), then ``Resize`` to ``global_crop_size`` cubed (trilinear, anti-aliased
  when shrinking);
* flips: ``hflip_prob`` flips the last axis (W), ``vflip_prob`` the one before (H); depth is never flipped;
* small affine: ``rotation_prob`` / ``rotation_degrees`` rotate about each axis, with up to 10% scaling;
* intensity: ``brightness`` scales values (``RandScaleIntensity``, torchvision's brightness) and ``contrast``
  scales them about their mean (``RandScaleIntensityFixedMean``, torchvision's contrast), each with
  ``color_jitter_prob``; then values are clipped to 0..1 as torchvision does;
* blur: ``blur_prob`` with per-axis sigmas (voxels) drawn from ``blur_sigmas``;
* normalisation with the encoder's mean and std.

MONAI's random transforms each own a numpy ``RandomState`` rather than reading the global generators, so each
call reseeds the pipeline from a seed drawn from torch's generator: inside the dataset's
``seeded_rng(seed, epoch, index)`` that makes every view a function of (seed, epoch, index).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from monai.transforms import (
    Compose,
    NormalizeIntensity,
    RandAffine,
    RandFlip,
    RandGaussianSmooth,
    RandScaleCrop,
    RandScaleIntensity,
    RandScaleIntensityFixedMean,
    Resize,
    Transform,
)
from monai.utils import convert_to_tensor

from medfoundry.errors import DataError, ModelError
from medfoundry.models.backbones import Encoder

if TYPE_CHECKING:
    from medfoundry.config import PretrainConfig
    from medfoundry.transforms.view import ViewsConfig

# MONAI seeds are drawn below 2**32; torch draws them here so seeded_rng governs them.
_MAX_SEED = 2**31


def to_unit_volume(volume: np.ndarray | torch.Tensor, source: str = "") -> torch.Tensor:
    """A (C,D,H,W) uint8 volume to 0..1 float32; float volumes are taken as already 0..1."""
    tensor = torch.as_tensor(volume)
    if tensor.ndim != 4:
        raise DataError(f"3D views need (C,D,H,W) volumes, got shape {tuple(tensor.shape)}", source)
    if tensor.dtype == torch.uint8:
        return tensor.float().div_(255.0)
    return tensor.float()


def check_volume_views(encoder: Encoder, views: ViewsConfig) -> None:
    """3D ViTs have a fixed position-embedding grid, so views must be exactly the encoder's input size."""
    if encoder.img_size is not None and views.global_crop_size != encoder.img_size:
        raise ModelError(
            f"views.global_crop_size ({views.global_crop_size}) must equal the 3D encoder's input size "
            f"({encoder.img_size}): its position embeddings are not resampled"
        )


def _crop_and_resize(views: ViewsConfig) -> list[Transform]:
    low, high = (float(s) ** (1 / 3) for s in views.global_crop_scale)
    return [
        RandScaleCrop(roi_scale=low, max_roi_scale=high, random_center=True, random_size=True),
        Resize((views.global_crop_size,) * 3, mode="trilinear", align_corners=False, anti_aliasing=True),
    ]


def _normalize(mean: Sequence[float], std: Sequence[float]) -> NormalizeIntensity:
    return NormalizeIntensity(subtrahend=list(mean), divisor=list(std), channel_wise=True)


def build_volume_view(views: ViewsConfig, mean: Sequence[float], std: Sequence[float]) -> Compose:
    """One augmented view of a volume (see the module docstring for the steps)."""
    angle = math.radians(views.rotation_degrees)
    return Compose(
        [
            *_crop_and_resize(views),
            RandFlip(prob=views.hflip_prob, spatial_axis=2),
            RandFlip(prob=views.vflip_prob, spatial_axis=1),
            RandAffine(
                prob=views.rotation_prob,
                rotate_range=(angle, angle, angle),
                scale_range=(0.1, 0.1, 0.1),
                mode="bilinear",
                padding_mode="border",
            ),
            RandScaleIntensity(factors=views.brightness, prob=views.color_jitter_prob),
            RandScaleIntensityFixedMean(factors=views.contrast, prob=views.color_jitter_prob),
            _clip_unit,
            RandGaussianSmooth(
                sigma_x=tuple(views.blur_sigmas),
                sigma_y=tuple(views.blur_sigmas),
                sigma_z=tuple(views.blur_sigmas),
                prob=views.blur_prob,
            ),
            _normalize(mean, std),
        ]
    )


def build_mae_volume_view(views: ViewsConfig, mean: Sequence[float], std: Sequence[float]) -> Compose:
    """MAE's one view in 3D: crop, resize and flip only (as MAE's 2D random resized crop and flip)."""
    return Compose([*_crop_and_resize(views), RandFlip(prob=views.hflip_prob, spatial_axis=2), _normalize(mean, std)])


def _clip_unit(volume: torch.Tensor) -> torch.Tensor:
    return volume.clamp(0.0, 1.0)


class SeededVolumeViews:
    """Applies each pipeline to one volume; every call reseeds the pipelines from torch's generator."""

    def __init__(self, pipelines: list[Compose]) -> None:
        self.pipelines = pipelines

    def __call__(self, volume: np.ndarray | torch.Tensor) -> list[torch.Tensor]:
        unit = to_unit_volume(volume)
        out = []
        for pipeline in self.pipelines:
            pipeline.set_random_state(seed=int(torch.randint(_MAX_SEED, ()).item()))
            # Plain tensors, not MONAI MetaTensors: the trainer and the collate function need no metadata.
            out.append(convert_to_tensor(pipeline(unit), dtype=torch.float32, track_meta=False).contiguous())
        return out


def build_two_volume_views(views: ViewsConfig, mean: Sequence[float], std: Sequence[float]) -> SeededVolumeViews:
    """Two independently augmented views (SimCLR, MoCo v3, BYOL on volumes)."""
    return SeededVolumeViews([build_volume_view(views, mean, std), build_volume_view(views, mean, std)])


def volume_views_for(encoder: Encoder, config: PretrainConfig, mae: bool = False) -> SeededVolumeViews:
    """The views a method uses on ``encoder``'s volumes: two augmented views, or MAE's one."""
    check_volume_views(encoder, config.views)
    mean, std = encoder.mean.flatten().tolist(), encoder.std.flatten().tolist()
    if mae:
        return SeededVolumeViews([build_mae_volume_view(config.views, mean, std)])
    return build_two_volume_views(config.views, mean, std)
