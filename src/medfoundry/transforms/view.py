"""One SSL view with domain steps: lightly's DINO view steps, in lightly's order, with the domain steps in place.

lightly's ``DINOViewTransform`` is one closed pipeline over one image: it can neither carry a field-of-view
mask through its crop, flips and rotation nor take a step between its geometry and its colour jitter. Its steps
are therefore listed here again, built from the same torchvision v2 and lightly classes with the same arguments,
so that with every domain step off a view is bit-identical to lightly's (tests/test_views_domains.py checks it).
The natural domain with default fields does not come here at all: it uses lightly's transforms unchanged.

Every random draw comes from torch's or numpy's global generator, as lightly's do, so ``seeded_rng`` keeps
views reproducible per (seed, epoch, index).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import torch
from lightly.transforms.gaussian_blur import GaussianBlur
from lightly.transforms.multi_view_transform import MultiViewTransform
from lightly.transforms.solarize import RandomSolarization
from PIL import Image
from pydantic import Field, model_validator
from torchvision import tv_tensors
from torchvision.transforms import v2

from medfoundry.settings import StrictModel
from medfoundry.transforms.ophthalmology import RandomSpeckle, black_outside, fov_mask_tensor
from medfoundry.transforms.pathology import RandomHEDJitter, random_rot90
from medfoundry.transforms.radiology import RandomWindowJitter, small_affine


class ViewsConfig(StrictModel):
    """Multi-crop views (lightly's DINOTransform). Defaults suit 1-channel 28 px ultrasound.

    Two-view methods (SimCLR, MoCo v3, BYOL) use the global-crop fields only; the local-crop fields are DINO's.
    MAE uses one view: a global crop (size and scale) with horizontal flip, nothing else.

    Crop scales are larger than DINO's ImageNet defaults: at 28 px a crop of a fifth of the image keeps too
    few pixels. On BreastMNIST, global 0.5-1 / local 0.2-0.5 beat 0.3-1 / 0.1-0.4 slightly at equal budget.
    """

    global_crop_size: int = 28
    global_crop_scale: tuple[float, float] = (0.5, 1.0)
    local_crop_size: int = 16
    local_crop_scale: tuple[float, float] = (0.2, 0.5)
    n_local_views: int = 4
    hflip_prob: float = 0.5
    vflip_prob: float = 0.0
    rotation_degrees: float = 10.0
    rotation_prob: float = 0.5
    color_jitter_prob: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.0
    hue: float = 0.0
    blur_prob: float = 0.2
    blur_sigmas: tuple[float, float] = (0.1, 1.0)
    solarization_prob: float = 0.0
    # Domain presets (medfoundry.transforms.presets, docs/views.md) fill in the fields not set explicitly.
    # Frozen: the preset is applied when the config is built, so a later assignment could not re-apply it.
    domain: Literal["natural", "pathology", "radiology", "ophthalmology", "oct"] = Field(
        "natural", frozen=True, description="view preset; 'natural' keeps the views above unchanged"
    )
    rot90_prob: float = Field(0.0, ge=0.0, le=1.0, description="90-degree rotation; with both flips at 0.5, all 8")
    hed_scale: float = Field(0.0, ge=0.0, description="H&E stain density scale jitter: alpha ~ U(1-s, 1+s)")
    hed_shift: float = Field(0.0, ge=0.0, description="H&E stain density shift jitter: beta ~ U(-s, s)")
    window_level_shift: float = Field(0.0, ge=0.0, description="grey window centre shift, a fraction of the range")
    window_width_range: tuple[float, float] = Field((1.0, 1.0), description="grey window width factor range")
    gamma_range: tuple[float, float] = Field((1.0, 1.0), description="gamma range, drawn log-uniformly")
    affine_translate: float = Field(0.0, ge=0.0, le=1.0, description="random shift, a fraction of the crop size")
    affine_scale: tuple[float, float] = Field((1.0, 1.0), description="random zoom range after the crop")
    fov_mask: bool = Field(False, description="keep the circular field of view of fundus photos (black outside)")
    speckle_sigma: float = Field(
        0.0, ge=0.0, le=1.0, description="multiplicative speckle noise (OCT): x * (1 + s * N(0, 1)), s ~ U(0, sigma)"
    )

    @model_validator(mode="before")
    @classmethod
    def _fill_domain_preset(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("domain", "natural") == "natural":
            return data
        from medfoundry.transforms.presets import DOMAIN_PRESETS  # here: keeps the config's imports light

        # An unknown domain is left to the field's own validation, which names the choices.
        return {**DOMAIN_PRESETS.get(data["domain"], {}), **data}

    @model_validator(mode="after")
    def _check_ranges(self) -> ViewsConfig:
        for name in ("window_width_range", "gamma_range", "affine_scale"):
            low, high = getattr(self, name)
            if not 0 < low <= high:
                raise ValueError(f"{name} must be (low, high) with 0 < low <= high, got ({low}, {high})")
        return self


class PreparedImage(NamedTuple):
    """One sample as every view of it starts: the image in the encoder's channels, and its FOV mask if used."""

    image: Image.Image
    mask: tv_tensors.Mask | None


def window_jitter_on(config: ViewsConfig) -> bool:
    return (
        config.window_level_shift > 0
        or tuple(config.window_width_range) != (1.0, 1.0)
        or tuple(config.gamma_range) != (1.0, 1.0)
    )


def affine_on(config: ViewsConfig) -> bool:
    return config.affine_translate > 0 or tuple(config.affine_scale) != (1.0, 1.0)


def uses_domain_steps(config: ViewsConfig) -> bool:
    """False only for the natural domain with every domain field neutral: then lightly's transforms are used."""
    return (
        config.domain != "natural"
        or config.rot90_prob > 0
        or config.hed_scale > 0
        or config.hed_shift > 0
        or window_jitter_on(config)
        or affine_on(config)
        or config.fov_mask
        or config.speckle_sigma > 0
    )


def prepare_image(image: Image.Image, in_chans: int, with_fov_mask: bool) -> PreparedImage:
    """Match the encoder's channels (grey X-rays stored as RGB files become 1 channel) and find the FOV mask."""
    if in_chans == 1 and image.mode != "L":
        image = image.convert("L")
    elif in_chans == 3 and image.mode != "RGB":
        image = image.convert("RGB")
    return PreparedImage(image, fov_mask_tensor(image) if with_fov_mask else None)


class DomainViewTransform:
    """One view: ``views``' domain steps around the steps of lightly's DINOViewTransform.

    The keyword arguments are DINOViewTransform's (as ``medfoundry.ssl.views`` builds them); ``views`` supplies
    the domain fields. Order: crop, flips, 90-degree rotation, rotation, small affine (all joint with the FOV
    mask), then HED / window jitter, colour jitter, grey-scale, blur, solarisation, to tensor, black outside
    the FOV, normalisation.
    """

    def __init__(
        self,
        views: ViewsConfig,
        *,
        crop_size: int,
        crop_scale: tuple[float, float],
        hf_prob: float,
        vf_prob: float,
        rr_prob: float,
        rr_degrees: float,
        cj_prob: float,
        cj_strength: float,
        cj_bright: float,
        cj_contrast: float,
        cj_sat: float,
        cj_hue: float,
        random_gray_scale: float,
        gaussian_blur: float,
        sigmas: tuple[float, float],
        solarization_prob: float,
        normalize: dict[str, list[float]],
    ) -> None:
        geometric: list[Callable] = [
            v2.RandomResizedCrop(size=crop_size, scale=crop_scale, interpolation=v2.InterpolationMode.BICUBIC),
            v2.RandomHorizontalFlip(p=hf_prob),
            v2.RandomVerticalFlip(p=vf_prob),
        ]
        if views.rot90_prob > 0:
            geometric.append(random_rot90(views.rot90_prob))
        # lightly's RandomRotateDegrees wraps exactly this; used directly because the wrapper takes one input only.
        geometric.append(v2.RandomApply([v2.RandomRotation(degrees=rr_degrees)], p=rr_prob))
        if affine_on(views):
            geometric.append(small_affine(views.affine_translate, tuple(views.affine_scale)))
        intensity: list[Callable] = []
        if views.hed_scale > 0 or views.hed_shift > 0:
            intensity.append(RandomHEDJitter(views.hed_scale, views.hed_shift))
        if window_jitter_on(views):
            intensity.append(
                RandomWindowJitter(views.window_level_shift, tuple(views.window_width_range), tuple(views.gamma_range))
            )
        colour = v2.ColorJitter(
            brightness=cj_strength * cj_bright,
            contrast=cj_strength * cj_contrast,
            saturation=cj_strength * cj_sat,
            hue=cj_strength * cj_hue,
        )
        self.geometric = v2.Compose(geometric)
        self.photometric = v2.Compose(
            [
                *intensity,
                v2.RandomApply([colour], p=cj_prob),
                v2.RandomGrayscale(p=random_gray_scale),
                GaussianBlur(sigmas=sigmas, prob=gaussian_blur),
                RandomSolarization(prob=solarization_prob),
                v2.ToImage(),
                v2.ToDtype(dtype=torch.float32, scale=True),
                *([RandomSpeckle(views.speckle_sigma)] if views.speckle_sigma > 0 else []),
            ]
        )
        self.normalize = v2.Normalize(mean=normalize["mean"], std=normalize["std"])

    def __call__(self, sample: PreparedImage | Image.Image) -> torch.Tensor:
        image, mask = sample if isinstance(sample, PreparedImage) else (sample, None)
        if mask is None:
            view = self.photometric(self.geometric(image))
        else:
            image, mask = self.geometric(image, mask)
            view = black_outside(self.photometric(image), mask)
        return self.normalize(view)


class DomainMultiViewTransform(MultiViewTransform):
    """Prepares each image once (channels, FOV mask), then applies every view transform to it."""

    def __init__(self, transforms: Sequence[DomainViewTransform], in_chans: int, with_fov_mask: bool) -> None:
        super().__init__(list(transforms))
        self.in_chans = in_chans
        self.with_fov_mask = with_fov_mask

    def __call__(self, image: Image.Image) -> list[torch.Tensor]:
        prepared = prepare_image(image, self.in_chans, self.with_fov_mask)
        return [transform(prepared) for transform in self.transforms]
