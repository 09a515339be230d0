"""The spine end to end on a small BreastMNIST subset: pre-train, embed, adapt, baselines, results, report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import write_breastmnist_subset
from typer.testing import CliRunner

from medfoundry.cli import app
from medfoundry.config import ExperimentConfig, load_config
from medfoundry.evaluate.predictions import predictions_path
from medfoundry.evaluate.results import read_results
from medfoundry.experiment import run_experiment


@pytest.fixture(scope="module")
def small_npz(breastmnist_npz: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_breastmnist_subset(breastmnist_npz, tmp_path_factory.mktemp("data") / "breast_small.npz", 128)


def _config(small_npz: Path, out: Path) -> ExperimentConfig:
    return load_config(
        ExperimentConfig,
        Path("configs/demo/breastmnist_dino.yaml"),
        [
            f"data.source={small_npz}",
            f"output_dir={out}",
            "pretrain.epochs=2",
            "pretrain.batch_size=32",
            "pretrain.tensorboard=false",
            "pretrain.views.n_local_views=2",
            "pretrain.dino.out_dim=128",
            "adapt.seeds=[0,1]",
            "supervised_baseline.max_steps=10",
            "supervised_baseline.eval_every_steps=5",
            "evaluate.n_bootstrap=200",
        ],
    )


def test_spine_writes_results_and_report_and_reuses_finished_stages(small_npz: Path, tmp_path: Path) -> None:
    torch.set_num_threads(2)
    lines: list[str] = []
    config = _config(small_npz, tmp_path / "run")
    out = run_experiment(config, show_progress=False, echo=lines.append)

    results = read_results(out.results_path)
    models = {r.model for r in results.records}
    assert models == {"dino", "random-init", "resnet18-scratch"}
    expected = (2 * 2 + 1) * 3 * 2 * 3  # (models x adapters + scratch) x fractions x seeds x metrics
    assert len(results.records) == expected
    for record in results.records:
        assert 0.0 <= record.value <= 1.0
        assert record.ci_low <= record.value <= record.ci_high or np.isnan(record.ci_low)
        assert record.n_test == 156
    n_train = {r.label_fraction: r.n_train for r in results.records}
    assert n_train[1.0] == 128 and n_train[0.1] < n_train[1.0] and n_train[0.01] >= 4
    html = out.report_path.read_text()
    assert "data:image/png;base64," in html and "dino" in html
    # Only aggregated values: no sample or patient ids in results or report.
    assert "test_00000" not in out.results_path.read_text() and "test_00000" not in html
    encoder_config = json.loads((tmp_path / "run" / "pretrain" / "encoder" / "config.json").read_text())
    assert encoder_config["ssl_method"] == "dino" and "labels unused" in encoder_config["data"]

    # Per-case predictions of every cell, for a paired comparison of two models on the same test cases.
    predictions = tmp_path / "run" / "predictions"
    assert len(list(predictions.glob("*.csv"))) == len(list((tmp_path / "run" / "cells").iterdir())) == 30
    pair = [str(predictions_path(predictions, model, "linear", 1.0, 0)) for model in ("dino", "random-init")]
    compared = CliRunner().invoke(app, ["compare", *pair])
    assert compared.exit_code == 0 and "CI excludes 0" in compared.output, compared.output

    cells_before = {p: p.stat().st_mtime_ns for p in (tmp_path / "run" / "cells").iterdir()}
    h5_before = {p: p.stat().st_mtime_ns for p in (tmp_path / "run" / "embeddings").rglob("*.h5")}
    again = run_experiment(config, show_progress=False, echo=lines.append)
    assert again.durations["total"] < out.durations["total"]
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "run" / "cells").iterdir()} == cells_before
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "run" / "embeddings").rglob("*.h5")} == h5_before
    assert [(r.model, r.value) for r in read_results(again.results_path).records] == [
        (r.model, r.value) for r in results.records
    ]
