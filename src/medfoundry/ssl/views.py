"""Multi-crop views built from lightly's transforms, made reproducible per (seed, epoch, sample).

Each sample's augmentation draws its randomness from a generator seeded by (run seed, epoch, index), so
the views do not depend on the number of DataLoader workers or on where a resumed run restarted.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from lightly.transforms.dino_transform import DINOTransform, DINOViewTransform
from lightly.transforms.multi_view_transform import MultiViewTransform
from PIL import Image
from torch.utils.data import Dataset, Sampler

from medfoundry.data.sample import ImageSet
from medfoundry.errors import DataError
from medfoundry.transforms.view import (
    DomainMultiViewTransform,
    DomainViewTransform,
    ViewsConfig,
    uses_domain_steps,
)


def to_pil(image: np.ndarray, source: str = "") -> Image.Image:
    """A (C,H,W) uint8 or 0..1 float array as a PIL image (L for 1 channel, RGB for 3)."""
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise DataError(f"2D views need (C,H,W) images with 1 or 3 channels, got shape {image.shape}", source)
    if image.dtype != np.uint8:
        image = np.clip(np.asarray(image, dtype=np.float32) * 255.0, 0, 255).round().astype(np.uint8)
    if image.shape[0] == 1:
        return Image.fromarray(image[0], mode="L")
    return Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0)), mode="RGB")


def build_dino_views(config: ViewsConfig, in_chans: int, mean: list[float], std: list[float]) -> MultiViewTransform:
    """Global and local crops via lightly's DINOTransform, with medical-image defaults.

    Grey-scale conversion and hue/saturation jitter are off: for 1-channel images they mean nothing, and in
    pathology colour carries the stain. A domain preset (``config.domain``) adds its steps around lightly's.
    """
    if uses_domain_steps(config):
        return _domain_dino_views(config, in_chans, mean, std)
    return DINOTransform(
        global_crop_size=config.global_crop_size,
        global_crop_scale=tuple(config.global_crop_scale),
        local_crop_size=config.local_crop_size,
        local_crop_scale=tuple(config.local_crop_scale),
        n_local_views=config.n_local_views,
        gaussian_blur=(config.blur_prob, config.blur_prob, config.blur_prob),
        solarization_prob=config.solarization_prob,
        **_shared_view_kwargs(config, in_chans, mean, std),
    )


def _shared_view_kwargs(config: ViewsConfig, in_chans: int, mean: list[float], std: list[float]) -> dict[str, Any]:
    """Flip, rotation, jitter, blur and normalisation arguments common to lightly's DINO view transforms."""
    return dict(
        hf_prob=config.hflip_prob,
        vf_prob=config.vflip_prob,
        rr_prob=config.rotation_prob,
        rr_degrees=config.rotation_degrees,
        cj_prob=config.color_jitter_prob,
        cj_strength=1.0,
        cj_bright=config.brightness,
        cj_contrast=config.contrast,
        cj_sat=config.saturation if in_chans == 3 else 0.0,
        cj_hue=config.hue if in_chans == 3 else 0.0,
        random_gray_scale=0.0,
        sigmas=tuple(config.blur_sigmas),
        normalize={"mean": list(mean), "std": list(std)},
    )


def build_two_views(config: ViewsConfig, in_chans: int, mean: list[float], std: list[float]) -> MultiViewTransform:
    """Two views for SimCLR, MoCo v3 and BYOL, from the same fields as DINO's two global crops.

    lightly's DINOViewTransform is used because, unlike SimCLR's and BYOL's view transforms, it takes the
    full crop-scale range (and solarisation). As in DINO and BYOL, solarisation (off by default) applies to the
    second view only. Both views get full-strength colour jitter (lightly's DINOTransform gives its second
    global crop half strength, as it does not pass ``cj_strength`` on).
    """
    common = dict(
        crop_size=config.global_crop_size,
        crop_scale=tuple(config.global_crop_scale),
        gaussian_blur=config.blur_prob,
        **_shared_view_kwargs(config, in_chans, mean, std),
    )
    if uses_domain_steps(config):
        return DomainMultiViewTransform(
            [
                DomainViewTransform(config, **common, solarization_prob=0.0),
                DomainViewTransform(config, **common, solarization_prob=config.solarization_prob),
            ],
            in_chans,
            config.fov_mask,
        )
    return MultiViewTransform(
        [
            DINOViewTransform(**common, solarization_prob=0.0),
            DINOViewTransform(**common, solarization_prob=config.solarization_prob),
        ]
    )


