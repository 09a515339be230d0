"""The spine end to end on a small BreastMNIST subset: pre-train, embed, adapt, baselines, results, report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import write_breastmnist_subset
from typer.testing import CliRunner

from medfoundry.bench.run import run_experiment
from medfoundry.cli import app
from medfoundry.config import ExperimentConfig, load_config
from medfoundry.evaluate.predictions import predictions_path
from medfoundry.evaluate.results import read_results


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
    # (models x adapters x (2 seeds at 1% and 10%, 1 at 100%: linear and kNN cannot vary with the seed when every
    # label is used) + scratch x fractions x seeds) x metrics
    expected = (2 * 2 * (2 + 2 + 1) + 3 * 2) * 4
    assert len(results.records) == expected
    for record in results.records:
        assert 0.0 <= record.value <= 1.0
        # ECE is biased upwards under resampling, so its percentile CI may lie wholly above the point estimate.
        if record.metric != "ece":
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
    task_dir = tmp_path / "run" / "tasks" / "breastmnist"
    predictions = task_dir / "predictions"
    assert len(list(predictions.glob("*.csv"))) == len(list((task_dir / "cells").iterdir())) == 26
    pair = [str(predictions_path(predictions, model, "linear", 1.0, 0)) for model in ("dino", "random-init")]
    compared = CliRunner().invoke(app, ["compare", *pair])
    assert compared.exit_code == 0 and "CI excludes 0" in compared.output, compared.output

    cells_before = {p: p.stat().st_mtime_ns for p in (task_dir / "cells").iterdir()}
    h5_before = {p: p.stat().st_mtime_ns for p in (tmp_path / "run" / "embeddings").rglob("*.h5")}
    again = run_experiment(config, show_progress=False, echo=lines.append)
    assert again.durations["total"] < out.durations["total"]
    assert {p: p.stat().st_mtime_ns for p in (task_dir / "cells").iterdir()} == cells_before
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "run" / "embeddings").rglob("*.h5")} == h5_before
    assert [(r.model, r.value) for r in read_results(again.results_path).records] == [
        (r.model, r.value) for r in results.records
    ]

    # The suite the run evaluated, re-run with `eval`, reuses every cell: one engine behind both commands.
    rerun = CliRunner().invoke(app, ["eval", str(tmp_path / "run" / "suite.yaml")])
    assert rerun.exit_code == 0, rerun.output
    assert "0 cells computed, 26 reused" in rerun.output.replace("\n", " ")


def _records(path: Path) -> dict[tuple[str, str, float, int, str], tuple[float, float, float, int, int]]:
    return {
        (r.model, r.adapter, r.label_fraction, r.seed, r.metric): (r.value, r.ci_low, r.ci_high, r.n_train, r.n_test)
        for r in read_results(path).records
    }


def test_run_and_eval_give_identical_numbers_for_the_same_inputs(small_npz: Path, tmp_path: Path) -> None:
    """`run` then `eval` on a hand-written suite naming the same data and checkpoint: every record is equal."""
    torch.set_num_threads(2)
    config = _config(small_npz, tmp_path / "run")
    config.adapt.label_fractions = [0.1, 1.0]
    out = run_experiment(config, show_progress=False, echo=lambda line: None)
    suite = {
        "name": "same-inputs",
        "output_dir": str(tmp_path / "eval"),
        "tasks": [{"name": "breastmnist", "source": str(small_npz)}],
        "encoders": [
            {"name": "dino", "checkpoint": str(tmp_path / "run" / "pretrain" / "encoder"), "pool": "token+avg"},
            {
                "name": "random-init",
                "recipe": "configs/demo/breastmnist_dino.yaml",
                "untrained": True,
                "finetune": False,
            },
        ],
        "adapt": config.adapt.model_dump(mode="json"),
        "supervised_baseline": config.supervised_baseline.model_dump(mode="json"),
        "evaluate": config.evaluate.model_dump(mode="json"),
        "comparisons": {"baseline_encoder": "random-init"},
    }
    suite_path = tmp_path / "same_inputs.yaml"
    suite_path.write_text(yaml.safe_dump(suite))
    evaluated = CliRunner().invoke(app, ["eval", str(suite_path)])
    assert evaluated.exit_code == 0, evaluated.output

    from_run, from_eval = _records(out.results_path), _records(tmp_path / "eval" / "results.json")
    assert len(from_run) == (2 * 2 * (2 + 1) + 2 * 2) * 4
    assert from_run == from_eval
    run_meta, eval_meta = (
        read_results(out.results_path).metadata,
        read_results(tmp_path / "eval" / "results.json").metadata,
    )
    assert run_meta["comparisons"] == eval_meta["comparisons"] and len(run_meta["comparisons"]) > 0
    pair = ("dino", "linear", "resnet18-scratch", "supervised")
    assert pair in {(c["model_a"], c["adapter_a"], c["model_b"], c["adapter_b"]) for c in run_meta["comparisons"]}
