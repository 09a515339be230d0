"""The survival task kind on the real TCGA colorectal table (Kather et al. 2019): Cox models on the nine tissue
features and on stage alone through the one engine, resume, the report's Kaplan-Meier section, and one-line errors
for bad survival tables."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from medfoundry.bench.engine import load_task, run_suite
from medfoundry.config import SuiteConfig, TaskConfig
from medfoundry.errors import DataError, MedfoundryError

REPO_ROOT = Path(__file__).resolve().parents[1]
SUITE = REPO_ROOT / "configs" / "suites" / "tcga_crc_survival.yaml"
FEATURES = ["ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM"]


def _suite(table: Path, output_dir: Path) -> SuiteConfig:
    """The bundled suite, on the given table, one seed and fewer bootstrap resamples (the statistics are the same)."""
    data: dict[str, Any] = yaml.safe_load(SUITE.read_text())
    data["tasks"][0]["source"] = str(table)
    # coxnet only, without the features + stage model: the deep heads and that model are tests/test_survival_heads.py's.
    data["tasks"][0]["survival"].update(adapters=["coxph"], combined=False)
    data["output_dir"] = str(output_dir)
    data["adapt"] = {"label_fractions": [1.0], "seeds": [0]}
    data["evaluate"] = {"n_bootstrap": 200}
    data["comparisons"] = {"n_bootstrap": 200}
    return SuiteConfig.model_validate(data)


def test_tcga_suite_features_vs_stage_and_resume(tcga_table: Path, tmp_path: Path) -> None:
    config = _suite(tcga_table, tmp_path / "run")
    first = run_suite(config, show_progress=False, echo=lambda _: None)
    assert first.cells_computed == 2 and first.cells_reused == 0  # features and stage-only, one seed each
    records = {(r.model, r.metric): r for r in first.results.records}
    assert {m for m, _ in records} == {"tissue-composition", "stage-only"}
    for (model, metric), r in records.items():
        assert r.ci_low <= r.value <= r.ci_high, (model, metric)
        assert r.n_test == 97 and r.n_train == 387
    for model in ("tissue-composition", "stage-only"):
        assert 0.5 < records[(model, "c_index")].value < 1.0
        assert {m for mm, m in records if mm == model} == {"c_index", "uno_c", "auc_1y", "auc_3y", "auc_5y"}

    task = first.results.metadata["tasks"]["tcga_crc_os"]
    assert task["splits"] == {"train": 387, "test": 97} and task["dropped_incomplete"] == 16  # no stage: left out
    assert task["events"]["test"] > 0
    groups = task["survival"]["risk_groups"]["stage-only"]
    assert groups["high"]["n"] + groups["low"]["n"] == 97 and 0.0 <= groups["p_value"] <= 1.0
    assert groups["high"]["survival"][0] == 1.0 and groups["low"]["time"][0] == 0.0
    (comparison,) = first.results.metadata["comparisons"]
    assert (comparison["model_a"], comparison["model_b"], comparison["metric"]) == (
        "tissue-composition",
        "stage-only",
        "c_index",
    )
    assert comparison["ci_low"] <= comparison["difference"] <= comparison["ci_high"]
    report = first.report_path.read_text()
    assert "Kaplan-Meier curves of predicted risk groups" in report

    # Harrell's C per tumour site, sex and MSI status of the test patients, from the table's own columns.
    subgroups = task["subgroups"]
    assert subgroups["columns"] == ["tumor_tissue_site", "gender", "msi_status"]
    assert subgroups["groups"]["gender"] == ["female", "male"] and "missing" in subgroups["groups"]["msi_status"]
    entries = {(c["model"], c["column"]): c for c in subgroups["cells"]}
    assert set(entries) == {(m, c) for m in ("tissue-composition", "stage-only") for c in subgroups["columns"]}
    sex = entries[("tissue-composition", "gender")]
    assert sex["metric"] == "c_index" and sum(g["n"] for g in sex["groups"]) == 97
    for group in sex["groups"]:
        assert group["status"] == "ok" and group["ci_low"] <= group["value"] <= group["ci_high"]
    assert sex["gap"]["ci_low"] <= sex["gap"]["value"] <= sex["gap"]["ci_high"]
    sizes = {g["group"]: (g["n"], g["status"]) for g in entries[("stage-only", "tumor_tissue_site")]["groups"]}
    assert sizes["missing"][1] == "too_small"  # fewer than min_group_size test patients: no number
    # Fewer than min_group_events deaths (default 5): no C-index either, however many patients the group has.
    for group in entries[("stage-only", "msi_status")]["groups"]:
        few_deaths = group["n"] >= subgroups["min_group_size"] and group["events"] < subgroups["min_group_events"]
        assert (group["status"] == "too_few_events") == few_deaths and (group["value"] is None or not few_deaths)
    assert any(g["status"] == "too_few_events" for g in entries[("stage-only", "msi_status")]["groups"])
    assert "Subgroups" in report

    predictions = sorted((tmp_path / "run" / "tasks" / "tcga_crc_os" / "predictions").glob("*.csv"))
    header, *rows = predictions[0].read_text().splitlines()
    assert header == "id,patient_id,time,event,risk" and len(rows) == 97

    second = run_suite(config, show_progress=False, echo=lambda _: None)
    assert second.cells_computed == 0 and second.cells_reused == 2
    again = {(r.model, r.metric): r.value for r in second.results.records}
    assert again == {key: r.value for key, r in records.items()}


def test_bundled_suite_validates_and_splits_by_patient(tcga_table: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the checks over every bundled suite ask of it: it validates, and its splits share no patient."""
    from medfoundry.config import load_config

    monkeypatch.chdir(REPO_ROOT)  # the suite's source is relative to the repository root
    config = load_config(SuiteConfig, SUITE)
    assert config.output_dir.parts[0] == "runs"
    spec = yaml.safe_load(SUITE.read_text())["tasks"][0]
    if not (REPO_ROOT / spec["source"]).is_file():
        pytest.skip(f"{spec['source']} is absent (the shared data folder is elsewhere)")
    task = load_task(TaskConfig(**spec))
    parts = {role: set(getattr(task, role).patient_ids) for role in ("train", "val", "test")}
    assert not parts["train"] & parts["test"] and not parts["val"] and len(parts["train"] | parts["test"]) == 484
    assert task.test.event.sum() == 20 and task.train.event.sum() == 80


