"""View presets per imaging domain: the ``ViewsConfig`` fields each ``--domain`` fills in, and why.

A preset only fills fields the config does not set itself (YAML keys, ``-s pretrain.views.x=...`` or keyword
arguments win). Crop sizes and scales are left alone: they depend on the image and model size, not the domain.
Kept free of heavy imports: ``medfoundry.config`` reads it while validating.

natural
    Exactly the views medfoundry had before presets (lightly's DINO views with medical defaults: flips,
    small rotations, brightness/contrast jitter, no grey-scale, no hue/saturation).

pathology (H&E tiles)
    A tissue tile has no up or left, so all 8 orientations of the square are equally valid: flips in both
    directions and 90-degree rotations, each orientation with probability 1/8. Small-angle rotations are off;
    they would add black corners that never occur in a tile. Stains differ between labs, protocols and scanners,
    so the haematoxylin, eosin and DAB densities are jittered (HED, Tellez et al. 2018) instead of hue and
    saturation, which would make colours no stain makes. No grey-scale: colour is the stain signal. Light
    brightness/contrast jitter covers scanner illumination; blur covers out-of-focus scan regions.

radiology (X-ray, CT / MR slices, ultrasound)
    One channel (RGB files of grey images are converted to the encoder's channels). Grey values depend on the
    scanner, the detector and the display window, so the window level and width and the gamma are jittered;
    colour jitter is off (hue and saturation mean nothing for grey images, brightness/contrast is replaced by
    the window). Anatomy has a canonical orientation: no vertical flips or 90-degree rotations, only a small
    rotation, shift and zoom. Horizontal flips stay (as in MoCo-CXR): a mirrored chest is still plausible
    anatomy for learning features; set ``hflip_prob=0`` where laterality matters.

ophthalmology (colour fundus photographs)
    The black surround outside the camera's circular aperture is not content: the field of view is kept
    (found from the image, moved with the geometry) and the outside stays black after every jitter and blur.
    Colour jitter (brightness, contrast, a little saturation and hue) covers cameras, flash and pigmentation.
    Any rotation is fine (the camera can be rotated; the circle stays a circle), and a horizontal flip turns a
    left eye into a plausible right eye; vertical flips add nothing beyond those.

oct (retinal OCT B-scans)
    One channel. The retina's layers run from the vitreous at the top to the choroid at the bottom, so no
    vertical flips or 90-degree rotations; a horizontal flip swaps nasal and temporal sides, which is a
    plausible scan of the other eye. The retina's tilt and position in the B-scan vary with the scan, hence a
    small rotation, shift and zoom. Reflectivity depends on the device and signal strength: the grey window
    and gamma are jittered (no colour jitter). OCT images are dominated by multiplicative speckle, whose
    strength varies with averaging (ART frames), so speckle noise of random strength is added; blur stays as
    in the natural preset.
"""

from __future__ import annotations

from typing import Any

DOMAIN_PRESETS: dict[str, dict[str, Any]] = {
    "natural": {},
    "pathology": {
        "hflip_prob": 0.5,
        "vflip_prob": 0.5,
        "rot90_prob": 0.5,
        "rotation_prob": 0.0,
        "hed_scale": 0.2,
        "hed_shift": 0.01,
        "color_jitter_prob": 0.8,
        "brightness": 0.2,
        "contrast": 0.2,
        "saturation": 0.0,
        "hue": 0.0,
        "solarization_prob": 0.0,
    },
    "radiology": {
        "hflip_prob": 0.5,
        "vflip_prob": 0.0,
        "rot90_prob": 0.0,
        "rotation_degrees": 10.0,
        "rotation_prob": 0.5,
        "affine_translate": 0.05,
        "affine_scale": (0.9, 1.1),
        "color_jitter_prob": 0.0,
        "saturation": 0.0,
        "hue": 0.0,
        "window_level_shift": 0.1,
        "window_width_range": (0.7, 1.3),
        "gamma_range": (0.7, 1.4),
        "solarization_prob": 0.0,
    },
    "ophthalmology": {
        "fov_mask": True,
        "hflip_prob": 0.5,
        "vflip_prob": 0.0,
        "rotation_degrees": 180.0,
        "rotation_prob": 0.5,
        "color_jitter_prob": 0.8,
        "brightness": 0.3,
        "contrast": 0.3,
        "saturation": 0.2,
        "hue": 0.02,
        "solarization_prob": 0.0,
    },
}
# OCT B-scans are grey radiology-like images with their own noise: the radiology preset, a narrower window range
# (OCT's display range varies less than CT windows) and speckle.
DOMAIN_PRESETS["oct"] = {**DOMAIN_PRESETS["radiology"], "window_width_range": (0.8, 1.25), "speckle_sigma": 0.3}
