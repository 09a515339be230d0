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
from medfoundry.evaluate.results import (
    ResultRecord,
    ResultsFile,
    read_results,
    records_from_metrics,
    run_metadata,
    write_results,
)
from medfoundry.report import (
    format_markdown_tables,
    format_summary_text,
    render_report,
    summarise_table,
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


# ------------------------------------------------------------------ adaptation ladder, comparisons, metrics

LADDER_COSTS = {"knn": (0, 0.002), "linear": (769, 0.8), "finetune-full": (86_000_000, 900.0)}


def _suite_results(with_costs: bool = True) -> ResultsFile:
    """Two tasks, two models, three adapters and costs, as the suite runner writes them."""
    records = []
    for task, metrics in (("breastmnist", ("auroc", "f1", "ece")), ("idrid-dr-grade", ("kappa", "accuracy"))):
        for m_i, model in enumerate(("dino", "random-init")):
            for a_i, (adapter, (params, seconds)) in enumerate(LADDER_COSTS.items()):
                for fraction in (0.1, 1.0):
                    for seed in range(2):
                        for metric in metrics:
                            value = 0.6 + 0.1 * a_i - 0.1 * m_i + 0.1 * fraction + 0.01 * seed
                            if metric == "ece":
                                value = 0.3 - value / 4
                            records.append(
                                ResultRecord(
                                    task,
                                    model,
                                    adapter,
                                    fraction,
                                    seed,
                                    metric,
                                    value,
                                    value - 0.03,
                                    value + 0.03,
                                    round(500 * fraction),
                                    100,
                                    trainable_params=params if with_costs else None,
                                    fit_seconds=seconds * (1 + seed) if with_costs else None,
                                )
                            )
    return ResultsFile(records=records, metadata={"primary_metric": {"idrid-dr-grade": "kappa"}})


def _comparison(**overrides: object) -> dict[str, object]:
    base: dict[str, object] = {
        "task": "breastmnist",
        "metric": "auroc",
        "label_fraction": 0.1,
        "model_a": "dino",
        "adapter_a": "linear",
        "model_b": "random-init",
        "adapter_b": "linear",
        "value_a": 0.846,
        "value_b": 0.8,
        "difference": 0.046,
        "ci_low": 0.012,
        "ci_high": 0.08,
        "share_opposite": 0.004,
        "n_seeds": 2,
        "confidence": 0.95,
    }
    return {**base, **overrides}


def _images(html: str) -> list[bytes]:
    return [base64.b64decode(s) for s in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)]


def test_ladder_points_use_the_largest_fraction_and_average_costs_over_seeds() -> None:
    from medfoundry.report import ladder_points

    records = [r for r in _suite_results().records if r.label_fraction < 1.0]
    fraction, points = ladder_points(records, "breastmnist", "auroc")
    assert fraction == 0.1 and len(points) == 2 * 3
    linear = next(p for p in points if (p.model, p.adapter) == ("dino", "linear"))
    assert linear.trainable_params == 769 and linear.fit_seconds == pytest.approx(0.8 * 1.5)
    assert linear.value == pytest.approx(0.6 + 0.1 + 0.01 + 0.005)
    assert linear.ci_low == pytest.approx(linear.value - 0.03)
    # The adapters follow the ladder (cheapest first), not the alphabet.
    assert [p.adapter for p in points if p.model == "dino"] == ["knn", "linear", "finetune-full"]
    assert ladder_points(records, "no-such-task", "auroc") == (None, [])


def test_ladder_plot_is_drawn_only_when_costs_are_recorded(tmp_path: Path) -> None:
    from medfoundry.report import ladder_points, plot_adaptation_ladder

    with_costs = render_report(_suite_results(), tmp_path / "a.html").read_text()
    without = render_report(_suite_results(with_costs=False), tmp_path / "b.html").read_text()
    # Per task: one label-efficiency plot per plotted metric, plus the ladder when costs exist.
    assert with_costs.count("<h3>Adaptation ladder</h3>") == 2
    assert "Adaptation ladder" not in without
    assert len(_images(with_costs)) == len(_images(without)) + 2
    ladder_alt = re.search(r'alt="Quadratic weighted kappa versus trainable parameters[^"]*"', with_costs)
    assert ladder_alt is not None  # the idrid ladder uses the task's primary metric
    for data in _images(with_costs):
        with Image.open(io.BytesIO(data)) as img:
            assert img.width > 400 and img.height > 300

    colours = {"dino": "#0072B2", "random-init": "#D55E00"}
    styles = {"knn": ("-", "o"), "linear": ("--", "s"), "finetune-full": (":", "^")}
    _, points = ladder_points(_suite_results(with_costs=False).records, "breastmnist", "auroc")
    assert plot_adaptation_ladder(points, "auroc", colours, styles, "t") is None
    # Only one of the two costs recorded: still a figure (the other panel says so).
    only_params = [replace(p, trainable_params=5.0) for p in points]
    assert plot_adaptation_ladder(only_params, "auroc", colours, styles, "t") is not None