def test_embeddings_joined_by_patient_match_the_table(tcga_table: Path, tmp_path: Path) -> None:
    """The nine columns written as an embeddings file (two rows for one patient) give the same task features."""
    import pandas as pd

    from medfoundry.models import feature_cache

    table = pd.read_csv(tcga_table)
    features = table[FEATURES].to_numpy(dtype=np.float32)
    patients = [str(p) for p in table["ID"]]
    # A second image of the first patient, as an embeddings file of several images per patient would hold.
    rows = np.vstack([features, features[:1] * 3])
    h5 = tmp_path / "tiles.h5"
    columns = {"ids": [f"img{i}" for i in range(len(rows))], "patient_ids": [*patients, patients[0]]}
    feature_cache.write(h5, rows, {}, columns)
    section = {"time_column": "days_to_event", "event_column": "vital_status", "patient_column": "ID"}
    from_columns = load_task(
        TaskConfig(name="t", kind="survival", source=str(tcga_table), survival={**section, "feature_columns": FEATURES})
    )
    from_h5 = load_task(
        TaskConfig(name="t", kind="survival", source=str(tcga_table), survival={**section, "embeddings": str(h5)})
    )
    assert from_h5.model_name == "tiles"
    expected = from_columns.data.features.copy()
    expected[0] = features[0] * 2  # the mean of the patient's two rows (x and 3x)
    np.testing.assert_allclose(from_h5.data.features, expected, rtol=1e-6)
    assert from_h5.splits["test"].tolist() == from_columns.splits["test"].tolist()


SECTION = {"time_column": "time", "event_column": "event", "patient_column": "patient", "split_column": "split"}


