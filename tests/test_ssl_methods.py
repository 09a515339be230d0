"""Every registered SSL method on the shared trainer: the loss goes down, resume is exact, and the exported
encoder loads and embeds. Small real data: BreastMNIST training images, 28 px ViT (and one ResNet-18)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from medfoundry.adapt.knn import KNNProbe
from medfoundry.bench.run import build_encoder
from medfoundry.config import DinoConfig, ExperimentConfig, IBOTConfig, PretrainConfig, ViewsConfig, load_config
from medfoundry.data.medmnist import load_medmnist_npz
from medfoundry.data.registry import load_dataset
from medfoundry.data.wsi import load_wsi_tiles
from medfoundry.models.backbones import create_encoder
from medfoundry.models.checkpoint import load_encoder
from medfoundry.models.features import extract_features
from medfoundry.ssl.base import SSL_METHODS
from medfoundry.ssl.trainer import pretrain
from medfoundry.ssl.views import build_two_views, to_pil

REPO_ROOT = Path(__file__).resolve().parents[1]

COMMON = dict(
    batch_size=16,
    warmup_epochs=1,
    checkpoint_every_steps=2,
    log_every_steps=1,
    monitor_every_steps=8,
    tensorboard=False,
)
# Per method: settings under which its loss falls within ~30 steps of batch 16.
METHODS: dict[str, dict] = {
    "dino": dict(
        lr=5e-4,
        views=ViewsConfig(n_local_views=2),
        dino=DinoConfig(out_dim=128, hidden_dim=64, bottleneck_dim=32, warmup_teacher_temp_epochs=1),
    ),
    "ibot": dict(
        lr=5e-4,
        views=ViewsConfig(n_local_views=2),
        ibot=IBOTConfig(out_dim=128, hidden_dim=64, bottleneck_dim=32, warmup_teacher_temp_epochs=1),
    ),
    "simclr": dict(lr=1e-3),
    "mocov3": dict(lr=1e-3),
    "byol": dict(lr=1e-3),
}


# MAE is tested on BreastMNIST in test_ssl_mae.py; on the other real data it joins the rest here.
METHODS_ALL: dict[str, dict] = {**METHODS, "mae": dict(lr=1e-3)}
KERMANY = "kermany_cxr_224_trainsubset"
CMU1 = "wsi_samples/CMU-1-Small-Region.svs"


@pytest.fixture(scope="module")
def train_images(breastmnist_npz: Path):
    return load_medmnist_npz(breastmnist_npz)["train"]


def _config(method: str, epochs: int, bf16: bool = False) -> PretrainConfig:
    return PretrainConfig(method=method, epochs=epochs, bf16=bf16, **COMMON, **METHODS[method])


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_all_methods_are_registered() -> None:
    assert set(METHODS) <= set(SSL_METHODS)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_loss_goes_down(method: str, train_images, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    images = train_images.subset(np.arange(64), name="breast64")
    # bf16 autocast: about 1.3x faster here, and it covers the methods' fp32 loss paths under autocast.
    config = _config(method, 8, bf16=True)
    result = pretrain(images, create_encoder("vit_tiny_28", in_chans=1, seed=0), config, tmp_path, show_progress=False)
    assert result.finished and result.steps == 32
    losses = [json.loads(line)["loss"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 32 and all(np.isfinite(losses))
    # Every method's loss here falls early (BYOL's from about 0 towards -1 as the predictor catches up with the
    # target), so the plain first-vs-last comparison holds; each batch is different, hence means of five.
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < first, (first, last, losses)


@pytest.fixture(scope="module")
def kermany_xrays(shared_data: Path):
    """64 Kermany chest X-rays (32 normal, 32 pneumonia), grey, 28 px."""
    images = load_dataset(shared_data / KERMANY, channels=1, image_size=28)["train"]
    labels = np.asarray(images.labels)
    chosen = np.concatenate([np.flatnonzero(labels == c)[:32] for c in (0, 1)])
    return images.subset(chosen, name="kermany64")


@pytest.fixture(scope="module")
def slide_tiles(shared_data: Path):
    """64 tissue tiles of the CMU-1 slide, 56 px at 1 micrometre per pixel, RGB."""
    tiles = load_wsi_tiles(shared_data / CMU1, tile_size=56, mpp=1.0)["train"]
    return tiles.subset(np.linspace(0, len(tiles) - 1, 64).round().astype(int), name="cmu1-tiles64")


@pytest.mark.parametrize("method", sorted(METHODS_ALL))
@pytest.mark.parametrize("dataset", ["kermany", "slide"])
def test_every_method_learns_on_xrays_and_slide_tiles(
    method: str, dataset: str, kermany_xrays, slide_tiles, tmp_path: Path
) -> None:
    """Chest X-rays (1 channel, radiology views) and H&E tiles (3 channels, pathology views with stain jitter)."""
    torch.set_num_threads(1)
    images, channels, domain = (
        (kermany_xrays, 1, "radiology") if dataset == "kermany" else (slide_tiles, 3, "pathology")
    )
    settings = {**METHODS_ALL[method]}
    views = settings.pop("views", ViewsConfig()).model_dump(exclude_unset=True)
    config = PretrainConfig(
        method=method, epochs=8, bf16=True, views=ViewsConfig(domain=domain, **views), **COMMON, **settings
    )
    encoder = create_encoder("vit_tiny_28", in_chans=channels, seed=0)
    result = pretrain(images, encoder, config, tmp_path, show_progress=False)
    assert result.finished and result.steps == 32
    losses = [json.loads(line)["loss"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert all(np.isfinite(losses)) and np.mean(losses[-5:]) < np.mean(losses[:5]), losses
    exported = load_encoder(result.encoder_dir)
    assert json.loads((result.encoder_dir / "config.json").read_text())["pretrain_config"]["views"]["domain"] == domain
    features = extract_features(exported, images.subset(np.arange(8)))
    assert features.shape == (8, 192) and np.isfinite(features).all()


@pytest.mark.parametrize(
    "method, backbone, width",
    [(method, "vit_tiny_28", 192) for method in sorted(METHODS)] + [("simclr", "resnet18", 512)],
)
def test_resume_is_exact_and_export_embeds(method: str, backbone: str, width: int, train_images, tmp_path) -> None:
    """Stop after 3 of 4 steps (mid-epoch), resume, and match an uninterrupted run bit for bit.

    ResNet-18 is not in the loss test: at 28 px its loss stays within batch-to-batch noise for the first ~60
    steps, while here it checks batch-norm buffers and the ResNet path through every method hook.
    """
    torch.set_num_threads(1)
    images = train_images.subset(np.arange(32), name="breast32")
    config = _config(method, 2)

    def run(folder: str, stop: int | None = None):
        encoder = create_encoder(backbone, in_chans=1, img_size=28, seed=0)
        return pretrain(images, encoder, config, tmp_path / folder, stop_after_steps=stop, show_progress=False)

    full = run("full")
    part = run("split", stop=3)
    assert full.finished and full.steps == 4 and not part.finished
    resumed = run("split")
    assert resumed.resumed_from_step == 3 and resumed.finished

    a, b = _weights(full.encoder_dir), _weights(resumed.encoder_dir)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    init = create_encoder(backbone, in_chans=1, img_size=28, seed=0).backbone.state_dict()
    assert any(not torch.equal(init[key], a[key]) for key in a), "the exported encoder did not train"

    encoder = load_encoder(full.encoder_dir)
    assert json.loads((full.encoder_dir / "config.json").read_text())["ssl_method"] == method
    features = extract_features(encoder, images.subset(np.arange(8)))
    assert features.shape == (8, width) and np.isfinite(features).all()


@pytest.mark.parametrize("in_chans", [1, 3])
def test_two_views_are_normalised_global_crops(in_chans: int) -> None:
    config = ViewsConfig(global_crop_size=24)
    transform = build_two_views(config, in_chans, [0.5] * in_chans, [0.25] * in_chans)
    image = np.random.default_rng(0).integers(0, 256, (in_chans, 28, 28), dtype=np.uint8)
    views = transform(to_pil(image))
    assert len(views) == 2
    assert all(view.shape == (in_chans, 24, 24) and view.dtype == torch.float32 for view in views)
    # Normalised with the given mean/std: 0..1 pixels map into [-2, 2].
    assert all(view.min() >= -2.0 - 1e-6 and view.max() <= 2.0 + 1e-6 for view in views)


def test_pretrained_features_beat_random_weights_in_knn(breastmnist_npz: Path, tmp_path: Path) -> None:
    """SimCLR's recipe, 4 epochs (~30 s on one core): kNN accuracy on BreastMNIST test above the same ViT's with
    random weights (0.763 against 0.712 here, 8 of 156 images). The other methods need minutes to move kNN accuracy
    beyond noise on 156 test images; benchmarks/ssl_methods.py compares all of them at an equal budget."""
    torch.set_num_threads(1)
    splits = load_medmnist_npz(breastmnist_npz)
    train, test = splits["train"], splits["test"]
    config = load_config(
        ExperimentConfig,
        REPO_ROOT / "configs/pretrain/simclr.yaml",
        ["pretrain.epochs=4", "pretrain.warmup_fraction=0.25", "pretrain.tensorboard=false"],
    )

    def knn_accuracy(encoder) -> float:
        bank, queries = extract_features(encoder, train), extract_features(encoder, test)
        return float((KNNProbe().fit(bank, train.labels).predict(queries) == test.labels).mean())

    random_weights = knn_accuracy(build_encoder(config))
    unlabeled = train.subset(np.arange(len(train)))
    unlabeled.labels = None
    result = pretrain(unlabeled, build_encoder(config), config.pretrain, tmp_path, show_progress=False)
    trained = knn_accuracy(load_encoder(result.encoder_dir))
    assert trained >= random_weights + 0.03, (trained, random_weights)
