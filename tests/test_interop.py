"""`wsi export-features`: CLAM, TRIDENT and eva layouts, read back the way those tools read them.

The readers below follow the tools' own code: CLAM's ``Generic_MIL_Dataset.__getitem__`` (``pt_files/<id>.pt``
with ``torch.load``, ``h5_files/<id>.h5`` ``features``/``coords``) and ``Whole_Slide_Bag_FP`` (``coords`` attrs
``patch_level``, ``patch_size``); eva's ``EmbeddingsDataset._load_manifest`` (CSV filtered on ``split``) with
``EmbeddingsClassificationDataset.load_embeddings`` (``torch.load(...).squeeze(0)``) and
``MultiEmbeddingsClassificationDataset`` (rows grouped by ``wsi_id``, tensors stacked to N x D).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medfoundry.cli.wsi import app as wsi_app
from medfoundry.errors import DataError
from medfoundry.wsi import embed_slides, tile_slides
from medfoundry.wsi.interop import export_features

STEM = "CMU-1-Small-Region"
MODEL = "vit_tiny_64"


@pytest.fixture(scope="module")
def slide_features(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    slide = shared_data / "wsi_samples" / f"{STEM}.svs"
    if not slide.is_file():
        pytest.skip(f"{slide.name} not in the shared data")
    tiles = tmp_path_factory.mktemp("tiles")
    assert tile_slides([slide], tiles, mpp=2.0, tile_size=64).ok
    out = tmp_path_factory.mktemp("features")
    summary = embed_slides(tiles / "patches", MODEL, out, slides=[slide], batch_size=16, num_workers=0, progress=False)
    assert not summary.failed
    return tiles / "patches", out


def _labels(path: Path, split: str = "train") -> Path:
    path.write_text(f"slide_id,patient_id,label,split\n{STEM},p1,tumour,{split}\n")
    return path


def _eva_manifest(root: Path, split: str) -> list[dict[str, str]]:
    with (root / "manifest.csv").open(newline="") as handle:
        return [row for row in csv.DictReader(handle) if row["split"] == split]


def test_our_patches_and_features_carry_clams_coords_attributes(slide_features: tuple[Path, Path]) -> None:
    patches, features = slide_features
    with h5py.File(patches / f"{STEM}.h5", "r") as h5:
        # As CLAM's extract_features_fp / Whole_Slide_Bag_FP read a patches file.
        level, size = int(h5["coords"].attrs["patch_level"]), int(h5["coords"].attrs["patch_size"])
        assert level == int(h5["coords"].attrs["level"]) and size == 64
        assert len(h5["coords"].attrs["downsample"]) == 2 and len(h5["coords"].attrs["level_dim"]) == 2
    with h5py.File(features / f"{STEM}.h5", "r") as h5:
        assert int(h5["coords"].attrs["patch_level"]) == level
        assert h5["coords"].attrs["patch_size_level0"] == h5.attrs["patch_size_level0"]


def test_clam_layout(slide_features: tuple[Path, Path], tmp_path: Path) -> None:
    _, features = slide_features
    out = tmp_path / "clam"
    export_features([features], out, "clam", labels_csv=_labels(tmp_path / "labels.csv"))
    with h5py.File(features / f"{STEM}.h5", "r") as h5:
        ours, our_coords = h5["features"][:], h5["coords"][:]
        read_size = int(h5["coords"].attrs["read_size"])
    bag = torch.load(out / "pt_files" / f"{STEM}.pt", weights_only=True)
    assert isinstance(bag, torch.Tensor) and bag.dtype == torch.float32
    np.testing.assert_array_equal(bag.numpy(), ours)
    with h5py.File(out / "h5_files" / f"{STEM}.h5", "r") as hdf5_file:
        features_h5, coords = hdf5_file["features"][:], hdf5_file["coords"][:]
        attrs = hdf5_file["coords"].attrs
        # CLAM's patch_size is read at patch_level: the pixels our tiles were read with.
        assert int(attrs["patch_size"]) == read_size and int(attrs["target_patch_size"]) == 64
        assert attrs["name"] == STEM and {"patch_level", "downsample", "level_dim"} <= set(attrs)
    np.testing.assert_array_equal(torch.from_numpy(features_h5).numpy(), ours)
    np.testing.assert_array_equal(coords, our_coords)
    with (out / "dataset.csv").open(newline="") as handle:
        assert list(csv.DictReader(handle)) == [{"case_id": "p1", "slide_id": STEM, "label": "tumour"}]
    with (out / "splits_0.csv").open(newline="") as handle:
        assert next(csv.DictReader(handle))["train"] == STEM


def test_trident_layout_names_the_encoder_folder(slide_features: tuple[Path, Path], tmp_path: Path) -> None:
    _, features = slide_features
    result = CliRunner().invoke(
        wsi_app, ["export-features", str(features), "--out", str(tmp_path), "--layout", "trident"]
    )
    assert result.exit_code == 0, result.output
    with h5py.File(tmp_path / f"features_{MODEL}" / f"{STEM}.h5", "r") as h5:
        assert h5["features"].shape[0] == h5["coords"].shape[0] > 0
        attrs = h5["coords"].attrs
        assert int(attrs["patch_size"]) == 64 and "patch_size_level0" in attrs and "level0_magnification" in attrs


def test_eva_slide_manifest(slide_features: tuple[Path, Path], tmp_path: Path) -> None:
    _, features = slide_features
    export_features([features], tmp_path, "eva", labels_csv=_labels(tmp_path / "labels.csv", "val"))
    rows = _eva_manifest(tmp_path, "val")
    assert [r["wsi_id"] for r in rows] == [STEM] and rows[0]["target"] == "0" and rows[0]["origin"] == STEM
    bag = torch.load(tmp_path / rows[0]["embeddings"], map_location="cpu", weights_only=True)
    with h5py.File(features / f"{STEM}.h5", "r") as h5:
        np.testing.assert_array_equal(bag.numpy(), h5["features"][:])
    assert bag.ndim == 2
    assert json.loads((tmp_path / "classes.json").read_text()) == {"classes": ["tumour"]}


def test_eva_needs_slide_labels(slide_features: tuple[Path, Path], tmp_path: Path) -> None:
    with pytest.raises(DataError, match="--labels"):
        export_features([slide_features[1]], tmp_path, "eva")


def test_eva_patch_level_manifest_from_medfoundry_embed(breastmnist_npz: Path, tmp_path: Path) -> None:
    from medfoundry.cli import app

    files = []
    for split in ("val", "test"):  # 78 and 156 images at 28 px: a second or two with a tiny ViT
        path = tmp_path / "emb" / f"{split}.h5"
        args = ["embed", "-m", "vit_tiny_28", "-d", str(breastmnist_npz), "--split", split, "--out", str(path)]
        result = CliRunner().invoke(app, [*args, "--device", "cpu"])
        assert result.exit_code == 0, result.output
        files.append(path)
    out = tmp_path / "eva"
    result = CliRunner().invoke(wsi_app, ["export-features", *map(str, files), "--out", str(out), "--layout", "eva"])
    assert result.exit_code == 0, result.output
    rows = _eva_manifest(out, "test")
    with h5py.File(files[1], "r") as h5:
        expected, ids, labels = h5["features"][:], h5["ids"].asstr()[:], h5["labels"][:]
    assert [r["origin"] for r in rows] == list(ids) and [int(r["target"]) for r in rows] == labels.tolist()
    for row, vector in zip(rows, expected, strict=True):
        tensor = torch.load(out / row["embeddings"], map_location="cpu", weights_only=True).squeeze(0)
        assert tensor.shape == (192,)
        np.testing.assert_array_equal(tensor.numpy(), vector)
    assert len(_eva_manifest(out, "val")) == 78
    # CLAM and TRIDENT read slides only: one line saying so.
    wrong = CliRunner().invoke(wsi_app, ["export-features", str(files[0]), "--out", str(out), "--layout", "clam"])
    assert wrong.exit_code != 0 and "use --layout eva" in str(wrong.exception)


def test_embed_picks_cuda_when_present_and_rejects_an_absent_one() -> None:
    from medfoundry.cli.embed import embed_device
    from medfoundry.errors import MedfoundryError

    assert embed_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert embed_device("cpu").type == "cpu"
    with pytest.raises(MedfoundryError, match="cpu, cuda"):
        embed_device("tpu-ish")
    if not torch.cuda.is_available():
        with pytest.raises(MedfoundryError, match="no CUDA device"):
            embed_device("cuda")


def test_default_workers_scale_with_the_cores() -> None:
    from medfoundry.wsi.embedding import default_workers

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert [default_workers(cpu, n) for n in (1, 2, 4, 16, 64, 256)] == [0, 0, 1, 2, 8, 8]
    assert [default_workers(gpu, n) for n in (1, 2, 16, 64)] == [1, 1, 12, 32]
    assert default_workers(cpu) >= 0
