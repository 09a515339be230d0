"""Embedding into HDF5: content, hash-keyed reuse and recomputation, preprocessing, and file-based images."""

from __future__ import annotations

import csv
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from threadpoolctl import threadpool_limits

from medfoundry.data.manifest import FileImageSet, load_manifest
from medfoundry.data.registry import load_dataset
from medfoundry.data.sample import ArrayImageSet, ImageSet
from medfoundry.errors import DataError
from medfoundry.models.backbones import Encoder, create_encoder
from medfoundry.models.checkpoint import weights_hash
from medfoundry.models.features import embed, read_embeddings

torch.set_num_threads(1)
threadpool_limits(1)

HASH_ATTRS = ("weights_hash", "preprocessing_hash", "data_hash")


@pytest.fixture(scope="module")
def test_split(breastmnist_npz: Path) -> ImageSet:
    return load_dataset(breastmnist_npz)["test"]


@pytest.fixture(scope="module")
def vit() -> Encoder:
    return create_encoder("vit_tiny_28", in_chans=1, seed=0)


@pytest.fixture(scope="module")
def cached(vit: Encoder, test_split: ImageSet, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test split embedded once into an HDF5 file (tests that change the file copy it first)."""
    path = tmp_path_factory.mktemp("embed") / "test.h5"
    result = embed(vit, test_split, path, batch_size=64)
    assert not result.reused
    return path


def _copy(src: Path, dst: Path) -> Path:
    dst.write_bytes(src.read_bytes())
    return dst


def _attrs(path: Path) -> dict[str, object]:
    with h5py.File(path, "r") as h5:
        return dict(h5.attrs)


@torch.inference_mode()
def _plain_forward(encoder: Encoder, x: torch.Tensor) -> np.ndarray:
    return encoder.backbone.eval()(x).numpy()


def test_hdf5_content(cached: Path, vit: Encoder, test_split: ImageSet) -> None:
    with h5py.File(cached, "r") as h5:
        features = h5["features"][()]
        assert features.shape == (156, 192)
        assert features.dtype == np.float32
        assert np.isfinite(features).all() and features.std() > 0
        ids = [v.decode() for v in h5["ids"][()]]
        assert ids == test_split.ids and ids[0] == "test_00000"
        assert [v.decode() for v in h5["patient_ids"][()]] == test_split.patient_ids
        np.testing.assert_array_equal(h5["labels"][()], test_split.labels)
        attrs = dict(h5.attrs)
    assert all(isinstance(attrs[name], str) and len(attrs[name]) == 16 for name in HASH_ATTRS)
    assert attrs["weights_hash"] == weights_hash(vit.backbone)
    assert attrs["data_hash"] == test_split.fingerprint()
    assert int(attrs["embed_dim"]) == 192


def test_second_call_reuses_the_file(cached: Path, vit: Encoder, test_split: ImageSet) -> None:
    mtime = cached.stat().st_mtime_ns
    again = embed(vit, test_split, cached)
    assert again.reused
    assert cached.stat().st_mtime_ns == mtime
    stored, _ = read_embeddings(cached)
    np.testing.assert_array_equal(again.features, stored.features)
    assert again.ids == test_split.ids
    np.testing.assert_array_equal(again.labels, test_split.labels)


def test_other_weights_recompute(cached: Path, vit: Encoder, test_split: ImageSet, tmp_path: Path) -> None:
    path = _copy(cached, tmp_path / "test.h5")
    other = create_encoder("vit_tiny_28", in_chans=1, seed=1)
    result = embed(other, test_split, path)
    assert not result.reused
    new, old = _attrs(path), _attrs(cached)
    assert new["weights_hash"] != old["weights_hash"]
    assert (new["preprocessing_hash"], new["data_hash"]) == (old["preprocessing_hash"], old["data_hash"])
    assert not np.allclose(read_embeddings(path)[0].features, read_embeddings(cached)[0].features)
    assert embed(other, test_split, path).reused  # and the new file is reused in turn


def test_other_pool_recomputes(cached: Path, test_split: ImageSet, tmp_path: Path) -> None:
    path = _copy(cached, tmp_path / "test.h5")
    pooled = create_encoder("vit_tiny_28", in_chans=1, seed=0, pool="token+avg")
    result = embed(pooled, test_split, path)
    assert not result.reused and result.features.shape == (156, 384)
    new, old = _attrs(path), _attrs(cached)
    assert new["preprocessing_hash"] != old["preprocessing_hash"]
    assert new["weights_hash"] == old["weights_hash"]  # same network, only the pooling differs
    assert read_embeddings(path)[0].features.shape == (156, 384)


def test_other_precision_recomputes(cached: Path, vit: Encoder, test_split: ImageSet, tmp_path: Path) -> None:
    path = _copy(cached, tmp_path / "test.h5")
    result = embed(vit, test_split, path, bf16=True)
    assert not result.reused  # fp32 features are not bf16 features
    new, old = _attrs(path), _attrs(cached)
    assert new["preprocessing_hash"] != old["preprocessing_hash"]
    assert '"autocast": "bf16"' in str(new["preprocessing"])
    assert not np.array_equal(read_embeddings(path)[0].features, read_embeddings(cached)[0].features)
    assert embed(vit, test_split, path, bf16=True).reused
    assert not embed(vit, test_split, path).reused  # and back to fp32: the fp32 key again
    assert _attrs(path)["preprocessing_hash"] == old["preprocessing_hash"]


def test_other_data_recomputes(cached: Path, vit: Encoder, test_split: ImageSet, tmp_path: Path) -> None:
    path = _copy(cached, tmp_path / "test.h5")
    subset = test_split.subset(np.arange(0, 156, 4))
    result = embed(vit, subset, path)
    assert not result.reused
    assert _attrs(path)["data_hash"] != _attrs(cached)["data_hash"]
    stored, _ = read_embeddings(path)
    assert stored.ids == subset.ids and len(stored.ids) == 39
    # Same network, same images: the subset's rows equal the matching rows of the full split.
    np.testing.assert_allclose(stored.features, read_embeddings(cached)[0].features[::4], rtol=0, atol=1e-5)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "missing dataset"])
def test_corrupt_cache_is_recomputed(
    cached: Path, vit: Encoder, test_split: ImageSet, tmp_path: Path, damage: str
) -> None:
    path = _copy(cached, tmp_path / "test.h5")
    if damage == "garbage":
        path.write_bytes(b"not an hdf5 file\n" * 100)
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:2000])
    else:
        with h5py.File(path, "a") as h5:
            del h5["features"]
    result = embed(vit, test_split, path)
    assert not result.reused
    stored, attrs = read_embeddings(path)
    np.testing.assert_array_equal(stored.features, read_embeddings(cached)[0].features)
    assert attrs["weights_hash"] == weights_hash(vit.backbone)


def test_a_file_of_an_older_layout_is_named_and_recomputed(
    cached: Path, vit: Encoder, test_split: ImageSet, tmp_path: Path
) -> None:
    path = _copy(cached, tmp_path / "old.h5")
    with h5py.File(path, "a") as h5:  # a layout without patient ids, hashes intact
        del h5["patient_ids"]
    with pytest.raises(DataError, match=r"lacks dataset\(s\) patient_ids") as info:
        read_embeddings(path)
    assert "old.h5" in str(info.value)
    assert not embed(vit, test_split, path).reused
    assert read_embeddings(path)[0].patient_ids == test_split.patient_ids


def test_features_equal_a_plain_forward(cached: Path, vit: Encoder, test_split: ImageSet) -> None:
    images = torch.from_numpy(test_split.images).float() / 255.0
    expected = _plain_forward(vit, (images - 0.5) / 0.5)
    stored, _ = read_embeddings(cached)
    np.testing.assert_allclose(stored.features, expected, rtol=0, atol=1e-5)


def test_grey_images_are_replicated_for_rgb_encoders(test_split: ImageSet) -> None:
    rgb = create_encoder("vit_tiny_28", in_chans=3, seed=0)
    subset = test_split.subset(np.arange(20))
    grey = embed(rgb, subset, batch_size=8)
    assert grey.features.shape == (20, 192)
    replicated = ArrayImageSet("rgb", Path("rgb"), np.repeat(test_split.images[:20], 3, axis=1), subset.ids, subset.ids)
    np.testing.assert_allclose(grey.features, embed(rgb, replicated).features, rtol=0, atol=1e-5)


def test_rgb_images_into_a_grey_encoder_raise(vit: Encoder, test_split: ImageSet) -> None:
    rgb = np.repeat(test_split.images[:4], 3, axis=1)
    images = ArrayImageSet("rgb", Path("rgb.npz"), rgb, ["a", "b", "c", "d"], ["a", "b", "c", "d"])
    with pytest.raises(DataError, match="images have 3 channels but the encoder expects 1") as info:
        embed(vit, images)
    assert "rgb.npz" in str(info.value)


def test_file_images_through_the_dataloader(shared_data: Path, tmp_path: Path) -> None:
    folder = shared_data / "kermany_cxr_224_trainsubset"
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent")
    files = [(p, 0) for p in sorted((folder / "NORMAL").glob("*.jpeg"))[:4]]
    files += [(p, 1) for p in sorted((folder / "PNEUMONIA").glob("*.jpeg"))[:4]]
    manifest = tmp_path / "kermany.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "patient_id", "split"])
        for path, label in files:
            writer.writerow([path, label, path.stem.split("_")[0], "test"])
    images = load_manifest(manifest)["test"]
    assert isinstance(images, FileImageSet) and len(images) == 8
    assert images.load(0).shape == (3, 224, 224)

    encoder = create_encoder("vit_tiny_28", in_chans=3, seed=0)
    out = tmp_path / "kermany.h5"
    # batch_size 3: two full batches and a partial one through torch's DataLoader.
    result = embed(encoder, images, out, batch_size=3, num_workers=0)
    assert not result.reused and result.features.shape == (8, 192)
    np.testing.assert_array_equal(result.labels, [0, 0, 0, 0, 1, 1, 1, 1])
    assert result.patient_ids[4].startswith("person")

    pixels = torch.from_numpy(np.stack([images.load(i) for i in range(8)])).float() / 255.0
    x = F.interpolate((pixels - 0.5) / 0.5, size=(28, 28), mode="bilinear", antialias=True, align_corners=False)
    np.testing.assert_allclose(result.features, _plain_forward(encoder, x), rtol=0, atol=1e-5)
    assert embed(encoder, images, out, batch_size=3).reused
