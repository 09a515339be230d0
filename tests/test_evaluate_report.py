"""results.json round-trip and validation, and the self-contained HTML report."""

from __future__ import annotations

import base64
import io
import json
import math
import re
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

from medfoundry.errors import DataError, OutputError
from medfoundry.evaluate.report import format_summary_text, render_report, summarise_table
from medfoundry.evaluate.results import (
    ResultRecord,
    ResultsFile,
    read_results,
    records_from_metrics,
    run_metadata,
    write_results,
)

MODELS = {"resnet50": 0.0, "dinov2-vitb14": 0.06}
ADAPTERS = {"linear": 0.0, "lora": 0.02}
FRACTIONS = (0.01, 0.1, 1.0)
METRICS = ("auroc", "balanced_accuracy", "accuracy")


def _make_results() -> ResultsFile:
    records = []
    for model, model_gain in MODELS.items():
        for adapter, adapter_gain in ADAPTERS.items():
            for fraction in FRACTIONS:
                for seed in range(3):
                    for m_i, metric in enumerate(METRICS):
                        value = 0.6 + 0.1 * math.log10(fraction * 100) + model_gain + adapter_gain
                        value += 0.004 * (seed - 1) - 0.01 * m_i
                        # Seed 0 at 1% has an undefined CI, as happens when a resampled class vanishes.
                        nan_ci = fraction == 0.01 and seed == 0
                        records.append(
                            ResultRecord(
                                task="breastmnist",
                                model=model,
                                adapter=adapter,
                                label_fraction=fraction,
                                seed=seed,
                                metric=metric,
                                value=value,
                                ci_low=math.nan if nan_ci else value - 0.04,
                                ci_high=math.nan if nan_ci else value + 0.04,
                                n_train=round(546 * fraction),
                                n_test=156,
                            )
                        )
    meta = run_metadata(
        config={"dataset": "breastmnist", "patient_ids": ["P001", "P002"]},
        durations={"embed": 125.0, "adapt": 3700.0},
        dataset="BreastMNIST",
    )
    return ResultsFile(records=records, metadata=meta)


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def test_round_trip_preserves_records_and_stores_nan_as_null(tmp_path: Path) -> None:
    results = _make_results()
    path = write_results(tmp_path / "out" / "results.json", results)
    raw = json.loads(path.read_text())
    assert raw["schema_version"] == 1
    assert "NaN" not in path.read_text()
    nan_records = [r for r in raw["records"] if r["ci_low"] is None]
    assert len(nan_records) == 2 * 2 * 3 and all(r["ci_high"] is None for r in nan_records)

    back = read_results(path)
    assert back.schema_version == 1 and back.metadata == raw["metadata"]
    assert len(back.records) == len(results.records) == 2 * 2 * 3 * 3 * 3
    for a, b in zip(results.records, back.records, strict=True):
        assert (a.task, a.model, a.adapter, a.label_fraction, a.seed, a.metric) == (
            b.task,
            b.model,
            b.adapter,
            b.label_fraction,
            b.seed,
            b.metric,
        )
        assert (a.n_train, a.n_test) == (b.n_train, b.n_test)
        assert all(_same(x, y) for x, y in [(a.value, b.value), (a.ci_low, b.ci_low), (a.ci_high, b.ci_high)])
    # Atomic write leaves no temporary files behind.
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]


def test_records_from_metrics_builds_one_record_per_metric() -> None:
    from medfoundry.evaluate.metrics import MetricValue

    recs = records_from_metrics(
        {"auroc": MetricValue(0.9, 0.85, 0.95), "accuracy": MetricValue(0.8, math.nan, math.nan)},
        task="t",
        model="m",
        adapter="linear",
        label_fraction=0.1,
        seed=2,
        n_train=10,
        n_test=20,
    )
    assert [r.metric for r in recs] == ["auroc", "accuracy"]
    assert recs[0].ci_high == 0.95 and math.isnan(recs[1].ci_low)


def test_write_results_names_the_path_when_not_writable(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    target = blocker / "results.json"
    with pytest.raises(OutputError, match=re.escape(str(target))):
        write_results(target, _make_results())


def _record_dict() -> dict[str, object]:
    return {
        "task": "t",
        "model": "m",
        "adapter": "linear",
        "label_fraction": 0.1,
        "seed": 0,
        "metric": "auroc",
        "value": 0.9,
        "ci_low": None,
        "ci_high": None,
        "n_train": 5,
        "n_test": 9,
    }


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("{not json", r"not valid JSON \(line 1"),
        ("[1, 2]", "top level must be a JSON object"),
        (json.dumps({"records": []}), "missing schema_version"),
        (json.dumps({"schema_version": 2, "records": []}), "unsupported schema_version 2, expected 1"),
        (json.dumps({"schema_version": 1}), "missing records"),
        (json.dumps({"schema_version": 1, "records": {}}), "records must be a list"),
        (json.dumps({"schema_version": 1, "metadata": [], "records": []}), "metadata must be an object"),
        (
            json.dumps({"schema_version": 1, "records": [{k: v for k, v in _record_dict().items() if k != "seed"}]}),
            r"records\[0\] is missing field\(s\) seed",
        ),
        (
            json.dumps({"schema_version": 1, "records": [{**_record_dict(), "seed": "one"}]}),
            r"records\[0\]\.seed must be an integer, got 'one'",
        ),
        (
            json.dumps({"schema_version": 1, "records": [_record_dict(), {**_record_dict(), "label_fraction": 5}]}),
            r"records\[1\]\.label_fraction must be a number in \(0, 1\]",
        ),
        (
            json.dumps({"schema_version": 1, "records": [{**_record_dict(), "value": "high"}]}),
            r"records\[0\]\.value must be a number or null",
        ),
        (
            json.dumps({"schema_version": 1, "records": [{**_record_dict(), "extra": 1}]}),
            r"records\[0\] has unknown field\(s\) extra",
        ),
    ],
)
def test_schema_errors_name_the_file_and_the_problem(tmp_path: Path, content: str, problem: str) -> None:
    path = tmp_path / "bad-results.json"
    path.write_text(content)
    with pytest.raises(DataError, match=problem) as info:
        read_results(path)
    message = str(info.value)
    assert message.startswith(str(path)) and "\n" not in message


