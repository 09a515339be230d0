"""`wsi embed` on the real CMU-1 slide: features equal a direct forward pass, resume after a kill, cache keys."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from helpers import direct_tile_features
from typer.testing import CliRunner

from medfoundry.cli.wsi import app as wsi_app
from medfoundry.models.backbones import create_encoder
from medfoundry.models.checkpoint import load_encoder_or_build, weights_hash
from medfoundry.models.feature_cache import temp_path
from medfoundry.models.features import prepare_batch
from medfoundry.wsi import embed_slides, open_slide, read_patches, read_tile, tile_slides
from medfoundry.wsi.embedding import plan_from_attrs

STEM = "CMU-1-Small-Region"
MODEL = "vit_tiny_64"  # random weights, seeded: the same network every time it is built


@pytest.fixture(scope="module")
def slide(shared_data: Path) -> Path:
    return shared_data / "wsi_samples" / f"{STEM}.svs"


@pytest.fixture(scope="module")
def patches(slide: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 2 um/px with 64 px tiles: 257 level-0 pixels per tile, about 30 tissue tiles; fast on a CPU.
    out = tmp_path_factory.mktemp("tiles")
    assert tile_slides([slide], out, mpp=2.0, tile_size=64).ok
    return out / "patches"


@pytest.fixture(scope="module")
def embedded(patches: Path, slide: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("features")
    summary = embed_slides(patches, MODEL, out, slides=[slide.parent], batch_size=8, num_workers=2, progress=False)
    assert [row["slide"] for row in summary.done] == [STEM] and not summary.failed
    return out


def test_features_match_a_direct_forward_pass(embedded: Path, patches: Path, slide: Path) -> None:
    expected = direct_tile_features(
        load_encoder_or_build(MODEL, in_chans=3, img_size=None).eval(), slide, patches / f"{STEM}.h5"
    )
    coords, _ = read_patches(patches / f"{STEM}.h5")
    with h5py.File(embedded / f"{STEM}.h5", "r") as h5:
        features, stored_coords, attrs = h5["features"][()], h5["coords"][()], dict(h5.attrs)
    assert features.dtype == np.float32 and features.shape == (len(coords), 192)
    assert np.array_equal(stored_coords, coords)
    assert np.abs(features - expected).max() < 1e-4
    encoder = load_encoder_or_build(MODEL, in_chans=3, img_size=None)
    assert attrs["weights_hash"] == weights_hash(encoder.backbone)
    assert attrs["encoder"] == MODEL and attrs["patch_size"] == 64 and attrs["mpp"] == 2.0
    state = json.loads((embedded / "state" / f"{STEM}.json").read_text())
    assert state["status"] == "done" and state["attempts"] == 1 and state["tiles"] == len(coords)
    assert state["last_error"] is None and len(state["durations"]) == 1
    summary = json.loads((embedded / "embed_summary.json").read_text())
    assert [row["slide"] for row in summary["done"]] == [STEM] and summary["skipped"] == summary["failed"] == []


def _copy(embedded: Path, tmp_path: Path) -> Path:
    out = tmp_path / "features"
    shutil.copytree(embedded, out)
    return out


def test_second_run_skips_the_slide(embedded: Path, patches: Path, tmp_path: Path) -> None:
    out = _copy(embedded, tmp_path)
    # No --slides: the slide is found through the path recorded in the patches file.
    result = CliRunner().invoke(
        wsi_app, ["embed", "--patches", str(patches), "--model", MODEL, "--out", str(out), "--num-workers", "0"]
    )
    assert result.exit_code == 0, result.output
    assert "already done" in result.output
    state = json.loads((out / "state" / f"{STEM}.json").read_text())
    assert state["status"] == "skipped" and state["attempts"] == 1
    summary = json.loads((out / "embed_summary.json").read_text())
    assert summary["done"] == [] and [row["slide"] for row in summary["skipped"]] == [STEM]


def test_a_killed_run_restarts_cleanly(embedded: Path, patches: Path, slide: Path, tmp_path: Path) -> None:
    out = _copy(embedded, tmp_path)
    final = out / f"{STEM}.h5"
    reference = h5py.File(final, "r")["features"][()]
    # What a kill mid-slide leaves: the temp file half written, the state still "running", no final file.
    final.unlink()
    temp_path(final).write_bytes(b"\x89HDF\r\n half a file")
    state_file = out / "state" / f"{STEM}.json"
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({**state, "status": "running", "attempts": 2}))
    summary = embed_slides(patches, MODEL, out, slides=[slide], batch_size=16, num_workers=0, progress=False)
    assert [row["slide"] for row in summary.done] == [STEM]
    assert not temp_path(final).exists()
    with h5py.File(final, "r") as h5:
        assert np.abs(h5["features"][()] - reference).max() < 1e-5
    state = json.loads(state_file.read_text())
    assert state["status"] == "done" and state["attempts"] == 3


def test_a_damaged_output_is_never_reused(embedded: Path, patches: Path, slide: Path, tmp_path: Path) -> None:
    out = _copy(embedded, tmp_path)
    final = out / f"{STEM}.h5"
    with h5py.File(final, "a") as h5:  # same hash, but fewer rows than tiles (as if written by a crashed tool)
        rows = h5["features"][:3]
        del h5["features"]
        h5["features"] = rows
    summary = embed_slides(patches, MODEL, out, slides=[slide], num_workers=0, progress=False)
    assert [row["slide"] for row in summary.done] == [STEM]
    final.write_bytes(b"not hdf5")
    summary = embed_slides(patches, MODEL, out, slides=[slide], num_workers=0, progress=False)
    assert [row["slide"] for row in summary.done] == [STEM]


def test_a_file_of_the_older_slide_layout_is_recomputed(
    embedded: Path, patches: Path, slide: Path, tmp_path: Path
) -> None:
    out = _copy(embedded, tmp_path)
    with h5py.File(out / f"{STEM}.h5", "a") as h5:  # before the one cache: the hash had its own name
        h5.attrs["encoder_weights_hash"] = h5.attrs.pop("weights_hash")
    summary = embed_slides(patches, MODEL, out, slides=[slide], num_workers=0, progress=False)
    assert [row["slide"] for row in summary.done] == [STEM] and not summary.skipped
    with h5py.File(out / f"{STEM}.h5", "r") as h5, h5py.File(embedded / f"{STEM}.h5", "r") as reference:
        assert dict(h5.attrs)["weights_hash"] == reference.attrs["weights_hash"]


def test_changed_weights_recompute(embedded: Path, patches: Path, slide: Path, tmp_path: Path) -> None:
    out = _copy(embedded, tmp_path)
    other = create_encoder(MODEL, seed=1)
    summary = embed_slides(patches, MODEL, out, slides=[slide], num_workers=0, encoder=other, progress=False)
    assert [row["slide"] for row in summary.done] == [STEM] and not summary.skipped
    with h5py.File(out / f"{STEM}.h5", "r") as h5:
        assert h5.attrs["weights_hash"] == weights_hash(other.backbone)


def test_bf16_stays_close_to_fp32(embedded: Path, patches: Path, slide: Path, tmp_path: Path) -> None:
    summary = embed_slides(patches, MODEL, tmp_path, slides=[slide], num_workers=0, bf16=True, progress=False)
    assert summary.done
    with h5py.File(tmp_path / f"{STEM}.h5", "r") as low, h5py.File(embedded / f"{STEM}.h5", "r") as full:
        assert low.attrs["bf16"] and np.isfinite(low["features"][()]).all()
        scale = np.abs(full["features"][()]).max()
        assert np.abs(low["features"][()] - full["features"][()]).max() < 0.1 * scale


def test_a_missing_slide_fails_alone(patches: Path, slide: Path, tmp_path: Path) -> None:
    folder = tmp_path / "patches"
    shutil.copytree(patches, folder)
    shutil.copy(folder / f"{STEM}.h5", folder / "lost-slide.h5")
    out = tmp_path / "features"
    summary = embed_slides(folder, MODEL, out, slides=[slide], num_workers=0, progress=False)
    assert [row["slide"] for row in summary.done] == [STEM]
    assert [row["slide"] for row in summary.failed] == ["lost-slide"] and summary.ok
    assert "lost-slide.h5" in summary.failed[0]["error"] and "no slide file" in summary.failed[0]["error"]
    state = json.loads((out / "state" / "lost-slide.json").read_text())
    assert state["status"] == "failed" and "no slide file" in state["last_error"]
    # Every slide failing exits 1.
    only_lost = tmp_path / "only_lost"
    only_lost.mkdir()
    shutil.copy(folder / "lost-slide.h5", only_lost)
    result = CliRunner().invoke(
        wsi_app,
        ["embed", "--patches", str(only_lost), "--slides", str(slide), "--model", MODEL, "--out", str(out),
         "--num-workers", "0"],
    )  # fmt: skip
    assert result.exit_code == 1 and "lost-slide" in result.output


def test_trident_style_patches_without_level_read_level_0(
    embedded: Path, patches: Path, slide: Path, tmp_path: Path
) -> None:
    coords, attrs = read_patches(patches / f"{STEM}.h5")
    folder = tmp_path / "trident"
    folder.mkdir()
    with h5py.File(folder / f"{STEM}.h5", "w") as h5:  # only TRIDENT's own attributes
        dataset = h5.create_dataset("coords", data=coords)
        for key in ("patch_size", "patch_size_level0", "target_magnification", "level0_magnification", "overlap"):
            dataset.attrs[key] = attrs[key]
    out = tmp_path / "features"
    assert embed_slides(folder, MODEL, out, slides=[slide], num_workers=0, progress=False).done
    with h5py.File(out / f"{STEM}.h5", "r") as ours, h5py.File(embedded / f"{STEM}.h5", "r") as reference:
        assert np.abs(ours["features"][()] - reference["features"][()]).max() < 1e-5


def test_worker_errors_become_one_line(tmp_path: Path) -> None:
    from torch.utils.data import DataLoader

    from medfoundry.wsi.embedding import SlideJob, SlideTiles, _one_line
    from medfoundry.wsi.tiling import ReadPlan

    gone = tmp_path / "gone.svs"
    tiles = SlideTiles(gone, np.zeros((2, 2), np.int64), ReadPlan(0, 1.0, 64, 64, 64, 0.5, 0.5))
    with pytest.raises(Exception) as error:  # noqa: PT011 - DataLoader re-raises the worker's DataError
        list(DataLoader(tiles, batch_size=2, num_workers=1))
    assert _one_line(error.value, SlideJob("gone", tmp_path / "gone.h5", gone)) == f"{gone}: slide not found"


def test_stain_normalised_embedding(embedded: Path, patches: Path, slide: Path, tmp_path: Path, shared_data) -> None:
    """`wsi stain-fit` on a real H&E tile, then `wsi embed --stain-reference`: the features are those of the
    normalised tiles, and the earlier un-normalised file is recomputed rather than reused."""
    from medfoundry.transforms.stain import MacenkoNormalizer

    reference_tile = next((shared_data / "nct_crc_he_100k_samples").rglob("NORM*.tif"))
    reference = tmp_path / "stain.json"
    runner = CliRunner()
    fitted = runner.invoke(wsi_app, ["stain-fit", str(reference_tile), "--out", str(reference)])
    assert fitted.exit_code == 0, fitted.output
    out = _copy(embedded, tmp_path)
    args = ["embed", "--patches", str(patches), "--model", MODEL, "--out", str(out), "--slides", str(slide)]
    result = runner.invoke(wsi_app, [*args, "--num-workers", "0", "--stain-reference", str(reference)])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "embed_summary.json").read_text())
    assert [row["slide"] for row in summary["done"]] == [STEM], "a differently normalised file must not be reused"

    normalizer = MacenkoNormalizer.load(reference)
    coords, attrs = read_patches(patches / f"{STEM}.h5")
    encoder = load_encoder_or_build(MODEL, in_chans=3, img_size=None).eval()
    handle = open_slide(slide)
    try:
        plan = plan_from_attrs(attrs, handle, patches)
        tiles = [normalizer.transform(np.asarray(read_tile(handle, corner, plan))) for corner in coords]
    finally:
        handle.close()
    with torch.inference_mode():
        expected = encoder(prepare_batch(encoder, torch.from_numpy(np.stack(tiles).transpose(0, 3, 1, 2)))).numpy()
    with h5py.File(out / f"{STEM}.h5", "r") as h5:
        assert h5.attrs["stain_normalisation"].startswith("macenko:")
        assert np.abs(h5["features"][()] - expected).max() < 1e-4
        with h5py.File(embedded / f"{STEM}.h5", "r") as plain:
            assert np.abs(h5["features"][()] - plain["features"][()]).max() > 1e-3


def test_mil_heatmaps_from_wsi_embed_output(embedded: Path, tmp_path: Path) -> None:
    """Features written by `wsi embed` carry what MIL heatmaps need: out-of-fold attention over the real slide."""
    import csv

    from PIL import Image

    from medfoundry.bench.engine import run_suite
    from medfoundry.config import AdaptConfig, EvaluateConfig, SuiteConfig, TaskConfig
    from medfoundry.mil.data import load_bags

    features = tmp_path / "features"
    features.mkdir()
    rows = []
    for i in range(6):  # one real slide standing in for six: the pipeline, not the learning, is under test
        shutil.copy(embedded / f"{STEM}.h5", features / f"slide{i}.h5")
        rows.append((f"slide{i}", f"patient{i // 2}", str(i % 2)))
    with (tmp_path / "labels.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([("slide_id", "patient_id", "label"), *rows])
    bags = load_bags(features, tmp_path / "labels.csv")
    task = TaskConfig(
        name="t",
        kind="slide-mil",
        source=str(features),
        labels=str(tmp_path / "labels.csv"),
        mil={
            "models": ["abmil", "mean"],
            "folds": 3,
            "heatmaps": True,
            "train": {"max_epochs": 3, "min_epochs": 1, "patience": 1},
        },
    )
    suite = SuiteConfig(
        output_dir=tmp_path / "out",
        tasks=[task],
        adapt=AdaptConfig(label_fractions=[1.0], seeds=[0]),
        evaluate=EvaluateConfig(n_bootstrap=0),
    )
    results = run_suite(suite, show_progress=False, echo=lambda _: None).results
    assert {r.adapter for r in results.records} == {"mil-abmil", "mil-mean"}
    heatmaps = tmp_path / "out" / "tasks" / "t" / "heatmaps"
    pictures = sorted((heatmaps / "abmil").glob("*.png"))
    assert [p.stem for p in pictures] == [f"slide{i}" for i in range(6)]
    assert not (heatmaps / "mean").exists()  # mean pooling has no attention to draw
    with open_slide(Path(bags.bags[0].attrs["slide_path"])) as slide:
        width, height = slide.dimensions
    with Image.open(pictures[0]) as picture:
        assert max(picture.size) <= 2048 and abs(picture.size[0] / picture.size[1] - width / height) < 0.02
        assert len(set(picture.convert("RGB").getdata())) > 100
