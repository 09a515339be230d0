"""Pre-training on several real sources at once (BreastMNIST, Kermany chest X-rays, CMU-1 slide tiles), mixed
by stated weights, through the same trainer and the experiment API."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from medfoundry.bench.run import pretrain_images, run_pretraining
from medfoundry.config import ExperimentConfig, load_config
from medfoundry.data.medmnist import load_medmnist_npz
from medfoundry.data.mixture import MixedImageSet, MixtureSource, convert_channels
from medfoundry.data.registry import load_dataset
from medfoundry.errors import DataError
from medfoundry.models.checkpoint import load_encoder
from medfoundry.ssl.views import EpochBatchSampler

KERMANY = "kermany_cxr_224_trainsubset"
CMU1 = "wsi_samples/CMU-1-Small-Region.svs"


@pytest.fixture(scope="module")
def mixture(shared_data: Path, breastmnist_npz: Path) -> MixedImageSet:
    breast = load_medmnist_npz(breastmnist_npz)["train"]
    kermany = load_dataset(shared_data / KERMANY)["train"]
    tiles = load_dataset(shared_data / CMU1)["train"]
    return MixedImageSet(
        [
            MixtureSource(breast, 1.0, "breastmnist"),
            MixtureSource(kermany, 2.0, "kermany"),
            MixtureSource(tiles, 1.0, "cmu1"),
        ],
        channels=1,
    )


def test_each_epoch_draws_sources_by_weight(mixture: MixedImageSet) -> None:
    sizes = [len(s.images) for s in mixture.sources]
    order = mixture.epoch_order(torch.Generator().manual_seed(0))
    assert len(order) == len(mixture) == sum(sizes)
    counts = Counter(mixture.locate(i)[0] for i in order)
    # Weights 1:2:1 of the epoch's draws, whatever the sizes (546, 600 and ~40 tiles).
    shares = np.array([counts[k] for k in range(3)]) / len(order)
    assert np.allclose(shares, [0.25, 0.5, 0.25], atol=1e-3)
    # The small slide is repeated (each tile several times), the large sources are subsampled without repeats.
    tile_draws = Counter(i for i in order if mixture.locate(i)[0] == 2)
    assert len(tile_draws) == sizes[2] and max(tile_draws.values()) - min(tile_draws.values()) <= 1
    assert max(Counter(i for i in order if mixture.locate(i)[0] == 1).values()) == 1
    assert order != mixture.epoch_order(torch.Generator().manual_seed(1))


def test_repeated_draws_get_their_own_view_keys(mixture: MixedImageSet) -> None:
    sampler = EpochBatchSampler(len(mixture), 64, 1, seed=0, epoch_order=mixture.epoch_order)
    keys = [key for batch in sampler for key in batch]
    assert len(keys) == len(set(keys)) == sampler.steps_per_epoch * 64
    assert any(len(key) == 3 for key in keys)  # repeats carry their draw number


def test_images_are_converted_to_the_model_channels(mixture: MixedImageSet) -> None:
    grey = mixture.load(int(mixture.offsets[2]))  # an RGB slide tile, as grey
    assert grey.shape == (1, 224, 224) and grey.dtype == np.uint8
    rgb = np.stack([np.full((4, 4), 10), np.full((4, 4), 20), np.full((4, 4), 30)]).astype(np.uint8)
    assert convert_channels(rgb, 1)[0, 0, 0] == round(0.299 * 10 + 0.587 * 20 + 0.114 * 30)
    assert convert_channels(grey, 3).shape == (3, 224, 224)
    with pytest.raises(DataError, match="cannot convert an image with 4 channels"):
        convert_channels(np.zeros((4, 2, 2), np.uint8), 3)


def test_pretraining_on_a_mixture_from_a_recipe(shared_data: Path, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    recipe = tmp_path / "mix.yaml"
    recipe.write_text(
        f"""
output_dir: {tmp_path / "run"}
data:
  pretrain_sources:
    - {{source: data/breastmnist/breastmnist.npz, weight: 1}}
    - {{source: {shared_data / KERMANY}, weight: 1, options: {{image_size: 64}}}}
    - {{source: "wsi:{shared_data / CMU1}", weight: 0.5, options: {{tile_size: 112, mpp: 1.0}}}}
model: {{backbone: vit_tiny_28, img_size: 28, in_chans: 1}}
pretrain:
  method: simclr
  epochs: 1
  batch_size: 64
  lr: 0.001
  tensorboard: false
"""
    )
    config = load_config(ExperimentConfig, recipe)
    images, description = pretrain_images(config)
    assert "kermany" in description and "weight 0.20" in description  # 0.5 of 2.5
    result = run_pretraining(config, show_progress=False)
    assert result.finished and result.steps == len(images) // 64
    card = json.loads((result.encoder_dir / "config.json").read_text())
    assert "mixture of" in card["data"] and "CMU-1" in card["data"]
    assert load_encoder(result.encoder_dir).in_chans == 1


def test_a_single_source_is_converted_to_the_model_channels(shared_data: Path, tmp_path: Path, caplog) -> None:
    """Kermany's grey X-rays are stored as RGB files; MAE's plain view has no channel step of its own."""
    from medfoundry.config import PretrainConfig
    from medfoundry.models.backbones import create_encoder
    from medfoundry.ssl.trainer import pretrain

    torch.set_num_threads(1)
    rgb = load_dataset(shared_data / KERMANY, image_size=28)["train"].subset(np.arange(32))
    assert rgb.num_channels == 3
    config = PretrainConfig(method="mae", epochs=1, batch_size=16, tensorboard=False)
    with caplog.at_level("WARNING", logger="medfoundry.pretrain"):
        result = pretrain(rgb, create_encoder("vit_tiny_28", in_chans=1, seed=0), config, tmp_path, show_progress=False)
    assert result.finished and "converting them (RGB to grey by luma)" in caplog.text
