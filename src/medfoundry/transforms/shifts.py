"""Controlled image shifts for feature-robustness tests (``medfoundry robustness``), by domain and severity.

Each shift maps one image to a shifted copy of the same size and dtype, deterministically given the image's
random generator (the caller seeds one per image), so a rerun embeds byte-identical shifted images and the
feature cache can reuse them. Severities are numbers in each shift's own unit (JPEG quality, blur sigma in
pixels, ...); presets list three per shift, mildest first.

The field's libraries do the pixel work: torchstain's Macenko estimate (through :mod:`medfoundry.transforms.stain`)
for stain normalisation, scikit-image's ``rgb2hed`` / ``hed2rgb`` for HED jitter (Tellez et al. 2018, "Whole-slide
mitosis detection in H&E breast histology using PHH3 as a reference to train distilled stain-invariant
convolutional networks": per-stain ``alpha * s + beta``), Pillow for JPEG, blur, brightness and resampling, and
:func:`medfoundry.data.intensity.apply_window` for radiology windows.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter
from skimage.color import hed2rgb, rgb2hed

from medfoundry.data.intensity import apply_window
from medfoundry.errors import DataError
from medfoundry.transforms.stain import MacenkoNormalizer, optical_density

#: (H, W, C) uint8 image, severity, per-image generator, optional stain reference -> shifted (H, W, C) uint8.
ShiftFn = Callable[[np.ndarray, float, np.random.Generator, MacenkoNormalizer | None], np.ndarray]


@dataclass(frozen=True)
class Shift:
    name: str
    fn: ShiftFn
    unit: str
    description: str
    needs_reference: bool = False


def _pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def _array(image: Image.Image, channels: int) -> np.ndarray:
    array = np.asarray(image, dtype=np.uint8)
    return array[..., None] if channels == 1 and array.ndim == 2 else array


def _jpeg(image: np.ndarray, quality: float, _rng: np.random.Generator, _ref: MacenkoNormalizer | None) -> np.ndarray:
    buffer = io.BytesIO()
    _pil(image).save(buffer, format="JPEG", quality=int(round(quality)))
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return _array(decoded.convert("L" if image.shape[-1] == 1 else "RGB"), image.shape[-1])


def _blur(image: np.ndarray, sigma: float, _rng: np.random.Generator, _ref: MacenkoNormalizer | None) -> np.ndarray:
    return _array(_pil(image).filter(ImageFilter.GaussianBlur(radius=float(sigma))), image.shape[-1])


def _resolution(
    image: np.ndarray, scale: float, _rng: np.random.Generator, _ref: MacenkoNormalizer | None
) -> np.ndarray:
    # Down to ``scale`` of the size and back: the encoder sees the usual size with the detail of a coarser scan.
    height, width = image.shape[:2]
    small = (max(1, round(width * scale)), max(1, round(height * scale)))
    pil = _pil(image).resize(small, Image.Resampling.BICUBIC, reducing_gap=None)
    return _array(pil.resize((width, height), Image.Resampling.BICUBIC), image.shape[-1])


def _brightness(
    image: np.ndarray, darkening: float, _rng: np.random.Generator, _ref: MacenkoNormalizer | None
) -> np.ndarray:
    return _array(ImageEnhance.Brightness(_pil(image)).enhance(1.0 - float(darkening)), image.shape[-1])


def _noise(image: np.ndarray, sigma: float, rng: np.random.Generator, _ref: MacenkoNormalizer | None) -> np.ndarray:
    noisy = image.astype(np.float32) + rng.normal(0.0, 255.0 * float(sigma), image.shape).astype(np.float32)
    return np.clip(noisy, 0, 255).round().astype(np.uint8)


def _window(
    image: np.ndarray, narrowing: float, _rng: np.random.Generator, _ref: MacenkoNormalizer | None
) -> np.ndarray:
    # A narrower window around a level moved up by the same share: another reader's display settings, on the
    # 0-255 intensities the images were already windowed to.
    width = 255.0 * (1.0 - float(narrowing))
    level = 127.5 + 0.5 * 255.0 * float(narrowing) / 2.0
    return (apply_window(image.astype(np.float32), (level, width)) * 255.0).round().astype(np.uint8)


def _hed_jitter(
    image: np.ndarray, sigma: float, rng: np.random.Generator, _ref: MacenkoNormalizer | None
) -> np.ndarray:
    rgb = _rgb(image, "hed_jitter")
    hed = rgb2hed(rgb)
    alpha = rng.uniform(1.0 - sigma, 1.0 + sigma, size=3)
    beta = rng.uniform(-sigma, sigma, size=3)
    # beta in OD units scaled by each stain's spread on the image, so a flat tile is not flooded with stain.
    spread = hed.reshape(-1, 3).std(axis=0)
    jittered = hed * alpha + beta * spread
    out = hed2rgb(jittered)
    return (np.clip(out, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def _stain_normalise(
    image: np.ndarray, strength: float, _rng: np.random.Generator, reference: MacenkoNormalizer | None
) -> np.ndarray:
    if reference is None:
        raise DataError("the stain_norm shift needs a reference tile (Macenko normaliser) and none was given")
    rgb = _rgb(image, "stain_norm")
    normalised = reference.transform(rgb)
    if strength >= 1.0:
        return normalised
    # Part way to the reference's stains: interpolated in optical density, where stains mix linearly (Beer-Lambert).
    density = (1.0 - strength) * optical_density(rgb, reference.io) + strength * optical_density(
        normalised, reference.io
    )
    rebuilt = reference.io * np.exp(-density)
    return np.clip(rebuilt, 0, 255).round().astype(np.uint8).reshape(rgb.shape)


def _rgb(image: np.ndarray, shift: str) -> np.ndarray:
    if image.shape[-1] != 3:
        raise DataError(f"the {shift} shift needs RGB (H&E) images, got {image.shape[-1]} channel(s)")
    return image


SHIFTS: dict[str, Shift] = {
    s.name: s
    for s in (
        Shift(
            "stain_norm",
            _stain_normalise,
            "share of the way to the reference's stains",
            "Macenko normalisation to another reference tile",
            needs_reference=True,
        ),
        Shift("hed_jitter", _hed_jitter, "sigma of HED scale and shift", "random per-stain HED scale and offset"),
        Shift("jpeg", _jpeg, "JPEG quality", "JPEG compression"),
        Shift("blur", _blur, "Gaussian sigma (pixels)", "Gaussian blur"),
        Shift("resolution", _resolution, "scale factor", "down-sampled and up-sampled back (coarser scan)"),
        Shift("window", _window, "share of the range cut", "narrower, higher intensity window"),
        Shift("noise", _noise, "noise sigma (share of range)", "additive Gaussian noise"),
        Shift("brightness", _brightness, "darkening", "darker exposure"),
    )
}

#: Shifts and severities (mildest first) by domain.
PRESETS: dict[str, dict[str, tuple[float, ...]]] = {
    "pathology": {
        "stain_norm": (0.33, 0.67, 1.0),
        "hed_jitter": (0.05, 0.1, 0.2),
        "jpeg": (50.0, 25.0, 10.0),
        "blur": (0.5, 1.0, 2.0),
        "resolution": (0.75, 0.5, 0.25),
    },
    "radiology": {
        "window": (0.1, 0.25, 0.4),
        "noise": (0.02, 0.05, 0.1),
        "resolution": (0.75, 0.5, 0.25),
    },
    "fundus": {
        "brightness": (0.2, 0.4, 0.6),
        "blur": (1.0, 2.0, 4.0),
    },
}


def parse_shifts(preset: str | None, explicit: list[str] | None) -> dict[str, tuple[float, ...]]:
    """Shifts from a domain ``preset`` and/or ``NAME:LEVEL,LEVEL,...`` strings (an explicit entry replaces the
    preset's levels of that shift); a one-line error for an unknown preset, shift or level."""
    chosen: dict[str, tuple[float, ...]] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise DataError(f"unknown shift preset {preset!r}; presets: {', '.join(PRESETS)}")
        chosen.update(PRESETS[preset])
    for text in explicit or []:
        name, _, levels = text.partition(":")
        name = name.strip()
        if name not in SHIFTS:
            raise DataError(f"unknown shift {name!r} in {text!r}; shifts: {', '.join(SHIFTS)}")
        try:
            values = tuple(float(v) for v in levels.split(",") if v.strip())
        except ValueError:
            raise DataError(f"shift {text!r}: levels must be numbers, e.g. {name}:1,2,4") from None
        if not values:
            raise DataError(f"shift {text!r} has no levels; write e.g. jpeg:50,25,10")
        chosen[name] = values
    if not chosen:
        raise DataError(f"no shifts: give --preset ({', '.join(PRESETS)}) or --shift NAME:LEVELS")
    return chosen


def as_uint8_hwc(image: np.ndarray) -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]:
    """A channels-first image as (H, W, C) uint8, and the function that turns a shifted copy back into the
    original's layout, dtype and range (float images in [0, 1] or [0, 255] are quantised to 8 bits to be shifted)."""
    if image.ndim != 3:
        raise DataError(f"shifts apply to 2D images (C, H, W), got shape {image.shape}")
    hwc = np.moveaxis(image, 0, -1)
    if image.dtype == np.uint8:
        return np.ascontiguousarray(hwc), lambda out: np.ascontiguousarray(np.moveaxis(out, -1, 0))
    scale = 1.0 if float(np.nanmax(image)) > 1.0 else 255.0
    quantised = np.clip(hwc * scale, 0, 255).round().astype(np.uint8)
    dtype = image.dtype
    return quantised, lambda out: np.ascontiguousarray(np.moveaxis(out.astype(dtype) / dtype.type(scale), -1, 0))


def apply_shift(
    name: str, severity: float, image: np.ndarray, rng: np.random.Generator, reference: MacenkoNormalizer | None = None
) -> np.ndarray:
    """``image`` (C, H, W) under shift ``name`` at ``severity``, in the image's own layout and dtype."""
    hwc, back = as_uint8_hwc(np.asarray(image))
    return back(SHIFTS[name].fn(hwc, float(severity), rng, reference))