def _table(tmp_path: Path, rows: list[str], header: str = "patient,time,event,split,f1") -> Path:
    path = tmp_path / "survival.csv"
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def _good_rows() -> list[str]:
    return [f"p{i},{10 + i},{i % 2},{'test' if i >= 8 else 'train'},{i * 0.1}" for i in range(12)]


@pytest.mark.parametrize(
    ("change", "column", "problem"),
    [
        (lambda rows: [rows[0].replace("p0,10,", "p0,-5,"), *rows[1:]], "time", "negative time"),
        (lambda rows: [rows[0].replace("p0,10,0", "p0,10,2"), *rows[1:]], "event", "must be 0 (censored) or 1"),
        (lambda rows: [r if "test" not in r else r.replace(",1,test", ",0,test") for r in rows], "event", "no event"),
        (lambda rows: [*rows, rows[0]], "patient", "one row per patient"),
        (lambda rows: [rows[0].replace("p0,10,0", "p0,ten,0"), *rows[1:]], "time", "must be numeric"),
    ],
    ids=["negative-time", "event-not-binary", "no-events-in-test", "duplicate-patient", "time-not-numeric"],
)
def test_bad_table_one_line_naming_file_and_column(tmp_path: Path, change: Any, column: str, problem: str) -> None:
    path = _table(tmp_path, change(_good_rows()))
    with pytest.raises(DataError) as error:
        load_task(TaskConfig(name="bad", kind="survival", source=str(path), survival=SECTION))
    message = str(error.value)
    assert "\n" not in message and str(path) in message and f"'{column}'" in message and problem in message


def test_missing_column_is_named(tmp_path: Path) -> None:
    path = _table(tmp_path, _good_rows())
    with pytest.raises(DataError, match=r"survival\.csv: column 'vital' is missing"):
        load_task(
            TaskConfig(name="bad", kind="survival", source=str(path), survival={**SECTION, "event_column": "vital"})
        )


def test_good_small_table_loads_and_sections_are_checked(tmp_path: Path) -> None:
    path = _table(tmp_path, _good_rows())
    task = load_task(TaskConfig(name="ok", kind="survival", source=str(path), survival=SECTION))
    assert task.data.feature_names == ["f1"] and len(task.splits["test"]) == 4 and not task.carved
    with pytest.raises(ValueError, match="survival section goes with kind survival"):
        TaskConfig(name="x", source=str(path), survival=SECTION)
    with pytest.raises(ValueError, match="survival task needs a survival section"):
        TaskConfig(name="x", kind="survival", source=str(path))
    with pytest.raises(ValueError, match="survival.time_column"):
        TaskConfig(name="x", kind="survival", source=str(path), survival={"event_column": "e", "patient_column": "p"})


def test_subgroup_columns_come_from_the_table_and_bad_ones_are_one_line(tmp_path: Path) -> None:
    rows = [f"{r},{'colon' if i % 2 else ''}" for i, r in enumerate(_good_rows())]
    path = _table(tmp_path, rows, header="patient,time,event,split,f1,site")
    task = load_task(
        TaskConfig(name="ok", kind="survival", source=str(path), survival=SECTION, subgroups=["site"], min_group_size=2)
    )
    assert task.test.metadata == {"site": ["missing", "colon", "missing", "colon"]}  # an empty cell: "missing"
    with pytest.raises(DataError, match=r"survival\.csv: column 'sex' is missing"):
        load_task(TaskConfig(name="bad", kind="survival", source=str(path), survival=SECTION, subgroups=["sex"]))
    with pytest.raises(DataError, match=r"survival\.csv: subgroup column 'site' has fewer than two groups"):
        load_task(TaskConfig(name="bad", kind="survival", source=str(path), survival=SECTION, subgroups=["site"]))
    with pytest.raises(MedfoundryError, match="subgroup columns come from its own table"):
        load_task(
            TaskConfig(
                name="bad",
                kind="survival",
                source=str(path),
                survival=SECTION,
                subgroups=["site"],
                subgroup_file=str(path),
            )  # fmt: skip
        )
