"""Pathology view steps: HED stain jitter and random 90-degree rotations.

HED jitter follows Tellez et al. 2018 (H&E stain augmentation improves generalization of convolutional
networks for histopathological mitosis detection): colour deconvolution into haematoxylin, eosin and DAB
densities (Ruifrok & Johnston's matrix, as in scikit-image), then per stain ``alpha * s + beta`` with
``alpha ~ U(1 - scale, 1 + scale)`` and ``beta ~ U(-shift, shift)``, and back to RGB. Scale and shift are
separate because densities here are on scikit-image's scale (1 = transmission 1e-6), where tissue lies at
about 0.02-0.2: a shift of 0.05 already turns the glass dark pink, while a scale of 0.2 looks like lab-to-lab
stain variation.

Random numbers come from torch's global generator, so views stay reproducible under ``seeded_rng``.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from skimage.color import hed_from_rgb, rgb_from_hed
from torchvision.transforms import v2

from medfoundry.errors import DataError

# scikit-image's optical-density scale: densities are log(rgb) / log(1e-6), so 1 means transmission 1e-6.
_LOG_FLOOR = float(np.log(1e-6))
_HED_FROM_RGB = np.asarray(hed_from_rgb, dtype=np.float32)
_RGB_FROM_HED = np.asarray(rgb_from_hed, dtype=np.float32)


def rgb_to_hed(rgb: np.ndarray) -> np.ndarray:
    """(H,W,3) RGB in 0..1 to (H,W,3) H, E, DAB densities on scikit-image's scale, without clipping.

    scikit-image's ``rgb2hed`` clips negative densities to 0, so ``hed2rgb(rgb2hed(x))`` moves real H&E
    tiles by up to 0.13 per channel; unclipped, the round trip is exact and zero jitter changes nothing.
    """
    density = np.log(np.maximum(rgb, 1e-6, dtype=np.float32)) / _LOG_FLOOR
    return density @ _HED_FROM_RGB


def hed_to_rgb(hed: np.ndarray) -> np.ndarray:
    """The inverse of :func:`rgb_to_hed`, clipped to 0..1."""
    return np.clip(np.exp((hed @ _RGB_FROM_HED) * _LOG_FLOOR), 0.0, 1.0)


class RandomHEDJitter:
    """Scale and shift each stain's density by a random amount (one draw per call, shared by all pixels)."""

    def __init__(self, scale: float, shift: float) -> None:
        if scale < 0 or shift < 0:
            raise DataError(f"HED jitter scale and shift must be >= 0, got {scale} and {shift}")
        self.scale = scale
        self.shift = shift

    def __call__(self, image: Image.Image) -> Image.Image:
        if image.mode != "RGB":
            raise DataError(
                f"HED stain jitter needs RGB (H&E) images, got a {image.mode} image; use 3-channel data and "
                "model.in_chans=3, or set pretrain.views.hed_scale=0 and pretrain.views.hed_shift=0"
            )
        draws = torch.rand(2, 3).numpy()
        alpha = 1.0 + self.scale * (2.0 * draws[0] - 1.0)
        beta = self.shift * (2.0 * draws[1] - 1.0)
        rgb = np.asarray(image, dtype=np.float32) / 255.0
        jittered = hed_to_rgb(rgb_to_hed(rgb) * alpha + beta)
        return Image.fromarray((jittered * 255.0).round().astype(np.uint8))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(scale={self.scale}, shift={self.shift})"


def random_rot90(prob: float) -> v2.RandomApply:
    """Rotate by 90 degrees (counter-clockwise) with probability ``prob``; joint over image and mask.

    With horizontal and vertical flips at 0.5 and ``prob`` 0.5, each of the 8 orientations of the square
    (the dihedral group) comes out with probability 1/8. The angle range (90, 90) makes torchvision's rotation
    an exact transpose for PIL images and masks (no interpolation).
    """
    return v2.RandomApply([v2.RandomRotation((90.0, 90.0))], p=prob)
