"""Paired bootstrap differences, prediction files and their alignment, and the ``medfoundry compare`` command."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from medfoundry.cli import app
from medfoundry.errors import DataError
from medfoundry.evaluate.compare import paired_difference
from medfoundry.evaluate.metrics import _WEIGHTED, compute_metrics, percentile_interval, resample_weights
from medfoundry.evaluate.predictions import (
    Predictions,
    align_predictions,
    predictions_path,
    read_predictions,
    write_predictions,
)
from medfoundry.report.comparisons import difference_with_ci


def _phi(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def _two_models(
    rng: np.random.Generator, n: int, d_a: float, d_b: float, rho: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scores d * label + unit Gaussian noise, the two models' noise correlated by ``rho``.

    Each model's population AUROC is Phi(d / sqrt(2)) whatever rho is, so the true difference is known.
    """
    y = rng.integers(0, 2, n)
    noise_a = rng.normal(size=n)
    noise_b = rho * noise_a + math.sqrt(1.0 - rho**2) * rng.normal(size=n)
    squash = lambda s: 1.0 / (1.0 + np.exp(-s))  # noqa: E731  (keeps ranks, gives probabilities)
    pa, pb = squash(d_a * y + noise_a), squash(d_b * y + noise_b)
    return y, np.column_stack([1 - pa, pa]), np.column_stack([1 - pb, pb])


def test_identical_models_give_exactly_zero_difference() -> None:
    y, pa, _ = _two_models(np.random.default_rng(0), 120, 1.0, 1.0, 0.5)
    for metric in ("auroc", "f1", "kappa", "ece"):
        diff = paired_difference(y, pa, pa.copy(), metric=metric, n_bootstrap=300)
        assert diff.value == 0.0 and diff.ci_low == 0.0 and diff.ci_high == 0.0, metric
        assert not diff.excludes_zero
        assert diff.share_opposite == 1.0


def test_paired_ci_covers_known_auroc_difference() -> None:
    d_a, d_b = 1.2, 0.8
    truth = _phi(d_a / math.sqrt(2.0)) - _phi(d_b / math.sqrt(2.0))
    rng = np.random.default_rng(2025)
    reps = 40
    hits = 0
    for rep in range(reps):
        y, pa, pb = _two_models(rng, 200, d_a, d_b, 0.7)
        diff = paired_difference(y, pa, pb, metric="auroc", n_bootstrap=500, seed=rep)
        hits += diff.ci_low <= truth <= diff.ci_high
    assert hits / reps >= 0.85


def test_paired_ci_is_narrower_than_independent_bootstraps_for_correlated_models() -> None:
    y, pa, pb = _two_models(np.random.default_rng(1), 300, 1.0, 0.9, 0.95)
    patients = np.arange(300)
    paired = paired_difference(y, pa, pb, metric="auroc", n_bootstrap=1000, seed=3)
    # Unpaired: A and B resampled independently (different seeds), as if tested on different cases.
    auroc_a = np.concatenate([_WEIGHTED["auroc"](y, pa, w) for w in resample_weights(patients, 300, 1000, 1)])
    auroc_b = np.concatenate([_WEIGHTED["auroc"](y, pb, w) for w in resample_weights(patients, 300, 1000, 2)])
    low, high = np.quantile(auroc_a - auroc_b, [0.025, 0.975])
    assert paired.ci_high - paired.ci_low < 0.5 * (high - low)
    assert paired.value == pytest.approx(paired.value_a - paired.value_b)
    assert 0.0 <= paired.share_opposite <= 1.0


def test_clear_difference_excludes_zero() -> None:
    y, pa, pb = _two_models(np.random.default_rng(2), 300, 2.0, 0.3, 0.3)
    diff = paired_difference(y, pa, pb, metric="auroc", n_bootstrap=500)
    assert diff.excludes_zero and diff.ci_low > 0
    assert diff.share_opposite < 0.01


def _predictions(n: int = 60, seed: int = 0) -> tuple[Predictions, Predictions]:
    y, pa, pb = _two_models(np.random.default_rng(seed), n, 1.5, 0.5, 0.5)
    ids = [f"case-{i:03d}" for i in range(n)]
    patients = [f"patient-{i // 2}" for i in range(n)]
    return Predictions(ids, patients, y, pa), Predictions(ids, patients, y, pb)


def test_prediction_files_round_trip_exactly(tmp_path: Path) -> None:
    a, _ = _predictions()
    path = write_predictions(predictions_path(tmp_path / "predictions", "dino/vit-s", "linear", 0.1, 2), a)
    assert path.name == "dino-vit-s__linear__0.1__2.csv"
    back = read_predictions(path)
    assert back.ids == a.ids and back.patient_ids == a.patient_ids
    np.testing.assert_array_equal(back.labels, a.labels)
    np.testing.assert_array_equal(back.proba, a.proba)

    multi = Predictions(["x", "y"], ["p", "q"], np.array([[1, 0, 1], [0, 1, 1]]), np.full((2, 3), 0.25))
    back = read_predictions(write_predictions(tmp_path / "multi.csv", multi))
    assert back.multilabel
    np.testing.assert_array_equal(back.labels, multi.labels)


def test_reader_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("id,label,proba_0,proba_1\na,1,0.2,0.8\n")
    with pytest.raises(DataError, match=r"bad\.csv: missing column\(s\) patient_id"):
        read_predictions(bad)
    bad.write_text("id,patient_id,label,proba_0,proba_1\na,p,1,0.2,oops\n")
    with pytest.raises(DataError, match=r"bad\.csv: line 2: could not convert"):
        read_predictions(bad)
    with pytest.raises(DataError, match=r"nope\.csv: predictions file not found"):
        read_predictions(tmp_path / "nope.csv")


