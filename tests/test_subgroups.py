"""Subgroups: per-sample metadata from readers (manifest columns, folder file names, a joined CSV), per-group
metrics with patient-bootstrap CIs, the worst group and the gap, bad input, and one engine run that reports
calibration before / after temperature scaling and subgroups in results.json and report.html."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medfoundry.config import SuiteConfig
from medfoundry.data.manifest import load_image_folder, load_manifest
from medfoundry.errors import DataError
from medfoundry.evaluate.subgroups import SubgroupSettings, check_subgroups, subgroup_analysis, subgroup_entry


def test_subgroup_gap_is_flagged_and_small_groups_are_not_numbers() -> None:
    rng = np.random.default_rng(0)
    n = 300
    groups = np.array(["a"] * 140 + ["b"] * 140 + ["c"] * 20)
    labels = rng.integers(0, 2, n)
    # Informative scores in group a, noise in group b: a real AUROC gap.
    signal = np.where(groups == "a", labels * 2.0, 0.0) + rng.normal(0, 1, n)
    p1 = 1 / (1 + np.exp(-signal))
    proba = np.column_stack([1 - p1, p1])
    patients = [f"p{i // 2}" for i in range(n)]
    settings = SubgroupSettings(("site",), min_group_size=25, n_bootstrap=300)
    (entry,) = subgroup_analysis(labels, proba, patients, {"site": list(groups)}, ["auroc"], settings)
    by_group = {g["group"]: g for g in entry["groups"]}
    assert entry["worst_group"] == "b" and entry["best_group"] == "a"
    assert by_group["a"]["ci_low"] < by_group["a"]["value"] < by_group["a"]["ci_high"]
    assert by_group["c"]["status"] == "too_small" and by_group["c"]["value"] is None and by_group["c"]["n"] == 20
    assert entry["gap"]["ci_low"] > 0 and entry["gap_excludes_zero"]


def test_one_class_group_is_undefined_for_auroc_but_scored_for_accuracy() -> None:
    labels = np.array([0, 1] * 20 + [1] * 20)
    proba = np.column_stack([1 - np.linspace(0.1, 0.9, 60), np.linspace(0.1, 0.9, 60)])
    metadata = {"type": ["mixed"] * 40 + ["virus"] * 20}
    settings = SubgroupSettings(("type",), min_group_size=10, n_bootstrap=100)
    entries = subgroup_analysis(labels, proba, list(map(str, range(60))), metadata, ["auroc", "accuracy"], settings)
    auroc, accuracy = entries
    assert [g["status"] for g in auroc["groups"]] == ["ok", "undefined"] and auroc["gap"] is None
    assert [g["status"] for g in accuracy["groups"]] == ["ok", "ok"] and accuracy["gap"] is not None


def test_survival_group_with_too_few_events_is_not_a_number() -> None:
    """A C-index over three deaths swings on one patient: the group is reported as too few events, not scored."""
    from sksurv.metrics import concordance_index_censored

    rng = np.random.default_rng(0)
    groups = np.array(["colon"] * 40 + ["rectum"] * 30)
    event = np.zeros(70, dtype=bool)
    event[rng.choice(40, 12, replace=False)] = True
    event[40 + rng.choice(30, 3, replace=False)] = True
    time, risk = rng.uniform(1, 60, 70), rng.normal(size=70)
    everyone = np.arange(70)

    def point_of(cases: np.ndarray) -> float:  # Harrell's C of a boolean mask or an index array of cases
        return float(concordance_index_censored(event[cases], time[cases], risk[cases])[0])

    def draws_of(weights: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return np.asarray([point_of(np.repeat(everyone, row)) for row in (weights * mask).astype(np.int64)])

    settings = SubgroupSettings(("site",), min_group_size=10, n_bootstrap=20, min_group_events=5)
    patients = [f"p{i}" for i in range(70)]
    entry = subgroup_entry("site", "c_index", list(groups), patients, point_of, draws_of, settings, event)
    by_group = {g["group"]: g for g in entry["groups"]}
    assert by_group["colon"]["status"] == "ok" and by_group["colon"]["events"] == 12
    assert by_group["rectum"]["status"] == "too_few_events" and by_group["rectum"]["value"] is None
    assert by_group["rectum"]["events"] == 3 and entry["gap"] is None  # one group with a value: no gap
    notes = check_subgroups({"site": list(groups)}, ["site"], 10, "survival.csv", event, 5)
    assert notes == [
        "survival.csv: subgroup column 'site', group 'rectum' has 3 event(s) in the test split, below "
        "min_group_events=5: reported as too few events"
    ]


def test_bad_subgroup_columns_give_one_line_naming_file_and_column(tmp_path: Path) -> None:
    source = tmp_path / "cases.csv"
    with pytest.raises(DataError, match=r"cases\.csv.*'sex' not found.*\['site'\]"):
        check_subgroups({"site": ["a"] * 20}, ["sex"], 10, source)
    with pytest.raises(DataError, match=r"cases\.csv.*'site' has fewer than two groups.*a: 18, b: 2"):
        check_subgroups({"site": ["a"] * 18 + ["b"] * 2}, ["site"], 10, source)
    notes = check_subgroups({"site": ["a"] * 12 + ["b"] * 12 + ["c"] * 3}, ["site"], 10, source)
    assert len(notes) == 1 and "'c' has 3 test case(s)" in notes[0] and "cases.csv" in notes[0]


def _write_png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8)).save(path)


def test_folder_group_regex_and_manifest_columns_become_metadata(tmp_path: Path) -> None:
    pixels = np.zeros((8, 8), dtype=np.uint8)
    for name in ("NORMAL/IM-0001-0001", "PNEUMONIA/person1_bacteria_1", "PNEUMONIA/person2_virus_3"):
        _write_png(tmp_path / "cxr" / f"{name}.png", pixels)
    images = load_image_folder(tmp_path / "cxr", group_regex=r"_(?P<pneumonia_type>bacteria|virus)_")["train"]
    types = dict(zip(images.ids, images.metadata["pneumonia_type"], strict=True))
    assert types == {"NORMAL/IM-0001-0001": "none", "PNEUMONIA/person1_bacteria_1": "bacteria",
                     "PNEUMONIA/person2_virus_3": "virus"}  # fmt: skip
    assert images.subset([2, 0]).metadata == {"pneumonia_type": [images.metadata["pneumonia_type"][i] for i in (2, 0)]}
    with pytest.raises(DataError, match="named groups"):
        load_image_folder(tmp_path / "cxr", group_regex=r"_(bacteria|virus)_")

    manifest = tmp_path / "cases.csv"
    manifest.write_text(
        "path,label,split,site\ncxr/NORMAL/IM-0001-0001.png,0,train,A\ncxr/PNEUMONIA/person2_virus_3.png,1,test,B\n"
    )
    splits = load_manifest(manifest)
    assert splits["train"].metadata == {"site": ["A"]} and splits["test"].metadata == {"site": ["B"]}


@pytest.fixture(scope="module")
def small_suite_run(breastmnist_npz: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    """A BreastMNIST manifest (120 real images) with an ``exposure`` column (image mean above / below the median,
    a property of the images themselves), run through the engine with one random ViT and the linear probe."""
    from medfoundry.bench.engine import run_suite

    root = tmp_path_factory.mktemp("calib")
    data = np.load(breastmnist_npz)
    rows = []
    for split, count in (("train", 40), ("val", 30), ("test", 50)):
        images, labels = data[f"{split}_images"][:count], data[f"{split}_labels"][:count]
        median = np.median(images.reshape(count, -1).mean(1))
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            path = root / "images" / f"{split}_{i}.png"
            _write_png(path, image)
            exposure = "bright" if image.mean() > median else "dark"
            # Three test images form a group below min_group_size: it must come out as too small.
            exposure = "saturated" if split == "test" and i < 3 else exposure
            rows.append({"path": str(path), "label": int(label), "split": split, "exposure": exposure})
    with (root / "cases.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    config = SuiteConfig.model_validate(
        {
            "name": "calib-subgroups",
            "output_dir": str(root / "run"),
            "tasks": [
                {
                    "name": "breast-exposure",
                    "source": f"csv:{root / 'cases.csv'}",
                    "temperature_scaling": True,
                    "subgroups": ["exposure"],
                    "min_group_size": 10,
                }
            ],
            "encoders": [{"name": "vit-random", "backbone": "vit_tiny_28", "in_chans": 1, "img_size": 28}],
            # One C and two folds: the probe's own selection is not what these tests are about.
            "adapt": {
                "adapters": ["linear"],
                "label_fractions": [1.0],
                "seeds": [0],
                "linear_c_grid": [1.0],
                "selection_folds": 2,
            },
            "finetune": {"modes": []},
            "evaluate": {"n_bootstrap": 200},
        }
    )
    out = run_suite(config, show_progress=False, echo=lambda _: None)
    return json.loads(out.results_path.read_text()), out.report_path.read_text()


def test_suite_reports_calibration_before_and_after(small_suite_run: tuple[dict, str]) -> None:
    results, report = small_suite_run
    calibration = results["metadata"]["tasks"]["breast-exposure"]["calibration"]
    assert calibration["temperature_scaling"] is True
    (cell,) = calibration["cells"]
    assert cell["temperature"] > 0
    for state in ("before", "after"):
        for metric in ("ece", "brier"):
            assert cell[state][metric]["ci_low"] <= cell[state][metric]["ci_high"]
        assert sum(b["n"] for b in cell[state]["bins"]) == 50
    assert "Reliability diagrams" in report and "Brier after" in report
    assert "breast-exposure/calibration" in results["metadata"]["durations"]


def test_suite_reports_every_metric_per_subgroup(small_suite_run: tuple[dict, str]) -> None:
    results, report = small_suite_run
    subgroups = results["metadata"]["tasks"]["breast-exposure"]["subgroups"]
    assert subgroups["columns"] == ["exposure"] and subgroups["groups"]["exposure"] == ["bright", "dark", "saturated"]
    metrics = [e["metric"] for e in subgroups["cells"]]
    assert metrics == ["auroc", "balanced_accuracy", "f1", "ece"]
    for entry in subgroups["cells"]:
        by_group = {g["group"]: g for g in entry["groups"]}
        assert by_group["saturated"]["status"] == "too_small" and by_group["saturated"]["value"] is None
        for name in ("bright", "dark"):
            if by_group[name]["status"] == "ok":
                assert by_group[name]["ci_low"] <= by_group[name]["ci_high"]
        assert entry["gap"] is None or entry["gap"]["value"] >= 0
    assert (
        "<h3>Subgroups</h3>" in report and "Metrics per subgroup" in report and "saturated (too small, n=3)" in report
    )


def test_subgroup_file_joins_by_bare_sample_name(tmp_path: Path) -> None:
    from medfoundry.bench.classification import join_subgroup_file
    from medfoundry.data.sample import ArrayImageSet

    images = ArrayImageSet("test", tmp_path, np.zeros((2, 1, 4, 4)), ["test/IDRiD_001", "test/IDRiD_002"], ["a", "b"])
    table = tmp_path / "labels.csv"
    # As the official IDRiD CSV: CRLF lines and a trailing space in a header cell.
    table.write_bytes(b"Image name,Risk of macular edema \r\nIDRiD_001,0\r\nIDRiD_002,2\r\n")
    join_subgroup_file(images, table, "Image name")
    assert images.metadata == {"Risk of macular edema": ["0", "2"]}
    images.ids.append("test/IDRiD_003")
    with pytest.raises(DataError, match=r"labels\.csv.*1 test case\(s\) have no row.*IDRiD_003"):
        join_subgroup_file(images, table, "Image name")
    with pytest.raises(DataError, match=r"no id column 'id'"):
        join_subgroup_file(images, table, "id")