def test_missing_results_file_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="results file not found"):
        read_results(tmp_path / "nope.json")


def test_summarise_table_aggregates_over_seeds() -> None:
    rows = summarise_table(_make_results())
    assert len(rows) == 2 * 2 * 3
    row = next(r for r in rows if (r["model"], r["adapter"], r["label_fraction"]) == ("dinov2-vitb14", "lora", 0.1))
    assert row["n_seeds"] == 3 and row["n_train"] == 55 and row["n_test"] == 156
    assert row["auroc"] == pytest.approx(0.6 + 0.1 + 0.06 + 0.02)
    assert row["auroc_sd"] == pytest.approx(0.004)
    assert row["auroc_ci_low"] == pytest.approx(row["auroc"] - 0.04)
    # At 1% one seed has no CI: the CI mean comes from the two seeds that have one.
    low_row = next(r for r in rows if r["label_fraction"] == 0.01)
    assert math.isfinite(low_row["auroc_ci_low"])
    text = format_summary_text(rows)
    assert "dinov2-vitb14" in text and "100%" in text and "± 0.004" in text


def test_render_report_is_self_contained_and_complete(tmp_path: Path) -> None:
    results_path = write_results(tmp_path / "results.json", _make_results())
    out = render_report(results_path, tmp_path / "report" / "report.html", title="BreastMNIST benchmark")
    assert out == tmp_path / "report" / "report.html"
    html = out.read_text(encoding="utf-8")

    # One plot per metric, each a real PNG.
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(images) == 3
    for encoded in images:
        data = base64.b64decode(encoded)
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
        with Image.open(io.BytesIO(data)) as img:
            img.verify()
        with Image.open(io.BytesIO(data)) as img:
            assert img.width > 400 and img.height > 300

    # Nothing is fetched: no URLs, scripts, external stylesheets or non-data sources.
    assert "http" not in html.lower()
    assert "<script" not in html and "<link" not in html
    assert all(src.startswith("data:") for src in re.findall(r'src="([^"]*)"', html))

    # Metadata shown, patient ids never.
    assert "BreastMNIST benchmark" in html and "BreastMNIST" in html
    assert "2 min 05 s" in html and "1 h 01 min" in html
    assert "P001" not in html

    # Table: every (model, adapter, fraction) row, mean ± sd and the CI, best per fraction in bold.
    rows = summarise_table(read_results(results_path))
    assert html.count("<tr>") == 1 + len(rows)
    for label in ("1%", "10%", "100%"):
        assert f">{label}</td>" in html
    best = max((r for r in rows if r["label_fraction"] == 1.0), key=lambda r: r["auroc"])
    assert (best["model"], best["adapter"]) == ("dinov2-vitb14", "lora")
    assert f'<strong><span class="mean">{best["auroc"]:.3f}</span></strong>' in html
    assert f"[{best['auroc_ci_low']:.3f}, {best['auroc_ci_high']:.3f}]" in html
    assert html.count("<strong>") == 3 * 3  # fractions × metrics
    assert "± 0.004" in html

    # Summary: the two dinov2 adapters differ by 0.02 with ±0.04 CIs, so the lead is within noise.
    assert "within noise" in html
    assert [p.name for p in out.parent.iterdir()] == ["report.html"]


def test_report_says_clearly_ahead_and_handles_missing_ci(tmp_path: Path) -> None:
    base = ResultRecord("t", "a", "linear", 0.5, 0, "auroc", 0.9, 0.88, 0.92, 10, 50)
    records = [
        base,
        replace(base, model="b", value=0.7, ci_low=0.65, ci_high=0.75),
        replace(base, label_fraction=1.0, value=0.95, ci_low=math.nan, ci_high=math.nan),
        replace(base, label_fraction=1.0, model="b", value=0.8, ci_low=math.nan, ci_high=math.nan),
    ]
    out = render_report(ResultsFile(records=records), tmp_path / "r.html")
    html = out.read_text()
    assert "clearly ahead" in html and "within noise" not in html
    assert "CI n/a" in html and "No confidence interval is available" in html
    assert html.count("data:image/png;base64,") == 1  # only AUROC is present


def test_report_for_empty_results(tmp_path: Path) -> None:
    html = render_report(ResultsFile(), tmp_path / "r.html").read_text()
    assert "contains no records" in html


def test_save_plot_for_inspection(tmp_path: Path) -> None:
    """Keeps a copy of the AUROC plot at /tmp for a human to look at."""
    out = render_report(_make_results(), tmp_path / "r.html")
    encoded = re.search(r"data:image/png;base64,([A-Za-z0-9+/=]+)", out.read_text())
    assert encoded is not None
    Path("/tmp/medfoundry_report_auroc.png").write_bytes(base64.b64decode(encoded.group(1)))
