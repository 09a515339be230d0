"""Domain view presets on real images: natural views are lightly's bit for bit, pathology views jitter the stain
and take all 8 orientations, radiology views stay grey and 1-channel, ophthalmology views keep the field of view
black outside; presets fill only unset fields; every view is reproducible per seed; ``--domain`` reaches the run.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from lightly.transforms.dino_transform import DINOTransform, DINOViewTransform
from lightly.transforms.multi_view_transform import MultiViewTransform
from PIL import Image
from torchvision.transforms import v2
from typer.testing import CliRunner

from medfoundry.cli import app
from medfoundry.cli.pretrain import pretrain_overrides
from medfoundry.config import ExperimentConfig, ViewsConfig, load_config
from medfoundry.data.medmnist import load_medmnist_npz
from medfoundry.ssl.views import build_dino_views, build_two_views, seeded_rng, to_pil
from medfoundry.transforms.ophthalmology import fov_mask
from medfoundry.transforms.pathology import RandomHEDJitter
from medfoundry.transforms.presets import DOMAIN_PRESETS
from medfoundry.transforms.radiology import window_lut
from medfoundry.transforms.view import DomainMultiViewTransform, prepare_image, uses_domain_steps

MEAN3, STD3 = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
SEEDS = range(6)
SIZES = dict(global_crop_size=96, local_crop_size=48, n_local_views=2)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def he_tile(shared_data: Path) -> Image.Image:
    return Image.open(shared_data / "nct_crc_he_100k_samples" / "Sample_Data" / "TUM-AACHEHDV.tif").convert("RGB")


@pytest.fixture(scope="module")
def cxr_rgb(shared_data: Path) -> Image.Image:
    """A Kermany chest X-ray as stored: an RGB file whose three channels are equal."""
    image = Image.open(shared_data / "kermany_cxr_224_trainsubset" / "NORMAL" / "IM-0115-0001.jpeg").convert("RGB")
    pixels = np.asarray(image)
    assert np.array_equal(pixels[..., 0], pixels[..., 1]) and np.array_equal(pixels[..., 0], pixels[..., 2])
    return image


@pytest.fixture(scope="module")
def fundus(shared_data: Path) -> Image.Image:
    """An IDRiD fundus photo (4288x2848 JPEG) decoded at 1/8 scale and shrunk to 224 px wide."""
    image = Image.open(shared_data / "idrid_dr_grading" / "train_images" / "IDRiD_001.jpg")
    image.draft("RGB", (image.width // 8, image.height // 8))
    image = image.convert("RGB")
    image.thumbnail((224, 224))
    return image


def _views(transform, image: Image.Image, *keys: int) -> list[torch.Tensor]:
    with seeded_rng(*keys):
        return transform(image)


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def _old_dino(config: ViewsConfig, in_chans: int, mean: list[float], std: list[float]) -> DINOTransform:
    """lightly's DINOTransform with the arguments medfoundry passed before domain presets existed."""
    return DINOTransform(
        global_crop_size=config.global_crop_size,
        global_crop_scale=tuple(config.global_crop_scale),
        local_crop_size=config.local_crop_size,
        local_crop_scale=tuple(config.local_crop_scale),
        n_local_views=config.n_local_views,
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
        gaussian_blur=(config.blur_prob, config.blur_prob, config.blur_prob),
        sigmas=tuple(config.blur_sigmas),
        solarization_prob=config.solarization_prob,
        normalize={"mean": mean, "std": std},
    )


def _old_two_views(config: ViewsConfig, in_chans: int, mean: list[float], std: list[float]) -> MultiViewTransform:
    common = dict(
        crop_size=config.global_crop_size,
        crop_scale=tuple(config.global_crop_scale),
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
        gaussian_blur=config.blur_prob,
        sigmas=tuple(config.blur_sigmas),
        normalize={"mean": mean, "std": std},
    )
    return MultiViewTransform(
        [
            DINOViewTransform(**common, solarization_prob=0.0),
            DINOViewTransform(**common, solarization_prob=config.solarization_prob),
        ]
    )


