"""Ophthalmology view steps: the circular field of view (FOV) of colour fundus photographs.

A fundus camera images the retina through a round aperture; outside it the photo is black and carries no
content. Views must keep that circle: the FOV mask is found once per image, goes through the same crop, flips
and rotations as the image (torchvision v2 transforms move a ``Mask`` jointly with the image), and after
colour jitter, blur and solarisation everything outside it is set back to black, so no jitter lights up the
background (contrast jitter, for one, pulls black towards grey).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from scipy import ndimage
from torchvision import tv_tensors

# On the 0..255 scale of the brightest channel: the background of IDRiD's JPEGs stays at or below 10, the rim of
# the FOV is above 25. Dark lesions or vignetting inside the FOV that fall below it are filled back in.
FOV_THRESHOLD = 20


def fov_mask(image: Image.Image, threshold: int = FOV_THRESHOLD) -> np.ndarray:
    """(H,W) bool mask of the field of view: the largest bright region of the image, holes filled."""
    pixels = np.asarray(image)
    brightest = pixels.max(axis=2) if pixels.ndim == 3 else pixels
    bright = brightest > threshold
    labels, count = ndimage.label(bright)
    if count > 1:
        # Specks or burnt-in text outside the aperture are not part of the FOV.
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        bright = labels == int(sizes.argmax())
    return ndimage.binary_fill_holes(bright)


def fov_mask_tensor(image: Image.Image) -> tv_tensors.Mask:
    """The FOV mask as a (1,H,W) torchvision ``Mask``, ready to be transformed with the image."""
    return tv_tensors.Mask(torch.from_numpy(fov_mask(image))[None])


def black_outside(view: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Set a (C,H,W) view in 0..1 to black (0) outside the (1,H,W) mask."""
    # Plain tensors: torchvision refuses arithmetic between an Image and a Mask.
    return view.as_subclass(torch.Tensor) * mask.as_subclass(torch.Tensor).to(view.dtype)


class RandomSpeckle:
    """Multiplicative speckle noise for OCT views: ``x * (1 + s * N(0, 1))``, clipped to 0..1, with the strength
    ``s`` drawn uniformly from ``[0, sigma]`` per view (scans differ in how many frames were averaged).

    Neither torchvision nor lightly has multiplicative noise; MONAI's ``RandRicianNoise`` is additive and draws
    from its own ``RandomState``, which would break the seeded views' exact resume, so it is written here with
    torch's global generator.
    """

    def __init__(self, sigma: float) -> None:
        if not 0.0 <= sigma <= 1.0:
            raise ValueError(f"speckle sigma must be in [0, 1], got {sigma}")
        self.sigma = sigma

    def __call__(self, view: torch.Tensor) -> torch.Tensor:
        strength = float(torch.rand(())) * self.sigma
        noisy = view.as_subclass(torch.Tensor) * (1.0 + strength * torch.randn_like(view.as_subclass(torch.Tensor)))
        return noisy.clamp_(0.0, 1.0)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sigma={self.sigma})"