def test_comparison_sentences_say_significant_or_not() -> None:
    from medfoundry.report import Comparison, comparison_sentence

    significant = Comparison.from_mapping(_comparison())
    assert significant is not None and significant.significant
    assert comparison_sentence(significant) == (
        "At 10% labels, dino + linear beats random-init + linear on AUROC by 0.046 (95% CI 0.012 to 0.080): "
        "significant."
    )
    not_significant = Comparison.from_mapping(_comparison(difference=0.016, ci_low=-0.02, ci_high=0.05))
    assert not_significant is not None and not_significant.significant is False
    assert comparison_sentence(not_significant) == (
        "At 10% labels, dino + linear is ahead of random-init + linear on AUROC by 0.016: "
        "not significant (95% CI −0.020 to 0.050 includes 0)."
    )
    # B ahead: the sentence names B first and flips the CI so it reads as B's gain.
    b_ahead = Comparison.from_mapping(_comparison(difference=-0.03, ci_low=-0.05, ci_high=-0.01))
    assert b_ahead is not None
    assert comparison_sentence(b_ahead).startswith("At 10% labels, random-init + linear beats dino + linear on AUROC")
    assert "by 0.030 (95% CI 0.010 to 0.050): significant." in comparison_sentence(b_ahead)
    no_ci = Comparison.from_mapping(_comparison(ci_low=None, ci_high=None))
    assert no_ci is not None and comparison_sentence(no_ci).endswith("not judged (no confidence interval).")


def test_comparison_sentences_respect_lower_is_better_for_ece() -> None:
    from medfoundry.report import Comparison, comparison_sentence

    # ECE: A − B < 0 means A is better calibrated.
    a_better = Comparison.from_mapping(_comparison(metric="ece", difference=-0.04, ci_low=-0.07, ci_high=-0.01))
    assert a_better is not None
    assert comparison_sentence(a_better) == (
        "At 10% labels, dino + linear beats random-init + linear on ECE (lower is better) by 0.040 "
        "(95% CI 0.010 to 0.070): significant."
    )
    # A − B = +0.02 on ECE favours B (lower) by 0.02, and the CI of A − B is then also the CI of B's gain.
    b_better = Comparison.from_mapping(_comparison(metric="ece", difference=0.02, ci_low=-0.01, ci_high=0.05))
    assert b_better is not None
    assert comparison_sentence(b_better) == (
        "At 10% labels, random-init + linear is ahead of dino + linear on ECE (lower is better) by 0.020: "
        "not significant (95% CI −0.010 to 0.050 includes 0)."
    )


def test_report_shows_comparisons_per_task_ordered_by_fraction(tmp_path: Path) -> None:
    res = _suite_results()
    res.metadata["comparisons"] = [
        _comparison(label_fraction=1.0, difference=0.016, ci_low=-0.02, ci_high=0.05),
        _comparison(),
        _comparison(task="idrid-dr-grade", metric="kappa", label_fraction=1.0),
        {"task": "breastmnist", "metric": "auroc"},  # malformed: skipped, not fatal
        "not a comparison",
    ]
    html = render_report(res, tmp_path / "r.html").read_text()
    first, second = html.index("Task: breastmnist"), html.index("Task: idrid-dr-grade")
    breast, idrid = html[first:second], html[second:]
    assert breast.index("At 10% labels") < breast.index("At 100% labels")
    assert '<span class="sig">significant</span>' in breast and '<span class="nonsig">not significant</span>' in breast
    assert "on Quadratic weighted kappa by 0.046" in idrid and "on AUROC" not in idrid
    # The comparison table: one row per comparison with the difference and its CI.
    assert "95% [0.012, 0.080]" in breast and "95% [−0.020, 0.050]" in breast
    # With paired comparisons the conservative overlap summary is not shown.
    assert "conservative" not in html and "within noise" not in html


def test_report_tabulates_every_metric_and_ranks_ece_lowest_first(tmp_path: Path) -> None:
    html = render_report(_suite_results(), tmp_path / "r.html").read_text()
    breast = html[html.index("Task: breastmnist") : html.index("Task: idrid-dr-grade")]
    idrid = html[html.index("Task: idrid-dr-grade") :]
    assert "<th>F1</th>" in breast and "<th>ECE ↓</th>" in breast and "Quadratic weighted kappa" not in breast
    assert "<th>Quadratic weighted kappa</th>" in idrid and "<th>AUROC</th>" not in idrid
    # dino + finetune-full has the highest AUROC and so the lowest ECE: both in bold at 100%.
    rows = [r for r in summarise_table(_suite_results()) if r["task"] == "breastmnist" and r["label_fraction"] == 1.0]
    best_ece = min(rows, key=lambda r: r["ece"])
    assert (best_ece["model"], best_ece["adapter"]) == ("dino", "finetune-full")
    assert f'<strong><span class="mean">{best_ece["ece"]:.3f}</span></strong>' in breast
    assert f"[{best_ece['ece_ci_low']:.3f}, {best_ece['ece_ci_high']:.3f}]" in breast
    worst_ece = max(rows, key=lambda r: r["ece"])
    assert f'<strong><span class="mean">{worst_ece["ece"]:.3f}</span></strong>' not in breast


