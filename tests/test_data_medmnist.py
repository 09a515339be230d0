"""MedMNIST npz reader on the bundled real BreastMNIST file and files derived from it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medfoundry.data.medmnist import load_medmnist_npz
from medfoundry.data.sample import ArrayImageSet
from medfoundry.errors import DataError


@pytest.fixture(scope="module")
def breast(breastmnist_npz: Path) -> dict[str, np.ndarray]:
    with np.load(breastmnist_npz) as data:
        return {key: data[key] for key in data.files}


def _save(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def _expect_error(path: Path, *fragments: str, **kwargs: object) -> DataError:
    with pytest.raises(DataError) as info:
        load_medmnist_npz(path, **kwargs)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return info.value


def test_breastmnist_splits_shapes_and_labels(breastmnist_npz: Path) -> None:
    splits = load_medmnist_npz(breastmnist_npz)
    assert list(splits) == ["train", "val", "test"]
    sizes = {name: len(split) for name, split in splits.items()}
    assert sizes == {"train": 546, "val": 78, "test": 156}
    train = splits["train"]
    assert isinstance(train, ArrayImageSet)
    assert train.images.shape == (546, 1, 28, 28) and train.images.dtype == np.uint8
    assert train.labels is not None and train.labels.dtype == np.int64
    assert np.bincount(train.labels).tolist() == [147, 399]
    assert np.bincount(splits["test"].labels).tolist() == [42, 114]
    assert train.ids[:2] == ["train_00000", "train_00001"] and train.patient_ids == train.ids
    assert train.load(3).shape == (1, 28, 28) and train.num_channels == 1
    assert train.name == "breastmnist:train"


def test_fingerprint_is_stable_and_label_sensitive(breastmnist_npz: Path, tmp_path: Path, breast: dict) -> None:
    first = load_medmnist_npz(breastmnist_npz)["train"].fingerprint()
    assert load_medmnist_npz(breastmnist_npz)["train"].fingerprint() == first
    flipped = dict(breast, train_labels=1 - breast["train_labels"])
    changed = load_medmnist_npz(_save(tmp_path / "breastmnist.npz", **flipped))["train"]
    assert changed.fingerprint() != first


def test_column_labels_and_partial_splits(tmp_path: Path, breast: dict) -> None:
    path = _save(tmp_path / "b.npz", test_images=breast["test_images"], test_labels=breast["test_labels"][:, None])
    splits = load_medmnist_npz(path)
    assert list(splits) == ["test"]
    assert splits["test"].labels.shape == (156,)
    assert np.bincount(splits["test"].labels).tolist() == [42, 114]


def test_multilabel_kept(tmp_path: Path, breast: dict) -> None:
    labels = breast["val_labels"]
    multi = np.stack([labels, 1 - labels, labels], axis=1)
    path = _save(tmp_path / "m.npz", val_images=breast["val_images"], val_labels=multi)
    split = load_medmnist_npz(path)["val"]
    assert split.labels.shape == (78, 3) and split.labels.dtype == np.int64
    np.testing.assert_array_equal(split.labels[:, 1], 1 - labels)


def test_rgb_images_become_channels_first(tmp_path: Path, breast: dict) -> None:
    images = breast["val_images"]
    rgb = np.stack([images, images // 2, 255 - images], axis=-1)  # (N, 28, 28, 3)
    path = _save(tmp_path / "dermamnist.npz", val_images=rgb, val_labels=breast["val_labels"])
    split = load_medmnist_npz(path)["val"]
    assert split.images.shape == (78, 3, 28, 28)
    np.testing.assert_array_equal(split.load(5)[1], images[5] // 2)


def _volumes(breast: dict, depth: int = 4) -> np.ndarray:
    # Real slices stacked into small volumes: (N, D, H, W).
    images = breast["train_images"][: 10 * depth]
    return images.reshape(10, depth, 28, 28)


def test_3d_volumes_by_name_and_by_shape(tmp_path: Path, breast: dict) -> None:
    volumes = _volumes(breast)
    labels = np.arange(10) % 2
    named = load_medmnist_npz(_save(tmp_path / "organmnist3d_64.npz", train_images=volumes, train_labels=labels))
    assert named["train"].images.shape == (10, 1, 4, 28, 28)
    # Without a 3d name, a last axis of 28 (not 1 or 3) still means a volume.
    plain = load_medmnist_npz(_save(tmp_path / "vol.npz", train_images=volumes, train_labels=labels))
    assert plain["train"].images.shape == (10, 1, 4, 28, 28)


def test_ndim_disambiguates_three_wide_volumes(tmp_path: Path, breast: dict) -> None:
    thin = breast["train_images"][:10, :, :3]  # (10, 28, 3): looks like channels-last
    volumes = np.stack([thin] * 2, axis=1)  # (10, 2, 28, 3)
    path = _save(tmp_path / "thin.npz", train_images=volumes, train_labels=np.zeros(10))
    assert load_medmnist_npz(path)["train"].images.shape == (10, 3, 2, 28)
    assert load_medmnist_npz(path, ndim=3)["train"].images.shape == (10, 1, 2, 28, 3)
    assert load_medmnist_npz(path, name="x3d")["train"].images.shape == (10, 1, 2, 28, 3)


def test_missing_file(tmp_path: Path) -> None:
    _expect_error(tmp_path / "nope.npz", "not found")


def test_not_an_npz(tmp_path: Path) -> None:
    path = tmp_path / "text.npz"
    path.write_text("train_images,train_labels\n1,2\n")
    _expect_error(path, "not a readable .npz")


def test_truncated_npz(tmp_path: Path, breastmnist_npz: Path) -> None:
    path = tmp_path / "truncated.npz"
    path.write_bytes(breastmnist_npz.read_bytes()[:200_000])
    _expect_error(path, "npz")


def test_npy_instead_of_npz(tmp_path: Path, breast: dict) -> None:
    path = tmp_path / "images.npz"
    with path.open("wb") as handle:
        np.save(handle, breast["val_images"])
    _expect_error(path, ".npy")


def test_no_expected_keys_lists_found_keys(tmp_path: Path, breast: dict) -> None:
    path = _save(tmp_path / "odd.npz", x=breast["val_images"], y=breast["val_labels"])
    _expect_error(path, "train_images", "keys in the file: x, y")


def test_missing_labels_key(tmp_path: Path, breast: dict) -> None:
    path = _save(tmp_path / "nolabels.npz", val_images=breast["val_images"])
    _expect_error(path, "no val_labels")


def test_length_mismatch_names_split_and_lengths(tmp_path: Path, breast: dict) -> None:
    path = _save(tmp_path / "short.npz", val_images=breast["val_images"], val_labels=breast["val_labels"][:70])
    _expect_error(path, "'val'", "78 images", "70 labels")


def test_nan_in_images(tmp_path: Path, breast: dict) -> None:
    images = breast["test_images"].astype(np.float32)
    images[17, 3, 4] = np.nan
    path = _save(tmp_path / "nan.npz", test_images=images, test_labels=breast["test_labels"])
    _expect_error(path, "test_images", "NaN or inf", "index 17")


def test_inf_in_labels(tmp_path: Path, breast: dict) -> None:
    labels = breast["val_labels"].astype(np.float64)
    labels[9] = np.inf
    path = _save(tmp_path / "inf.npz", val_images=breast["val_images"], val_labels=labels)
    _expect_error(path, "val_labels", "index 9")


def test_constant_images_rejected_unless_allowed(tmp_path: Path, breast: dict) -> None:
    images = breast["val_images"].copy()
    images[[4, 11]] = 0
    path = _save(tmp_path / "blank.npz", val_images=images, val_labels=breast["val_labels"])
    _expect_error(path, "2 constant image(s)", "[4, 11]", "allow_constant_images")
    assert len(load_medmnist_npz(path, allow_constant_images=True)["val"]) == 78


def test_unsupported_shape(tmp_path: Path, breast: dict) -> None:
    path = _save(
        tmp_path / "flat.npz",
        val_images=breast["val_images"].reshape(78, -1),
        val_labels=breast["val_labels"],
    )
    _expect_error(path, "unsupported shape (78, 784)")


def test_negative_labels_rejected(tmp_path: Path, breast: dict) -> None:
    # A -1 ("unknown") used to pass as a class index and index the last class downstream.
    labels = breast["val_labels"].astype(np.int64).reshape(-1)
    labels[[6, 30]] = -1
    path = _save(tmp_path / "neg.npz", val_images=breast["val_images"], val_labels=labels)
    _expect_error(path, "val_labels", "2 negative label(s)", "index 6")
    multilabel = np.zeros((78, 3), dtype=np.int64)
    multilabel[12, 2] = -1
    path = _save(tmp_path / "negml.npz", val_images=breast["val_images"], val_labels=multilabel)
    _expect_error(path, "val_labels", "1 negative label(s)", "index 12")


def test_complex_images_and_labels_rejected(tmp_path: Path, breast: dict) -> None:
    # Casting to float would keep the real part only (raw k-space saved instead of magnitudes).
    images = breast["val_images"].astype(np.complex64) * (1 + 1j)
    path = _save(tmp_path / "complex.npz", val_images=images, val_labels=breast["val_labels"])
    _expect_error(path, "val_images", "complex")
    path = _save(tmp_path / "clabels.npz", val_images=breast["val_images"], val_labels=breast["val_labels"] + 0j)
    _expect_error(path, "val_labels", "complex")
    with pytest.raises(DataError, match="complex"):
        ArrayImageSet("k", Path("k.npz"), images[:, None], ["a"] * 78, ["a"] * 78)