def _domain_dino_views(
    config: ViewsConfig, in_chans: int, mean: list[float], std: list[float]
) -> DomainMultiViewTransform:
    """DINO's global and local crops as lightly's DINOTransform makes them, with the domain steps added."""
    shared = _shared_view_kwargs(config, in_chans, mean, std)
    global_crop = dict(crop_size=config.global_crop_size, crop_scale=tuple(config.global_crop_scale))
    local_crop = dict(crop_size=config.local_crop_size, crop_scale=tuple(config.local_crop_scale))
    blur = config.blur_prob
    # lightly's DINOTransform does not pass cj_strength to its second global crop (so it gets lightly's default
    # 0.5); kept, so that a domain's views differ from the natural ones by the domain steps only.
    second_global = {**shared, "cj_strength": 0.5}
    local = DomainViewTransform(config, **local_crop, **shared, gaussian_blur=blur, solarization_prob=0.0)
    return DomainMultiViewTransform(
        [
            DomainViewTransform(config, **global_crop, **shared, gaussian_blur=blur, solarization_prob=0.0),
            DomainViewTransform(
                config, **global_crop, **second_global, gaussian_blur=blur, solarization_prob=config.solarization_prob
            ),
            *[local] * config.n_local_views,
        ],
        in_chans,
        config.fov_mask,
    )


def derive_seed(*keys: int) -> int:
    """A well-mixed 32-bit seed from several integers (run seed, epoch, index, ...)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


@contextlib.contextmanager
def seeded_rng(*keys: int) -> Iterator[None]:
    """Seed torch, numpy and random from ``keys`` inside the block, restoring the outer state after."""
    seed = derive_seed(*keys)
    np_state, py_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)
        try:
            yield
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)


class SeededViewDataset(Dataset):
    """Returns the list of views of sample ``index`` for key ``(epoch, index)`` or ``(epoch, index, repeat)``."""

    def __init__(self, images: ImageSet, transform: Callable[[Image.Image], list[torch.Tensor]], seed: int):
        self.images = images
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: tuple[int, ...]) -> list[torch.Tensor]:
        epoch, index, *repeat = key
        array = self.images.load(index)
        # Volumes (C,D,H,W) go to the 3D views as arrays: PIL has no 3D images.
        image = array if array.ndim == 4 else to_pil(array, f"{self.images.source}#{self.images.ids[index]}")
        with seeded_rng(self.seed, epoch, index, *repeat):
            return self.transform(image)


class EpochBatchSampler(Sampler[list[tuple[int, ...]]]):
    """Batches of (epoch, index) keys: a seeded permutation per epoch, full batches only.

    Starting at ``start_step`` skips the batches a resumed run already trained on without loading them. The key
    is (epoch, image index), with the repeat count appended when a mixture draws an image again within an epoch,
    so that every draw gets its own views.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        epochs: int,
        seed: int,
        start_step: int = 0,
        epoch_order: Callable[[torch.Generator], list[int]] | None = None,
    ):
        if num_samples < batch_size:
            raise DataError(f"{num_samples} images are fewer than one batch of {batch_size}; lower batch_size")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.epochs = epochs
        self.seed = seed
        self.start_step = start_step
        # A weighted mixture of sources supplies its own order (num_samples draws); otherwise a permutation.
        self.epoch_order = epoch_order or (lambda generator: torch.randperm(num_samples, generator=generator).tolist())

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.batch_size

    def __len__(self) -> int:
        return max(0, self.epochs * self.steps_per_epoch - self.start_step)

    def __iter__(self) -> Iterator[list[tuple[int, ...]]]:
        first_epoch = self.start_step // self.steps_per_epoch
        for epoch in range(first_epoch, self.epochs):
            generator = torch.Generator().manual_seed(derive_seed(self.seed, epoch))
            keys: list[tuple[int, ...]] = []
            draws: dict[int, int] = {}
            for index in self.epoch_order(generator):
                repeat = draws.get(index, 0)
                draws[index] = repeat + 1
                keys.append((epoch, index) if repeat == 0 else (epoch, index, repeat))
            for batch in range(self.steps_per_epoch):
                if epoch * self.steps_per_epoch + batch < self.start_step:
                    continue
                yield keys[batch * self.batch_size : (batch + 1) * self.batch_size]
