"""Task kinds beside classification in one engine: a suite mixing a BreastMNIST classification task with a slide-MIL
task (bags of real NCT-CRC-HE crop features, fixed splits from the CSV), and a zero-shot task with the small CLIP
model that tests/test_vlm.py trains; each resumes without recomputing and writes the common results schema."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import write_breastmnist_subset
from test_mil import FAST, _make_bags, _write_slides, crop_pools, tiles  # noqa: F401 (fixtures reused)
from test_vlm import CLASSES, KERMANY_REGEX, trained, vqa_splits  # noqa: F401 (fixtures reused)

from medfoundry.bench.engine import load_task, run_suite
from medfoundry.config import SuiteConfig, TaskConfig
from medfoundry.errors import DataError
from medfoundry.evaluate.results import ResultRecord, read_results

# Patients 0-17 train, 18-23 val, 24-29 test (two slides each), written in the CSV's split column.
N_BAGS, SLIDES_PER_PATIENT = 60, 2
ROLE_OF_PATIENT = ["train"] * 18 + ["val"] * 6 + ["test"] * 6


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():  # noqa: ANN202
    # Tiny models on a shared 2-core machine: intra-op threads cost more than they save.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def slides(crop_pools, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:  # noqa: F811
    """A features folder (one HDF5 per slide, the ``wsi embed`` layout) and a labels CSV with a split column."""
    names, train_pool, _ = crop_pools
    bags, labels, _ = _make_bags(names, train_pool, N_BAGS, seed=3)
    root = tmp_path_factory.mktemp("slides")
    features_dir, rows = _write_slides(root, bags, labels, SLIDES_PER_PATIENT)
    features_dir = features_dir.rename(root / "nct-colour-stats")
    labels_csv = root / "labels.csv"
    with labels_csv.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["slide_id", "patient_id", "label", "split"])
        for slide, patient, label in rows:
            writer.writerow([slide, patient, label, ROLE_OF_PATIENT[int(patient.removeprefix("patient"))]])
    return features_dir, labels_csv


def _mil_task(slides: tuple[Path, Path], **mil: object) -> dict:
    features_dir, labels_csv = slides
    train = dataclasses.asdict(dataclasses.replace(FAST, max_epochs=8, min_epochs=4))
    return {
        "name": "slides",
        "kind": "slide-mil",
        "source": str(features_dir),
        "labels": str(labels_csv),
        "mil": {"models": ["mean", "abmil"], "train": train, **mil},
    }


def test_suite_mixes_classification_and_slide_mil_and_resumes(
    slides: tuple[Path, Path], breastmnist_npz: Path, tmp_path: Path
) -> None:
    small = write_breastmnist_subset(breastmnist_npz, tmp_path / "breast.npz", 120)
    config = SuiteConfig.model_validate(
        {
            "name": "mixed",
            "output_dir": str(tmp_path / "out"),
            "tasks": [{"name": "breast-small", "source": str(small)}, _mil_task(slides)],
            "encoders": [{"name": "vit", "backbone": "vit_tiny_28", "in_chans": 1, "img_size": 28}],
            "adapt": {"adapters": ["knn", "linear"], "label_fractions": [0.5, 1.0], "seeds": [0, 1]},
            "evaluate": {"n_bootstrap": 50},
            "comparisons": {"n_bootstrap": 100},
        }
    )
    lines: list[str] = []
    first = run_suite(config, show_progress=False, echo=lines.append)
    # Each task: 2 adapters (probes; MIL models) x 2 fractions x 2 seeds, except that kNN and the linear probe run
    # once at 100% labels, where no seed can change them: 2 x (2 + 1) + 2 x 2 x 2.
    assert (first.cells_computed, first.cells_reused) == (14, 0)
    records = first.results.records
    by_task = {task: [r for r in records if r.task == task] for task in ("breast-small", "slides")}
    assert {(r.model, r.adapter) for r in by_task["breast-small"]} == {("vit", "knn"), ("vit", "linear")}
    assert {(r.model, r.adapter) for r in by_task["slides"]} == {
        ("nct-colour-stats", "mil-mean"),
        ("nct-colour-stats", "mil-abmil"),
    }
    mil_auroc = [r for r in by_task["slides"] if r.metric == "auroc"]
    assert {r.n_test for r in mil_auroc} == {12}  # the CSV's test slides
    assert {r.n_train for r in mil_auroc if r.label_fraction == 1.0} == {36}
    assert all(r.trainable_params and r.fit_seconds is not None for r in mil_auroc)
    assert len(list((tmp_path / "out" / "tasks" / "slides" / "predictions").glob("*.csv"))) == 8

    # results.json: the common schema, each task described by its kind, the comparisons against mean pooling.
    raw = json.loads(first.results_path.read_text())
    fields = {f.name for f in dataclasses.fields(ResultRecord)}
    assert all(set(record) <= fields and set(record) >= fields - {"trainable_params", "fit_seconds"}
               for record in raw["records"])  # fmt: skip
    assert read_results(first.results_path).records == records
    tasks = raw["metadata"]["tasks"]
    assert tasks["breast-small"]["kind"] == "binary" and tasks["slides"]["kind"] == "slide-mil"
    assert tasks["slides"]["splits"] == {"train": 36, "val": 12, "test": 12}
    assert tasks["slides"]["carved_from_train"] == [] and tasks["slides"]["precomputed_features"]
    assert raw["metadata"]["primary_metric"] == {"breast-small": "auroc", "slides": "auroc"}
    mil_pairs = [c for c in raw["metadata"]["comparisons"] if c["task"] == "slides"]
    assert {(c["adapter_a"], c["adapter_b"], c["label_fraction"]) for c in mil_pairs} == {
        ("mil-abmil", "mil-mean", 0.5),
        ("mil-abmil", "mil-mean", 1.0),
    }
    assert "mil-abmil" in first.report_path.read_text()

    second = run_suite(config, show_progress=False, echo=lines.append)
    assert (second.cells_computed, second.cells_reused) == (0, 14)
    assert second.results.records == records


def test_slide_mil_splits_are_carved_by_patient_or_cross_validated(slides: tuple[Path, Path], tmp_path: Path) -> None:
    features_dir, labels_csv = slides
    plain = tmp_path / "no-split.csv"
    with labels_csv.open() as source, plain.open("w", newline="") as dest:
        writer = csv.writer(dest)
        for row in csv.reader(source):
            writer.writerow(row[:3])
    carved = load_task(TaskConfig.model_validate({**_mil_task(slides), "labels": str(plain)}))
    assert carved.carved == ["test", "val"]
    patients = {role: {carved.bags.patient_ids[i] for i in carved.indices(role)} for role in ("train", "val", "test")}
    assert not (patients["train"] & patients["val"] or patients["train"] & patients["test"])
    assert sum(len(carved.indices(role)) for role in patients) == N_BAGS

    folds = load_task(TaskConfig.model_validate({**_mil_task(slides, folds=3), "labels": str(plain)}))
    assert len(folds.test) == N_BAGS and "3-fold" in folds.describe()
    with pytest.raises(DataError, match="split column and mil.folds"):
        load_task(TaskConfig.model_validate(_mil_task(slides, folds=3)))


def test_zero_shot_task_needs_no_encoder_and_resumes(trained, shared_data: Path, tmp_path: Path) -> None:  # noqa: ANN001, F811
    kermany = shared_data / "kermany_cxr_224_trainsubset"
    if not kermany.is_dir():
        pytest.skip("Kermany subset is absent from the shared data")
    task = {
        "name": "kermany-zs",
        "kind": "zero-shot",
        "source": f"folder:{kermany}",
        "options": {"patient_regex": KERMANY_REGEX},
        "zero_shot": {"checkpoint": str(trained.model_dir), "classes": CLASSES},
    }
    data = {
        "output_dir": str(tmp_path / "out"),
        "tasks": [task],
        "adapt": {"label_fractions": [0.1, 1.0], "seeds": [3, 4, 5]},
        "evaluate": {"n_bootstrap": 50},
    }
    first = run_suite(SuiteConfig.model_validate(data), show_progress=False, echo=lambda _: None)
    records = first.results.records
    # One cell: fraction 0 (no label used) at the suite's first seed, whatever fractions and seeds the suite lists.
    assert first.cells_computed == 1
    assert {(r.adapter, r.label_fraction, r.seed, r.n_train, r.n_test) for r in records} == {
        ("zero-shot", 0.0, 3, 0, 600)
    }
    assert {r.metric for r in records} == {"auroc", "balanced_accuracy", "f1", "ece"}
    meta = first.results.metadata["tasks"]["kermany-zs"]
    assert meta["kind"] == "zero-shot" and list(meta["classes"]) == ["normal", "pneumonia"]
    assert meta["grouping"] == "test split only (600 images of 598 patients); no label is used"
    proba = np.loadtxt(next((tmp_path / "out").glob("tasks/kermany-zs/predictions/*.csv")), delimiter=",",
                       skiprows=1, usecols=(3, 4))  # fmt: skip
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-6)

    again = run_suite(SuiteConfig.model_validate(data), show_progress=False, echo=lambda _: None)
    assert (again.cells_computed, again.cells_reused) == (0, 1) and again.results.records == records
    # Other prompts are another cell's inputs: recomputed, not reused.
    task["zero_shot"] = {**task["zero_shot"], "templates": ["a chest x-ray showing {}."]}
    changed = run_suite(SuiteConfig.model_validate(data), show_progress=False, echo=lambda _: None)
    assert changed.cells_computed == 1
