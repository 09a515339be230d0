"""``medfoundry robustness``: deterministic shifts on real tiles, the metrics, resume, the JSON and the report."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from medfoundry.adapt.registry import AdaptConfig
from medfoundry.bench.probe import encoder_from_text
from medfoundry.bench.robustness import RobustnessConfig, neighbours, run_robustness
from medfoundry.config import TaskConfig
from medfoundry.errors import DataError
from medfoundry.evaluate.results import read_results
from medfoundry.transforms.shifts import PRESETS, apply_shift, parse_shifts
from medfoundry.transforms.stain import MacenkoNormalizer


def _tile(shared_data: Path, name: str) -> np.ndarray:
    path = shared_data / "nct_crc_he_100k_samples" / "Sample_Data" / name
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    with Image.open(path) as image:
        rgb = np.asarray(image.convert("RGB").resize((64, 64), Image.Resampling.BILINEAR))
    return np.ascontiguousarray(np.moveaxis(rgb, -1, 0))  # channels first, as readers give images


def test_pathology_shifts_are_deterministic_and_keep_layout(shared_data: Path) -> None:
    pytest.importorskip("torchstain", reason="stain_norm needs the [stain] extra")
    tile = _tile(shared_data, "TUM-AACHEHDV.tif")
    reference = MacenkoNormalizer().fit(np.moveaxis(_tile(shared_data, "NORM-AAAWMSFI.tif"), 0, -1))
    for name, levels in PRESETS["pathology"].items():
        strongest = levels[-1]
        first = apply_shift(name, strongest, tile, np.random.default_rng(7), reference)
        again = apply_shift(name, strongest, tile, np.random.default_rng(7), reference)
        assert first.shape == tile.shape and first.dtype == np.uint8, name
        assert np.array_equal(first, again), f"{name} is not deterministic given its generator"
        change = np.abs(first.astype(int) - tile.astype(int)).mean()
        mild = np.abs(apply_shift(name, levels[0], tile, np.random.default_rng(7), reference).astype(int) - tile).mean()
        assert change > 0.5, f"{name} at {strongest} hardly changes the tile ({change:.2f})"
        if name != "hed_jitter":  # jitter draws random factors: its size is a spread, not a fixed amount
            assert change >= mild, f"{name}: the strongest level changes less than the mildest"


def test_float_images_keep_their_range() -> None:
    image = np.linspace(0, 1, 3 * 16 * 16, dtype=np.float32).reshape(1, 48, 16)
    out = apply_shift("noise", 0.05, image, np.random.default_rng(0))
    assert out.dtype == np.float32 and out.shape == image.shape and out.min() >= 0.0 and out.max() <= 1.0


def test_parse_shifts_explains_bad_input() -> None:
    assert parse_shifts("fundus", ["blur:3"]) == {"brightness": (0.2, 0.4, 0.6), "blur": (3.0,)}
    with pytest.raises(DataError, match="unknown shift preset 'pathologie'"):
        parse_shifts("pathologie", None)
    with pytest.raises(DataError, match="unknown shift 'jpg'"):
        parse_shifts(None, ["jpg:50"])
    with pytest.raises(DataError, match="levels must be numbers"):
        parse_shifts(None, ["jpeg:high"])
    with pytest.raises(DataError, match="no shifts"):
        parse_shifts(None, None)


def test_neighbours_exclude_the_query_itself() -> None:
    features = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    assert neighbours(features, features, 1)[:, 0].tolist() == [1, 0, 3, 2]


def _small_breastmnist(breastmnist_npz: Path, folder: Path) -> Path:
    data = np.load(breastmnist_npz)
    sizes = {"train": 80, "val": 30, "test": 40}
    small = {
        f"{split}_{part}": data[f"{split}_{part}"][:n] for split, n in sizes.items() for part in ("images", "labels")
    }
    path = folder / "breastmnist_small.npz"
    np.savez(path, **small)
    return path


def test_run_robustness_end_to_end_and_resumes(breastmnist_npz: Path, tmp_path: Path) -> None:
    data = _small_breastmnist(breastmnist_npz, tmp_path)
    config = RobustnessConfig(
        output_dir=tmp_path / "out",
        task=TaskConfig(name="breast", source=str(data)),
        encoders=[encoder_from_text("vit_tiny_28", 1, 28)],
        # Noise of sigma 0 leaves every image as it is: a shift the metrics must score as no change at all.
        shifts={"noise": [0.0, 0.1], "window": [0.4]},
        n_bootstrap=50,
        # One strong C: the CV grid's weak end needs thousands of lbfgs steps on random features (most of the time).
        adapt=AdaptConfig(linear_c_grid=[0.1]),
    )
    out = run_robustness(config)
    assert (out.cells_computed, out.cells_reused) == (3, 0)
    # results.json in the schema of every run: the clean probe as a record, the analysis in the task's metadata.
    results = read_results(out.json_path)
    assert out.json_path.name == "results.json"
    ((model, metric),) = {(r.model, r.metric) for r in results.records}
    assert (model, metric) == ("vit_tiny_28", "auroc")
    saved = results.metadata["tasks"]["breast"]["robustness"]
    assert {"encoders", "shifts", "settings", "records", "headline_metric"} <= set(saved)
    records = {(r["shift"], r["severity"], r["metric"]): r for r in saved["records"]}
    none = {metric: records[("noise", 0.0, metric)]["value"] for metric in ("cosine", "top1_agreement", "flip_rate")}
    assert none == pytest.approx({"cosine": 1.0, "top1_agreement": 1.0, "flip_rate": 0.0}, abs=1e-5)
    assert records[("noise", 0.0, "delta_auroc")]["value"] == pytest.approx(0.0, abs=1e-9)
    strong = records[("noise", 0.1, "cosine")]
    assert strong["value"] < 1.0 and strong["ci_low"] <= strong["value"] <= strong["ci_high"]
    assert 0.0 <= records[("window", 0.4, "flip_rate")]["value"] <= 1.0
    assert {"top5_agreement", "delta_auroc"} <= {r["metric"] for r in saved["records"]}
    assert saved["encoders"]["vit_tiny_28"]["clean"]["auroc"]["value"] > 0
    html = out.report_path.read_text()
    assert "Robustness to image shifts" in html and "Probe flip rate" in html and "Top-5 retrieval agreement" in html

    # A killed run resumes: finished cells are reused, a missing one is recomputed, the numbers are the same.
    (tmp_path / "out" / "robustness" / "cells" / "vit_tiny_28" / "window-0.4.json").unlink()
    again = run_robustness(config)
    assert (again.cells_computed, again.cells_reused) == (1, 2)
    assert read_results(again.json_path).metadata["tasks"]["breast"]["robustness"]["records"] == saved["records"]


def test_cli_rejects_missing_encoder(breastmnist_npz: Path) -> None:
    from medfoundry.cli.robustness import register

    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)  # a second command keeps "robustness" a named sub-command
    result = CliRunner().invoke(app, ["robustness", "--data", str(breastmnist_npz), "--preset", "radiology"])
    assert result.exit_code != 0 and "at least one --encoder" in str(result.exception)