def test_overlap_summary_on_ece_names_the_lowest_and_says_it_is_conservative(tmp_path: Path) -> None:
    base = ResultRecord("t", "a", "linear", 1.0, 0, "ece", 0.05, 0.04, 0.06, 10, 50)
    records = [base, replace(base, model="b", value=0.2, ci_low=0.18, ci_high=0.22)]
    html = render_report(ResultsFile(records=records), tmp_path / "r.html").read_text()
    assert "<b>a + linear</b> has the lowest ECE" in html and "clearly ahead" in html
    assert "conservative" in html


def test_old_results_file_without_costs_or_comparisons_still_renders(tmp_path: Path) -> None:
    raw = {"schema_version": 1, "metadata": {"durations": {"embed": 5.0}}, "records": [_record_dict()]}
    path = tmp_path / "results.json"
    path.write_text(json.dumps(raw))
    html = render_report(path, tmp_path / "r.html").read_text()
    assert "Adaptation ladder" not in html and "Paired comparisons" not in html
    assert "has the highest AUROC" in html and "conservative" in html
    assert len(_images(html)) == 1 and "5.0 s" in html


def test_many_durations_get_a_table(tmp_path: Path) -> None:
    res = _suite_results()
    res.metadata["durations"] = {f"breastmnist/embed/model{i}": 60.0 * i for i in range(6)}
    html = render_report(res, tmp_path / "r.html").read_text()
    assert "<h2>Run time</h2>" in html and "breastmnist/embed/model5" in html and "5 min 00 s" in html


def test_markdown_tables_pivot_the_headline_metric_by_fraction() -> None:
    results = _make_results()
    text = format_markdown_tables(results, {"breastmnist": "balanced_accuracy"})
    lines = text.splitlines()
    assert lines[0].startswith("**breastmnist**: Balanced accuracy")
    assert lines[2] == "| model | adapter | 1% | 10% | 100% |"
    body = [line for line in lines[4:] if line.startswith("| ")]
    assert len(body) == len(MODELS) * len(ADAPTERS)
    # dinov2 + lora at 100%: 0.6 + 0.2 + 0.06 + 0.02 - 0.01 (balanced accuracy), CI +- 0.04
    assert "| dinov2-vitb14 | lora |" in text and "0.870 [0.830, 0.910]" in text
    assert format_markdown_tables(results).splitlines()[0].startswith("**breastmnist**: AUROC")


def test_report_header_states_how_splits_were_grouped_and_warns_of_a_thin_test_split(tmp_path: Path) -> None:
    results = _make_results()
    grouping = "grouped by patient id (40/5/1 patients in train/val/test, none in two splits)"
    warning = "breastmnist: the test split holds 1 patient(s); ... confidence interval equals its point estimate"
    results.metadata["tasks"] = {"breastmnist": {"grouping": grouping, "warnings": [warning]}}
    html = render_report(results, tmp_path / "report.html").read_text(encoding="utf-8")
    assert "<dt>Splits</dt><dd>" + grouping in html
    assert "<dt>⚠ Warning</dt><dd>" + warning in html


def test_health_section_shows_the_thresholds_and_the_monitors_verdict(tmp_path: Path) -> None:
    import torch

    from medfoundry.ssl.monitor import HEALTH_THRESHOLDS, CollapseMonitor

    features = torch.randn(128, 192, generator=torch.Generator().manual_seed(0))
    monitor = CollapseMonitor()
    for step in range(0, 480, 10):  # prototype use under 10% at all but the last reading
        use = 0.102 if step == 470 else 0.06
        monitor.update(step, features, {"teacher_entropy": 0.4, "prototype_use": use}, loss=5.0)
    results = _make_results()
    results.metadata["pretrain"] = {
        "method": "dino",
        "steps": 480,
        "collapsed": monitor.collapsed,
        "verdict": monitor.verdict(),
        "monitor": monitor.history,
        "warnings": monitor.warnings,
        "thresholds": HEALTH_THRESHOLDS,
    }
    path = tmp_path / "results.json"
    write_results(path, results)  # the thresholds go through JSON as the monitor writes them
    html = render_report(path, tmp_path / "report.html").read_text(encoding="utf-8")
    section = html[html.index("<h2>Pre-training health</h2>") :]
    assert "Collapse suspected at the end of the run" in section
    assert "prototype use 6.0% &lt; 10% at its latest failure, and failing in 11 of the last 12 readings" in section
    assert "Trouble thresholds: feature_std &lt; 0.05, effective_rank &lt; 2.0, teacher_entropy &gt; 0.9" in section
    # Every reading inside its threshold: no verdict, and the section says so.
    healthy = CollapseMonitor()
    healthy.update(10, features, {"teacher_entropy": 0.4, "prototype_use": 0.5}, loss=5.0)
    results.metadata["pretrain"].update(
        collapsed=healthy.collapsed, verdict=healthy.verdict(), monitor=healthy.history, warnings=healthy.warnings
    )
    html = render_report(results, tmp_path / "healthy.html").read_text(encoding="utf-8")
    assert "Collapse suspected" not in html and "every reading inside its threshold" in html
