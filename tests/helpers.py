"""Helpers shared by several test modules (pytest puts this folder on sys.path: tests have no __init__.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from medfoundry.errors import DataError


def expect_data_error(call: Callable[[], object], path: Path, *fragments: str) -> None:
    """``call`` raises a one-line DataError naming ``path`` and containing every fragment."""
    with pytest.raises(DataError) as info:
        call()
    message = str(info.value)
    assert str(path) in message and "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message


def write_breastmnist_subset(source: Path, dest: Path, n_train: int) -> Path:
    """The bundled BreastMNIST with only its first ``n_train`` training images (val and test whole)."""
    archive = np.load(source)
    np.savez(
        dest,
        train_images=archive["train_images"][:n_train],
        train_labels=archive["train_labels"][:n_train],
        val_images=archive["val_images"],
        val_labels=archive["val_labels"],
        test_images=archive["test_images"],
        test_labels=archive["test_labels"],
    )
    return dest


def direct_tile_features(encoder, slide_path: Path, patches_file: Path) -> np.ndarray:  # noqa: ANN001
    """Features of a slide's tiles (as listed in a patches HDF5) by a plain forward pass, for comparison with
    what ``embed_slides`` wrote."""
    import torch

    from medfoundry.models.features import prepare_batch
    from medfoundry.wsi.embedding import plan_from_attrs
    from medfoundry.wsi.tiling import open_slide, read_patches, read_tile

    coords, attrs = read_patches(patches_file)
    handle = open_slide(slide_path)
    try:
        plan = plan_from_attrs(attrs, handle, patches_file)
        tiles = np.stack([np.asarray(read_tile(handle, corner, plan)).transpose(2, 0, 1) for corner in coords])
    finally:
        handle.close()
    with torch.inference_mode():
        return encoder(prepare_batch(encoder, torch.from_numpy(tiles))).numpy()
