"""The survival kind's deep heads: a deep Cox MLP on feature vectors, attention-MIL Cox heads on slide bags (built
here, with a risk that depends on what the bags hold), the features + stage model, and their one-line errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import yaml

from medfoundry.bench.engine import load_task, run_suite
from medfoundry.bench.survival import encode_baseline, fit_deep_cox
from medfoundry.config import SuiteConfig, TaskConfig
from medfoundry.errors import MedfoundryError

# The survival statistics are scikit-survival's (the survival extra).
concordance_index_censored = pytest.importorskip("sksurv.metrics").concordance_index_censored

REPO_ROOT = Path(__file__).resolve().parents[1]
SUITE = REPO_ROOT / "configs" / "suites" / "tcga_crc_survival.yaml"
SECTION = {"time_column": "time", "event_column": "event", "patient_column": "patient", "split_column": "split"}


def _survival_times(risk: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Exponential event times with hazard exp(risk), independent uniform censoring (about a third censored)."""
    event_time = rng.exponential(1.0 / np.exp(risk))
    censor_time = rng.uniform(0, 3 * np.median(event_time), size=len(risk))
    return np.minimum(event_time, censor_time), (event_time <= censor_time).astype(int)


def test_deep_cox_learns_a_clear_signal_and_is_seeded() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 6))
    time, event = _survival_times(1.5 * x[:, 0] - 1.0 * x[:, 1], rng)
    train, test = np.arange(150), np.arange(150, 200)
    patients = [f"p{i}" for i in train]
    # Fewer epochs than the default: the signal is clear, and tests share 2 cores.
    settings = load_settings(deep_cox={"max_epochs": 30, "batch_size": 64, "hidden": 32, "lr": 3e-3})

    def fit() -> np.ndarray:
        risk, n_params = fit_deep_cox(
            x[train], time[train], event[train].astype(bool), patients, x[test], settings, seed=3
        )
        assert n_params == 6 * 32 + 32 + 32 + 1  # one hidden layer of 32, one output (the log hazard)
        return risk

    risk = fit()
    c_index = concordance_index_censored(event[test].astype(bool), time[test], risk)[0]
    assert c_index > 0.7
    np.testing.assert_array_equal(risk, fit())  # same seed, same risks


def load_settings(**changes: Any) -> Any:
    from medfoundry.bench.survival import SurvivalConfig

    return SurvivalConfig.model_validate({**SECTION, **changes})