def _neutral(domain: str, **fields: object) -> ViewsConfig:
    """A non-natural domain with every preset field set back to the natural value: domain steps all off."""
    natural = ViewsConfig(**fields)
    return ViewsConfig(domain=domain, **{**{key: getattr(natural, key) for key in DOMAIN_PRESETS[domain]}, **fields})


def test_natural_views_are_lightlys_bit_for_bit(breastmnist_npz: Path, he_tile: Image.Image) -> None:
    """The demo's views (BreastMNIST, 1 channel) and a colour case with solarisation, for DINO and two views."""
    grey = to_pil(load_medmnist_npz(breastmnist_npz)["train"].load(0))
    colour_fields = dict(global_crop_size=64, local_crop_size=32, saturation=0.2, hue=0.05, solarization_prob=0.3)
    for image, in_chans, fields in ((grey, 1, {}), (he_tile, 3, colour_fields)):
        mean, std = MEAN3[:in_chans], STD3[:in_chans]
        for config in (ViewsConfig(**fields), ViewsConfig(domain="natural", **fields)):
            assert not uses_domain_steps(config)
            dino, two = build_dino_views(config, in_chans, mean, std), build_two_views(config, in_chans, mean, std)
            assert type(dino) is DINOTransform and type(two) is MultiViewTransform
            old_dino, old_two = _old_dino(config, in_chans, mean, std), _old_two_views(config, in_chans, mean, std)
            for seed in SEEDS:
                assert _same(_views(dino, image, seed, 0, 7), _views(old_dino, image, seed, 0, 7))
                assert _same(_views(two, image, seed, 0, 7), _views(old_two, image, seed, 0, 7))


def test_domain_pipeline_with_steps_off_reproduces_lightly(he_tile: Image.Image) -> None:
    """The domain pipeline re-lists lightly's steps (to carry a mask and add steps between them): with the domain
    steps off it must give lightly's views bit for bit, including DINO's half-strength second global crop."""
    fields = dict(global_crop_size=64, local_crop_size=32, saturation=0.2, hue=0.05, solarization_prob=0.3)
    config = _neutral("pathology", **fields)
    natural = ViewsConfig(**fields)
    assert uses_domain_steps(config)
    dino = build_dino_views(config, 3, MEAN3, STD3)
    two = build_two_views(config, 3, MEAN3, STD3)
    assert isinstance(dino, DomainMultiViewTransform) and isinstance(two, DomainMultiViewTransform)
    for seed in SEEDS:
        assert _same(_views(dino, he_tile, seed), _views(_old_dino(natural, 3, MEAN3, STD3), he_tile, seed))
        assert _same(_views(two, he_tile, seed), _views(_old_two_views(natural, 3, MEAN3, STD3), he_tile, seed))


def test_presets_fill_only_fields_not_set(tmp_path: Path) -> None:
    natural = ViewsConfig()
    pathology = ViewsConfig(domain="pathology", hflip_prob=0.1, hed_scale=0.0)
    assert (pathology.hflip_prob, pathology.hed_scale) == (0.1, 0.0)  # set explicitly: kept
    assert (pathology.vflip_prob, pathology.rot90_prob, pathology.hed_shift) == (0.5, 0.5, 0.01)  # from the preset
    assert pathology.global_crop_size == natural.global_crop_size  # not in any preset
    assert ViewsConfig(domain="natural") == natural

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("pretrain:\n  views:\n    color_jitter_prob: 0.5\n    gamma_range: [0.5, 2.0]\n")
    config = load_config(ExperimentConfig, recipe, ["pretrain.views.domain=radiology", "pretrain.views.hflip_prob=0"])
    views = config.pretrain.views
    assert (views.color_jitter_prob, views.gamma_range, views.hflip_prob) == (0.5, (0.5, 2.0), 0.0)
    assert (views.window_width_range, views.affine_translate, views.fov_mask) == ((0.7, 1.3), 0.05, False)

    # The preset is applied when the config is built; changing the domain later could not re-apply it.
    with pytest.raises(ValueError, match="frozen"):
        pathology.domain = "radiology"
    with pytest.raises(ValueError, match="gamma_range"):
        ViewsConfig(gamma_range=(2.0, 1.0))


