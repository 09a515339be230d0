"""Benchmark suites: a real suite on BreastMNIST killed midway resumes without recomputing finished cells."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import write_breastmnist_subset

from medfoundry.adapt.fewshot import PrototypeClassifier
from medfoundry.bench.engine import load_task, run_suite
from medfoundry.config import SuiteConfig, TaskConfig, load_config
from medfoundry.errors import DataError, MedfoundryError
from medfoundry.evaluate.results import read_results

REPO_ROOT = Path(__file__).resolve().parents[1]
KERMANY_PATIENTS = r"^(person\d+|(?:NORMAL2-)?IM-\d+)[-_]"


@pytest.fixture(scope="module")
def small_npz(breastmnist_npz: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_breastmnist_subset(breastmnist_npz, tmp_path_factory.mktemp("data") / "breast_small.npz", 160)


def _suite_yaml(small_npz: Path, out: Path) -> Path:
    recipe = str(REPO_ROOT / "configs" / "pretrain" / "simclr.yaml")
    suite = {
        "name": "resume-test",
        "output_dir": str(out),
        "tasks": [{"name": "breast-small", "source": str(small_npz)}],
        "encoders": [
            {
                "name": "simclr",
                "recipe": recipe,
                "pretrain_task": "breast-small",
                "overrides": ["pretrain.epochs=1", "pretrain.batch_size=32", "pretrain.tensorboard=false"],
            },
            {"name": "random-init", "recipe": recipe, "untrained": True, "finetune": False},
        ],
        "adapt": {"adapters": ["knn", "fewshot", "linear"], "label_fractions": [0.1, 1.0], "seeds": [0, 1]},
        "finetune": {"modes": ["lora"], "max_steps": 30, "eval_every_steps": 10, "batch_size": 32},
        "finetune_label_fractions": [1.0],
        "evaluate": {"n_bootstrap": 100},
        "comparisons": {"baseline_encoder": "random-init", "n_bootstrap": 200},
    }
    path = out.parent / "suite.yaml"
    path.write_text(yaml.safe_dump(suite))
    return path


def _kill_after_first_finetune_cell(suite_yaml: Path, cells: Path) -> None:
    """Start ``medfoundry eval`` and SIGKILL it as soon as the first fine-tuning cell is written."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "medfoundry.cli", "eval", str(suite_yaml)],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 300
    try:
        while not list(cells.glob("*finetune*.json")):
            if process.poll() is not None:
                pytest.fail(f"suite ended before it could be killed: {process.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail("no fine-tuning cell within 300 s")
            time.sleep(0.02)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()


def test_suite_killed_midway_resumes_without_recomputing(small_npz: Path, tmp_path: Path) -> None:
    out = tmp_path / "suite"
    suite_yaml = _suite_yaml(small_npz, out)
    cells = out / "tasks" / "breast-small" / "cells"
    _kill_after_first_finetune_cell(suite_yaml, cells)
    finished = {path.name: path.stat().st_mtime_ns for path in cells.glob("*.json")}
    # simclr's 9 probe cells (3 adapters x 2 seeds at 10%, 1 seed at 100% where none of them can vary with it), then
    # its first of 2 LoRA cells; random-init's 9 probe cells were never reached.
    assert len(finished) == 10
    assert not (out / "results.json").exists()
    assert not list(cells.glob(".*.tmp")), "a killed run must not leave half-written cells behind"

    config = load_config(SuiteConfig, suite_yaml)
    output = run_suite(config, show_progress=False, echo=lambda line: None)
    assert output.cells_reused == 10
    assert output.cells_computed == 2 * 3 * 3 + 2 - 10
    for name, mtime in finished.items():
        assert (cells / name).stat().st_mtime_ns == mtime, f"{name} was recomputed"

    results = read_results(out / "results.json")
    cells_seen = {(r.model, r.adapter, r.label_fraction, r.seed) for r in results.records}
    assert len(cells_seen) == 20
    assert {r.metric for r in results.records} == {"auroc", "balanced_accuracy", "f1", "ece"}
    costs = {r.adapter: r.trainable_params for r in results.records if r.model == "simclr"}
    assert costs["knn"] == 0 and costs["fewshot"] == 0
    assert costs["linear"] == 384 + 1  # token+avg features of a dim-192 ViT, one logit
    assert 0 < costs["finetune-lora"] < 100_000
    assert all(r.fit_seconds is not None and r.fit_seconds >= 0 for r in results.records)

    comparisons = results.metadata["comparisons"]
    pairs = {(c["model_a"], c["adapter_a"], c["model_b"], c["adapter_b"]) for c in comparisons}
    assert ("simclr", "knn", "random-init", "knn") in pairs
    assert ("simclr", "finetune-lora", "simclr", "linear") in pairs
    for comparison in comparisons:
        assert comparison["ci_low"] <= comparison["difference"] <= comparison["ci_high"]
        seeded = comparison["label_fraction"] < 1 or comparison["adapter_a"].startswith("finetune")
        assert comparison["n_seeds"] == (2 if seeded else 1)
    assert results.metadata["primary_metric"] == {"breast-small": "auroc"}
    html = (out / "report.html").read_text()
    assert "Adaptation ladder" in html and "significant" in html

    again = run_suite(config, show_progress=False, echo=lambda line: None)
    assert (again.cells_computed, again.cells_reused) == (0, 20)


def test_missing_splits_are_carved_by_patient(shared_data: Path) -> None:
    task = TaskConfig(
        name="kermany",
        source=f"folder:{shared_data / 'kermany_cxr_224_trainsubset'}",
        options={"image_size": 32, "channels": 1, "patient_regex": KERMANY_PATIENTS},
        test_fraction=0.2,
        val_fraction=0.16,
    )
    data = load_task(task)
    assert data.carved == ["test", "val"] and data.kind == "binary"
    assert len(data.train) + len(data.val) + len(data.test) == 600
    assert abs(len(data.test) - 120) <= 10 and abs(len(data.val) - 96) <= 10
    patients = [set(split.patient_ids) for split in (data.train, data.val, data.test)]
    assert not (patients[0] & patients[1] or patients[0] & patients[2] or patients[1] & patients[2])
    for split in (data.train, data.val, data.test):
        assert set(np.asarray(split.labels).tolist()) == {0, 1}


def test_ordinal_task_is_scored_by_kappa_first(shared_data: Path) -> None:
    task = TaskConfig(
        name="idrid",
        source=f"idrid:{shared_data / 'idrid_dr_grading'}",
        options={"target": "dr_grade", "image_size": 32},
        kind="ordinal",
    )
    data = load_task(task)
    assert data.metrics[0] == "kappa" and data.n_classes == 5
    assert (len(data.train), len(data.val), len(data.test)) == (40, 10, 103)
    assert not set(data.train.patient_ids) & set(data.val.patient_ids)


def test_suite_config_errors_name_the_problem(tmp_path: Path) -> None:
    base = {"tasks": [{"name": "t", "source": "x.npz"}], "encoders": [{"name": "e", "backbone": "vit_tiny_28"}]}
    path = tmp_path / "suite.yaml"
    cases = [
        ({"encoders": [{"name": "e", "backbone": "vit_tiny_28", "checkpoint": "ckpt"}]}, "exactly one of"),
        ({"comparisons": {"baseline_encoder": "nope"}}, "baseline_encoder 'nope' is not an encoder"),
        ({"encoders": [{"name": "e", "backbone": "vit_tiny_28", "tasks": ["other"]}]}, "unknown task"),
        ({"finetune_label_fractions": [0.5]}, "not among adapt.label_fractions"),
        ({"tasks": [{"name": "t", "source": "x.npz"}, {"name": "t", "source": "y.npz"}]}, "repeated"),
    ]
    for change, message in cases:
        path.write_text(yaml.safe_dump({**base, **change}))
        with pytest.raises(MedfoundryError, match=message):
            load_config(SuiteConfig, path)


def test_multilabel_task_runs_probes_and_lora(shared_data: Path, tmp_path: Path) -> None:
    """IDRiD as two findings per image (referable DR, DME risk): probes and LoRA give one probability per label."""
    config = SuiteConfig.model_validate(
        {
            "output_dir": str(tmp_path / "suite"),
            "tasks": [
                {
                    "name": "idrid-findings",
                    "source": f"idrid:{shared_data / 'idrid_dr_grading'}",
                    "options": {"target": "multilabel", "image_size": 28},
                }
            ],
            "encoders": [{"name": "vit", "backbone": "vit_tiny_28", "in_chans": 3, "img_size": 28}],
            "adapt": {"adapters": ["knn", "fewshot", "linear", "mlp"], "label_fractions": [1.0], "seeds": [0]},
            "finetune": {"modes": ["lora"], "max_steps": 4, "eval_every_steps": 2, "batch_size": 16},
            "evaluate": {"n_bootstrap": 100},
            "comparisons": {"n_bootstrap": 100},
        }
    )
    output = run_suite(config, show_progress=False, echo=lambda line: None)
    task = output.results.metadata["tasks"]["idrid-findings"]
    assert task["kind"] == "multilabel" and task["n_classes"] == 2
    assert {r.metric for r in output.results.records} == {"auroc"}
    assert {r.adapter for r in output.results.records} == {"knn", "linear", "mlp", "finetune-lora"}
    linear = next(r for r in output.results.records if r.adapter == "linear")
    assert linear.trainable_params == 2 * (192 + 1)  # one logistic regression per label on 192 features
    predictions = output.output_dir / "tasks" / "idrid-findings" / "predictions" / "vit__linear__1__0.csv"
    header = predictions.read_text().splitlines()[0].split(",")
    assert {"label_0", "label_1", "proba_0", "proba_1"} <= set(header)
    assert len(output.results.metadata["comparisons"]) == 3  # knn, mlp and LoRA against the linear probe

    with pytest.raises(DataError, match="multi-label targets have no class means"):
        PrototypeClassifier().fit(np.zeros((4, 3)), np.array([[0, 1], [1, 0], [1, 1], [0, 0]]))


def test_finetune_and_scratch_cells_validate_on_their_own_label_fraction(breastmnist_npz: Path) -> None:
    """At 1% and 10% labels a fine-tuned or from-scratch network picks its best epoch and threshold on the same
    fraction of the val split (stratified, two per class at least), never on the whole val split."""
    from medfoundry.bench.classification import val_budget

    config = SuiteConfig.model_validate(
        {"name": "x", "output_dir": "runs/x", "tasks": [{"name": "b", "source": str(breastmnist_npz)}]}
    )
    task = load_task(config.tasks[0])
    val_ids = set(task.val.ids)
    sizes = {}
    for fraction in (0.01, 0.1):
        chosen = val_budget(task, config, fraction, seed=0)
        assert set(chosen.ids) <= val_ids and np.bincount(np.asarray(chosen.labels)).min() >= 2
        assert set(val_budget(task, config, fraction, seed=0).ids) == set(chosen.ids)  # same seed, same images
        sizes[fraction] = len(chosen)
    assert sizes[0.01] == 4 and sizes[0.1] == round(0.1 * len(task.val)) < len(task.val)
    assert val_budget(task, config, 1.0, seed=0) is task.val


def test_a_test_split_of_one_patient_is_named_as_such(shared_data: Path) -> None:
    """The bundled osteosarcoma suite tests on one patient (Case-4): its CIs equal their points, and the run says so."""
    from medfoundry.bench.engine import few_test_patients_warnings

    suite = Path(__file__).resolve().parents[1] / "configs" / "suites" / "osteosarcoma.yaml"
    spec = yaml.safe_load(suite.read_text())["tasks"][0]
    spec["source"] = f"csv:{shared_data / 'osteosarcoma_tcia_tiles_60' / 'labels.csv'}"
    task = load_task(TaskConfig(**spec))
    (warning,) = few_test_patients_warnings(task)
    assert "test split holds 1 patient(s)" in warning and "equals its point estimate" in warning
    assert "Case-4" not in warning  # no patient id in logs or reports