def test_alignment_reorders_and_names_missing_ids() -> None:
    a, b = _predictions()
    order = np.random.default_rng(5).permutation(len(b.ids))
    shuffled = Predictions(
        [b.ids[i] for i in order], [b.patient_ids[i] for i in order], b.labels[order], b.proba[order]
    )
    _, aligned = align_predictions(a, shuffled)
    np.testing.assert_array_equal(aligned.proba, b.proba)
    expected = paired_difference(a.labels, a.proba, b.proba, a.patient_ids, n_bootstrap=200)
    got = paired_difference(a.labels, a.proba, aligned.proba, a.patient_ids, n_bootstrap=200)
    assert got == expected

    dropped = Predictions(b.ids[2:], b.patient_ids[2:], b.labels[2:], b.proba[2:])
    with pytest.raises(DataError, match="2 id\\(s\\) of A missing from B: case-000, case-001"):
        align_predictions(a, dropped)
    flipped = Predictions(b.ids, b.patient_ids, b.labels.copy(), b.proba)
    flipped.labels[7] = 1 - flipped.labels[7]
    with pytest.raises(DataError, match="disagree on the label of id\\(s\\) case-007"):
        align_predictions(a, flipped)


def test_compare_command_prints_the_difference(tmp_path: Path) -> None:
    a, b = _predictions(n=200, seed=1)
    path_a = write_predictions(tmp_path / "dino__linear__1__0.csv", a)
    path_b = write_predictions(tmp_path / "imagenet__linear__1__0.csv", b)
    result = CliRunner().invoke(app, ["compare", str(path_a), str(path_b), "--metric", "auroc", "--n-bootstrap", "300"])
    assert result.exit_code == 0, result.output
    diff = paired_difference(a.labels, a.proba, b.proba, a.patient_ids, "auroc", 300)
    assert "A - B" in result.output
    assert f"{diff.value:+.4f}" in result.output
    assert f"[{diff.ci_low:+.4f}, {diff.ci_high:+.4f}]" in result.output
    assert "CI excludes 0: yes" in result.output

    missing = CliRunner().invoke(app, ["compare", str(path_a), str(tmp_path / "absent.csv")])
    assert isinstance(missing.exception, DataError) and "absent.csv" in str(missing.exception)


def test_seed_lists_average_the_metric_and_share_resamples() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 120)
    runs_a = [np.column_stack([1 - p, p]) for p in (np.clip(y * 0.6 + rng.random(120) * 0.5, 0, 1) for _ in range(3))]
    runs_b = [np.column_stack([1 - p, p]) for p in (np.clip(y * 0.2 + rng.random(120) * 0.8, 0, 1) for _ in range(3))]
    single = paired_difference(y, runs_a[0], runs_b[0], n_bootstrap=300, seed=1)
    as_list = paired_difference(y, [runs_a[0]], [runs_b[0]], n_bootstrap=300, seed=1)
    assert (single.value, single.ci_low, single.ci_high) == (as_list.value, as_list.ci_low, as_list.ci_high)
    pooled = paired_difference(y, runs_a, runs_b, n_bootstrap=300, seed=1)
    per_seed = [paired_difference(y, a, b, n_bootstrap=0).value for a, b in zip(runs_a, runs_b, strict=True)]
    assert pooled.value == pytest.approx(np.mean(per_seed))
    assert pooled.ci_low < pooled.value < pooled.ci_high
    assert pooled.excludes_zero  # A is built to rank far better than B


def test_a_single_test_patient_gives_no_interval_and_no_significant_difference() -> None:
    # One patient resampled is that patient every time: the "CI" would equal the point and any paired difference
    # would read as significant (the bundled osteosarcoma suite's test split is one patient).
    rng = np.random.default_rng(1)
    y = np.tile([0, 1], 40)
    proba_a = np.column_stack([1 - (p := np.clip(y * 0.6 + rng.uniform(0, 0.4, 80), 0, 1)), p])
    proba_b = np.full((80, 2), 0.5)
    patients = ["case-4"] * 80
    with pytest.warns(RuntimeWarning, match="single patient"):
        result = compute_metrics(y, proba_a, patients, metrics=("auroc",), n_bootstrap=50)
    assert result["auroc"].value > 0.9
    assert math.isnan(result["auroc"].ci_low) and math.isnan(result["auroc"].ci_high)
    with pytest.warns(RuntimeWarning, match="single patient"):
        diff = paired_difference(y, proba_a, proba_b, patients, n_bootstrap=50)
    assert diff.value > 0.4 and not diff.excludes_zero
    assert difference_with_ci({"difference": diff.value, "ci_low": diff.ci_low, "ci_high": diff.ci_high}).endswith(
        "[no CI]"
    )
    two_patients = ["a"] * 40 + ["b"] * 40
    assert paired_difference(y, proba_a, proba_b, two_patients, n_bootstrap=50).excludes_zero


def test_resampling_one_patient_yields_no_draws_so_every_interval_built_on_them_is_nan() -> None:
    # Robustness, survival, segmentation and subgroups all build their CIs from resample_weights.
    with pytest.warns(RuntimeWarning, match="single patient"):
        chunks = list(resample_weights(np.zeros(12, dtype=np.int64), 1, 100, 0))
    assert chunks == []
    interval = percentile_interval(0.8, np.zeros(0), 100, 0.95)
    assert interval.value == 0.8 and math.isnan(interval.ci_low) and math.isnan(interval.ci_high)