def test_pathology_views_jitter_stain_and_keep_structure(he_tile: Image.Image) -> None:
    config = ViewsConfig(domain="pathology", **SIZES)
    views = _views(build_dino_views(config, 3, MEAN3, STD3), he_tile, 0, 0, 3)
    assert [tuple(v.shape) for v in views] == [(3, 96, 96)] * 2 + [(3, 48, 48)] * 2

    original = np.asarray(he_tile, dtype=np.float64)
    assert np.array_equal(np.asarray(RandomHEDJitter(0.0, 0.0)(he_tile)), np.asarray(he_tile))  # exact round trip
    jitter = RandomHEDJitter(config.hed_scale, config.hed_shift)
    colour_changes, correlations = [], []
    for seed in SEEDS:
        with seeded_rng(seed):
            jittered = np.asarray(jitter(he_tile), dtype=np.float64)
        colour_changes.append(np.abs(jittered - original).mean(axis=(0, 1)))
        correlations.append(np.corrcoef(jittered.mean(axis=2).ravel(), original.mean(axis=2).ravel())[0, 1])
    assert min(change.max() for change in colour_changes) > 2.0, colour_changes  # every draw shifts a colour
    assert min(correlations) > 0.95, correlations  # the tissue structure stays


def test_pathology_views_take_all_eight_orientations(he_tile: Image.Image) -> None:
    """Full-tile crops with only flips and 90-degree rotations on: every view is one of the 8 symmetries of the
    square (exactly: no interpolation), and all 8 come out."""
    geometric_only = dict(
        global_crop_size=224, global_crop_scale=(1.0, 1.0), color_jitter_prob=0.0, blur_prob=0.0, hed_scale=0.0
    )
    config = ViewsConfig(domain="pathology", **geometric_only, hed_shift=0.0)
    transform = build_two_views(config, 3, [0.0] * 3, [1.0] * 3)
    tile = v2.ToDtype(torch.float32, scale=True)(v2.ToImage()(he_tile)).as_subclass(torch.Tensor)
    symmetries = [torch.rot90(t, k, dims=(1, 2)) for t in (tile, tile.flip(2)) for k in range(4)]
    seen = set()
    for seed in range(40):
        for view in _views(transform, he_tile, seed):
            matches = [i for i, symmetry in enumerate(symmetries) if torch.equal(view, symmetry)]
            assert len(matches) == 1
            seen.add(matches[0])
    assert seen == set(range(8))


def test_radiology_views_are_grey_and_one_channel(cxr_rgb: Image.Image) -> None:
    assert np.array_equal(window_lut(0.5, 1.0, 1.0), np.arange(256))  # the neutral window changes nothing
    config = ViewsConfig(domain="radiology", **SIZES)
    assert config.color_jitter_prob == 0.0 and config.vflip_prob == 0.0 and config.rot90_prob == 0.0
    as_one_channel = cxr_rgb.convert("L")
    for image in (as_one_channel, cxr_rgb):  # the RGB file is converted to the encoder's one channel
        views = _views(build_dino_views(config, 1, [0.5], [0.25]), image, 1, 0, 2)
        assert [tuple(v.shape) for v in views] == [(1, 96, 96)] * 2 + [(1, 48, 48)] * 2
    # For a 3-channel encoder the views stay grey: no colour operation separates the channels.
    two = build_two_views(config, 3, MEAN3, STD3)
    window_changes = []
    for seed in SEEDS:
        for view in _views(two, cxr_rgb, seed):
            assert torch.equal(view[0], view[1]) and torch.equal(view[0], view[2])
        plain = ViewsConfig(
            domain="radiology", **SIZES, window_level_shift=0, window_width_range=(1, 1), gamma_range=(1, 1)
        )
        unjittered = _views(build_two_views(plain, 3, MEAN3, STD3), cxr_rgb, seed)
        window_changes.append(float((_views(two, cxr_rgb, seed)[0] - unjittered[0]).abs().mean()))
    assert min(window_changes) > 0.0 and max(window_changes) > 0.05, window_changes