def test_cox_loss_is_minimised_by_scikit_survivals_breslow_fit() -> None:
    """The partial likelihood the deep heads train on has its minimum where scikit-survival's Cox model (Breslow
    ties) puts the coefficients: its gradient there is zero, on data with tied times."""
    import torch
    from sksurv.linear_model import CoxPHSurvivalAnalysis
    from sksurv.util import Surv

    from medfoundry.mil.train import cox_loss

    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 2))
    time, event = _survival_times(x[:, 0] - 0.5 * x[:, 1], rng)
    time = np.ceil(time * 4) / 4  # coarse times: many ties
    coef = CoxPHSurvivalAnalysis(ties="breslow").fit(x, Surv.from_arrays(event.astype(bool), time)).coef_
    beta = torch.tensor(coef, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor(np.column_stack([time, event]), dtype=torch.float64)
    loss = cox_loss(torch.tensor(x) @ beta, targets)
    (gradient,) = torch.autograd.grad(loss, beta)
    assert len(np.unique(time[event == 1])) < event.sum() and float(gradient.abs().max()) < 1e-4


def _write_bag(path: Path, features: np.ndarray) -> None:
    with h5py.File(path, "w") as handle:
        handle["features"] = features.astype(np.float32)
        handle["coords"] = np.zeros((len(features), 2), dtype=np.int64)


def _bag_task(tmp_path: Path, n_patients: int = 90) -> tuple[Path, Path, Path]:
    """Patients whose hazard rises with the share of 'tumour' tiles (a shifted direction) in their bags; every
    third patient has two slides, listed in a slide map."""
    rng = np.random.default_rng(1)
    bags_dir = tmp_path / "bags"
    bags_dir.mkdir()
    share = rng.uniform(0, 0.6, size=n_patients)
    time, event = _survival_times(10.0 * (share - share.mean()), rng)
    tumour = np.zeros(16)
    tumour[:3] = 2.5
    slides = ["slide_id,patient_id"]
    for i in range(n_patients):
        n = int(rng.integers(20, 40))
        tiles = rng.normal(size=(n, 16))
        tiles[: int(round(share[i] * n))] += tumour
        parts = np.array_split(rng.permutation(tiles), 2 if i % 3 == 0 else 1)
        for k, part in enumerate(parts):
            _write_bag(bags_dir / f"s{i}_{k}.h5", part)
            slides.append(f"s{i}_{k},p{i}")
    rows = ["patient,time,event,split"]
    rows += [f"p{i},{time[i]:.5f},{event[i]},{'test' if i % 3 == 1 else 'train'}" for i in range(n_patients)]
    table = tmp_path / "survival.csv"
    table.write_text("\n".join(rows) + "\n")
    slide_map = tmp_path / "slides.csv"
    slide_map.write_text("\n".join(slides) + "\n")
    return table, bags_dir, slide_map


def test_mil_cox_head_on_slide_bags_beats_chance(tmp_path: Path) -> None:
    table, bags_dir, slide_map = _bag_task(tmp_path)
    section = {
        **SECTION, "bags": str(bags_dir), "slides": str(slide_map), "adapters": ["mil-abmil"],
        "mil_train": {"batch_size": 16, "lr": 2e-3, "max_epochs": 30, "min_epochs": 10},
    }  # fmt: skip
    config = SuiteConfig.model_validate(
        {
            "name": "bags",
            "output_dir": str(tmp_path / "run"),
            "tasks": [
                {"name": "os", "kind": "survival", "source": str(table), "survival": section, "metrics": ["c_index"]}
            ],
            "adapt": {"label_fractions": [1.0], "seeds": [0]},
            "evaluate": {"n_bootstrap": 100},
            "comparisons": {"n_bootstrap": 100},
        }
    )
    task = load_task(config.tasks[0])
    assert task.model_name == "bags" and task.data.bags is not None
    assert sum(len(b) for b in task.data.bags[:1]) >= 20  # patient 0's two slides form one bag
    result = run_suite(config, show_progress=False, echo=lambda _: None)
    records = {(r.model, r.adapter, r.metric): r for r in result.results.records}
    mil = records[("bags", "mil-abmil", "c_index")]
    assert mil.n_test == 30 and mil.n_train == 60
    assert mil.value > 0.7 and mil.ci_low <= mil.value <= mil.ci_high
    predictions = tmp_path / "run" / "tasks" / "os" / "predictions" / "bags__mil-abmil__1__0.csv"
    header, *rows = predictions.read_text().splitlines()
    assert header == "id,patient_id,time,event,risk" and len(rows) == 30
    groups = result.results.metadata["tasks"]["os"]["survival"]["risk_groups"]
    assert set(groups) == {"bags (mil-abmil)"}


def test_tcga_features_plus_stage_with_one_hot_stage(tcga_table: Path, tmp_path: Path) -> None:
    """Features, features + stage (one indicator per stage) and stage alone on the same patients; each model
    against stage alone in a paired comparison."""
    data: dict[str, Any] = yaml.safe_load(SUITE.read_text())
    data["tasks"][0]["source"] = str(tcga_table)
    data["tasks"][0]["survival"].update(adapters=["coxph"], baseline_encoding="onehot")
    data["tasks"][0]["metrics"] = ["c_index"]  # the bootstrap of one metric: the models are what is tested
    data.update(
        output_dir=str(tmp_path / "run"),
        adapt={"label_fractions": [1.0], "seeds": [0]},
        evaluate={"n_bootstrap": 100},
        comparisons={"n_bootstrap": 100},
    )
    config = SuiteConfig.model_validate(data)
    task = load_task(config.tasks[0])
    assert task.data.baseline_names == ["cleanstage=2", "cleanstage=3", "cleanstage=4"]
    assert task.combined_name == "tissue-composition+cleanstage"
    result = run_suite(config, show_progress=False, echo=lambda _: None)
    c_index = {r.model: r for r in result.results.records if r.metric == "c_index"}
    assert set(c_index) == {"tissue-composition", "tissue-composition+cleanstage", "stage-only"}
    assert all(r.n_test == 97 for r in c_index.values())
    # Stage carries most of the signal on this table: the combined model should rank at least about as well.
    assert c_index["tissue-composition+cleanstage"].value > c_index["tissue-composition"].value
    compared = {c["model_a"]: c for c in result.results.metadata["comparisons"]}
    assert set(compared) == {"tissue-composition", "tissue-composition+cleanstage"}
    assert all(
        c["model_b"] == "stage-only" and c["ci_low"] <= c["difference"] <= c["ci_high"] for c in compared.values()
    )
    assert result.results.metadata["tasks"]["tcga_crc_os"]["combined_model"] == "tissue-composition+cleanstage"


def test_one_hot_baseline_keeps_missing_values_missing() -> None:
    stage = np.array([[1.0], [3.0], [np.nan], [2.0], [3.0]])
    encoded, names = encode_baseline(stage, ["stage"], "onehot")
    assert names == ["stage=2", "stage=3"]
    np.testing.assert_array_equal(encoded[[0, 1, 3, 4]], [[0, 0], [0, 1], [1, 0], [0, 1]])
    assert np.isnan(encoded[2]).all()


def test_adapter_and_bag_errors_are_one_line(tmp_path: Path) -> None:
    table = tmp_path / "t.csv"
    table.write_text("patient,time,event,split,f1\n" + "\n".join(f"p{i},{i + 1},{i % 2},train,{i}" for i in range(8)))
    with pytest.raises(ValueError, match="unknown survival adapter 'mil-nope'"):
        TaskConfig(name="x", kind="survival", source=str(table), survival={**SECTION, "adapters": ["mil-nope"]})
    with pytest.raises(ValueError, match="batch_size must be at least 2"):
        TaskConfig(name="x", kind="survival", source=str(table), survival={**SECTION, "deep_cox": {"batch_size": 1}})
    with pytest.raises(MedfoundryError, match="adapter mil-abmil needs slide bags"):
        load_task(
            TaskConfig(name="x", kind="survival", source=str(table), survival={**SECTION, "adapters": ["mil-abmil"]})
        )
    with pytest.raises(MedfoundryError, match=r"nowhere: slide bags folder not found"):
        load_task(
            TaskConfig(
                name="x", kind="survival", source=str(table), survival={**SECTION, "bags": str(tmp_path / "nowhere")}
            )
        )
