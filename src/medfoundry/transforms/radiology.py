"""Radiology view steps: intensity-window and gamma jitter, and a small affine.

Grey values in radiographs and CT slices come through a display window (level and width) chosen by a scanner
preset or a reader, and a detector response curve; jittering level, width and gamma mimics both, where
brightness / contrast / hue jitter of natural photos would not. The jitter is one lookup table per call,
applied to every channel alike, so a grey image stays grey.

torchvision has no window jitter, MONAI's intensity transforms (``RandAdjustContrast``, ``RandShiftIntensity``)
draw from their own ``RandomState`` instead of the global generators, which would break ``seeded_rng``'s
exact resume; the window is therefore written here, drawing from torch's global generator.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from medfoundry.errors import DataError


def window_lut(level: float, width: float, gamma: float) -> np.ndarray:
    """A 256-entry uint8 table: window ``[level - width/2, level + width/2]`` (in 0..1) to 0..1, then ``** gamma``."""
    x = np.arange(256, dtype=np.float64) / 255.0
    y = np.clip((x - level) / width + 0.5, 0.0, 1.0) ** gamma
    return (y * 255.0).round().astype(np.uint8)


class RandomWindowJitter:
    """Random window level shift, window width factor and gamma (log-uniform, so gamma and 1/gamma are alike)."""

    def __init__(self, level_shift: float, width_range: tuple[float, float], gamma_range: tuple[float, float]) -> None:
        if level_shift < 0 or not 0 < width_range[0] <= width_range[1] or not 0 < gamma_range[0] <= gamma_range[1]:
            raise DataError(
                f"window jitter needs level_shift >= 0 and ordered positive ranges, got {level_shift}, "
                f"{width_range}, {gamma_range}"
            )
        self.level_shift = level_shift
        self.width_range = width_range
        self.gamma_range = gamma_range

    def __call__(self, image: Image.Image) -> Image.Image:
        if image.mode not in ("L", "RGB"):
            raise DataError(f"window jitter needs an 8-bit L or RGB image, got mode {image.mode}")
        draws = torch.rand(3).tolist()
        level = 0.5 + self.level_shift * (2.0 * draws[0] - 1.0)
        width = self.width_range[0] + (self.width_range[1] - self.width_range[0]) * draws[1]
        log_lo, log_hi = math.log(self.gamma_range[0]), math.log(self.gamma_range[1])
        gamma = math.exp(log_lo + (log_hi - log_lo) * draws[2])
        return image.point(window_lut(level, width, gamma).tolist() * len(image.getbands()))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(level_shift={self.level_shift}, width_range={self.width_range}, "
            f"gamma_range={self.gamma_range})"
        )


def small_affine(translate: float, scale: tuple[float, float]) -> v2.RandomAffine:
    """Random shift (a fraction of the size) and zoom, joint over image and mask, black fill.

    Rotation stays with the rotation fields (lightly's step), so this only adds what lightly lacks.
    """
    return v2.RandomAffine(
        degrees=0.0, translate=(translate, translate), scale=scale, interpolation=v2.InterpolationMode.BILINEAR
    )