def test_ophthalmology_views_keep_the_field_of_view(fundus: Image.Image) -> None:
    mask = fov_mask(fundus)
    height, width = mask.shape
    assert not mask[0, 0] and not mask[-1, -1] and mask[height // 2, width // 2]
    assert 0.5 < mask.mean() < 0.85  # a circle cut at top and bottom, inside a 3:2 frame

    transform = build_dino_views(ViewsConfig(domain="ophthalmology", **SIZES), 3, MEAN3, STD3)
    black = ((torch.zeros(3) - torch.tensor(MEAN3)) / torch.tensor(STD3)).view(3, 1)
    prepared = prepare_image(fundus, 3, with_fov_mask=True)
    outside_total = 0
    for seed in SEEDS:
        views = _views(transform, fundus, seed)
        for position, (view_transform, view) in enumerate(zip(transform.transforms, views, strict=True)):
            # Replaying the same draws moves the mask as the view's crop, flip and rotation moved the image.
            with seeded_rng(seed):
                for earlier in transform.transforms[:position]:
                    earlier(prepared)
                _, moved_mask = view_transform.geometric(prepared.image, prepared.mask)
            outside = ~moved_mask[0].bool()
            assert (view[:, outside] == black).all()  # exactly black after colour jitter, blur and normalisation
            inside_black = (view[:, ~outside] == black).all(dim=0)
            assert inside_black.float().mean() < 0.01
            outside_total += int(outside.sum())
    assert outside_total > 0


def synthetic_bscan(width: int = 256, height: int = 128, seed: int = 0) -> Image.Image:
    """A B-scan-like grey image (no OCT data is available here): bright layered bands that curve like a retina
    over a dark vitreous, with multiplicative speckle."""
    rng = np.random.default_rng(seed)
    x = np.arange(width)
    surface = height * 0.3 + 10 * np.cos(2 * np.pi * x / width)  # the inner retina's top edge
    depth = np.arange(height)[:, None] - surface[None, :]
    layers = np.where((depth > 0) & (depth < 40), 0.4 + 0.4 * (np.sin(depth / 3.0) > 0), 0.05)
    layers = np.where((depth >= 40) & (depth < 46), 0.95, layers)  # the bright RPE band
    speckled = layers * rng.gamma(4.0, 0.25, size=layers.shape)
    return Image.fromarray((np.clip(speckled, 0, 1) * 255).astype(np.uint8), mode="L")


def test_oct_views_keep_layers_upright_and_add_speckle() -> None:
    from medfoundry.transforms.ophthalmology import RandomSpeckle

    bscan = synthetic_bscan()
    config = ViewsConfig(domain="oct", global_crop_size=64, global_crop_scale=(0.9, 1.0), rotation_prob=0.0)
    assert config.vflip_prob == 0.0 and config.rot90_prob == 0.0 and config.color_jitter_prob == 0.0
    assert config.speckle_sigma == DOMAIN_PRESETS["oct"]["speckle_sigma"] > 0
    two = build_two_views(config, 1, [0.5], [0.25])
    for seed in SEEDS:
        for view in _views(two, bscan, seed):
            assert view.shape == (1, 64, 64)
            rows = view[0].mean(dim=1)
            # The vitreous (dark) stays above the retina: no view is upside down.
            assert rows[:8].mean() < rows[24:48].mean(), rows
    # Speckle: same seed and draws, with and without it; the noise is multiplicative (dark stays dark).
    quiet = ViewsConfig(domain="oct", global_crop_size=64, speckle_sigma=0.0)
    torch.manual_seed(0)
    clean = torch.rand(1, 32, 32)
    clean[:, :8] = 0.0
    torch.manual_seed(1)
    noisy = RandomSpeckle(0.5)(clean)
    assert torch.equal(noisy[:, :8], clean[:, :8]) and not torch.equal(noisy, clean)
    assert noisy.min() >= 0 and noisy.max() <= 1
    assert _same(_views(two, bscan, 7), _views(build_two_views(config, 1, [0.5], [0.25]), bscan, 7))
    assert not _same(_views(two, bscan, 7), _views(build_two_views(quiet, 1, [0.5], [0.25]), bscan, 7))


@pytest.mark.parametrize("domain", ["pathology", "radiology", "ophthalmology"])
def test_views_are_reproducible_per_seed(domain: str, he_tile: Image.Image, cxr_rgb: Image.Image, fundus) -> None:
    image, in_chans = {"pathology": (he_tile, 3), "radiology": (cxr_rgb, 1), "ophthalmology": (fundus, 3)}[domain]
    config = ViewsConfig(domain=domain, global_crop_size=64, local_crop_size=32, n_local_views=2)
    mean, std = MEAN3[:in_chans], STD3[:in_chans]
    for build in (build_dino_views, build_two_views):
        transform = build(config, in_chans, mean, std)
        first = _views(transform, image, 3, 1, 5)
        assert _same(first, _views(build(config, in_chans, mean, std), image, 3, 1, 5))
        for other in ((4, 1, 5), (3, 2, 5), (3, 1, 6)):
            again = _views(transform, image, *other)
            assert all(not torch.equal(a, b) for a, b in zip(first, again, strict=True))


def test_cli_domain_and_stop_on_collapse_reach_the_run(breastmnist_npz: Path, tmp_path: Path) -> None:
    overrides = pretrain_overrides("pathology", True, ["pretrain.views.domain=radiology"])
    config = load_config(ExperimentConfig, None, overrides)
    assert config.pretrain.views.domain == "radiology" and config.pretrain.stop_on_collapse  # -s wins

    # A real (tiny) run: radiology views on the bundled 1-channel BreastMNIST (its 78 val images), 4 SimCLR steps.
    args = ["pretrain", "--domain", "radiology", "--stop-on-collapse", "-o", str(tmp_path)]
    settings = ["pretrain.method=simclr", "pretrain.epochs=1", "pretrain.batch_size=16", "pretrain.tensorboard=false"]
    settings += [f"data.source={breastmnist_npz}", "data.pretrain_split=val", "pretrain.views.gamma_range=[0.8,1.25]"]
    result = CliRunner().invoke(app, [*args, *(item for setting in settings for item in ("-s", setting))])
    assert result.exit_code == 0, (result.output, result.exception)
    stored = json.loads((tmp_path / "pretrain" / "encoder" / "config.json").read_text())["pretrain_config"]
    assert stored["stop_on_collapse"] is True
    assert stored["views"]["domain"] == "radiology" and stored["views"]["gamma_range"] == [0.8, 1.25]
    assert stored["views"]["window_width_range"] == [0.7, 1.3]


def test_cli_method_and_data_pretrain_on_a_slide(shared_data: Path, tmp_path: Path) -> None:
    """`medfoundry pretrain --method ibot --data wsi:slide --domain pathology` on the real CMU-1 slide's tiles."""
    slide = shared_data / "wsi_samples" / "CMU-1-Small-Region.svs"
    args = ["pretrain", "--method", "ibot", "--data", f"wsi:{slide}", "--domain", "pathology", "-o", str(tmp_path)]
    settings = ["model.in_chans=3", "pretrain.epochs=1", "pretrain.batch_size=16", "pretrain.tensorboard=false"]
    settings += ["pretrain.views.n_local_views=2", "pretrain.ibot.out_dim=128"]
    result = CliRunner().invoke(app, [*args, *(item for setting in settings for item in ("-s", setting))])
    assert result.exit_code == 0, (result.output, result.exception)
    stored = json.loads((tmp_path / "pretrain" / "encoder" / "config.json").read_text())
    assert stored["ssl_method"] == "ibot" and stored["pretrain_config"]["views"]["hed_scale"] > 0
    assert "CMU-1-Small-Region.svs" in stored["data"]
