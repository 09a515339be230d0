"""MIL on cached tile features, with bags built from the nine real NCT-CRC-HE tiles.

Instances are random 64 px crops (with flips) of the real tiles, described by simple colour and texture
statistics, so the test needs no encoder and runs in seconds. A bag is positive when it holds at least one
crop of the tumour (TUM) tile. Held-out bags are cut from a separate set of crops.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from medfoundry.errors import DataError, ModelError
from medfoundry.evaluate.results import read_results
from medfoundry.mil import (
    MIL_MODELS,
    MILTrainConfig,
    attention_heatmap,
    create_mil_model,
    load_bags,
    patient_folds,
    predict_mil,
    save_heatmap,
    train_mil,
)
from medfoundry.mil.train import pad_bags
from medfoundry.report import render_report

CROP = 64
# Small batches of bags keep the four trainings within a few seconds on two loaded cores.
FAST = MILTrainConfig(max_epochs=40, patience=5, lr=1e-3, batch_size=8, dropout=0.1)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    # These models are tiny: on a shared 2-core machine, intra-op threads cost far more than they save.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiles(shared_data: Path) -> dict[str, np.ndarray]:
    folder = shared_data / "nct_crc_he_100k_samples" / "Sample_Data"
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent")
    return {p.name.split("-")[0]: np.asarray(Image.open(p).convert("RGB")) for p in sorted(folder.glob("*.tif"))}


def _crop(tile: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    y, x = rng.integers(0, tile.shape[0] - CROP, 2)
    crop = tile[y : y + CROP, x : x + CROP]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return crop[::-1] if rng.random() < 0.5 else crop


def _describe(crop: np.ndarray) -> np.ndarray:
    """32 numbers: channel means and sds, 8-bin channel histograms, gradient magnitude mean and sd."""
    rgb = crop.astype(np.float32) / 255
    hist = [np.histogram(rgb[..., c], bins=8, range=(0, 1))[0] / rgb[..., c].size for c in range(3)]
    gy, gx = np.gradient(rgb.mean(axis=2))
    grad = np.hypot(gx, gy)
    parts = [rgb.mean((0, 1)), rgb.std((0, 1)), *hist, [grad.mean(), grad.std()]]
    return np.concatenate(parts).astype(np.float32)


@pytest.fixture(scope="module")
def crop_pools(tiles: dict[str, np.ndarray]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Class names and standardised crop features (9 classes, n crops, D) for training and held-out bags."""
    names = sorted(tiles)

    def pool(seed: int, n: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        return np.stack([np.stack([_describe(_crop(tiles[k], rng)) for _ in range(n)]) for k in names])

    train, test = pool(0, 80), pool(1, 40)
    flat = train.reshape(-1, train.shape[-1])
    mean, sd = flat.mean(0), flat.std(0) + 1e-6
    return names, (train - mean) / sd, (test - mean) / sd


def _make_bags(
    names: list[str],
    pool: np.ndarray,
    n_bags: int,
    seed: int,
    sizes: tuple[int, int] = (8, 16),
    n_tumour: tuple[int, int] = (1, 2),
) -> tuple[list[np.ndarray], np.ndarray, list[np.ndarray]]:
    """Bags of ``sizes`` crops of the eight non-tumour tiles; every other bag gets ``n_tumour`` TUM crops instead."""
    rng = np.random.default_rng(seed)
    tum = names.index("TUM")
    others = np.array([i for i in range(len(names)) if i != tum])
    bags, labels, kinds = [], [], []
    for b in range(n_bags):
        size = int(rng.integers(sizes[0], sizes[1] + 1))
        kind = rng.choice(others, size)
        positive = b % 2 == 0
        if positive:
            kind[rng.choice(size, int(rng.integers(n_tumour[0], n_tumour[1] + 1)), replace=False)] = tum
        bags.append(pool[kind, rng.integers(0, pool.shape[1], size)])
        labels.append(int(positive))
        kinds.append(kind)
    return bags, np.asarray(labels), kinds


def _write_bag(folder: Path, slide_id: str, features: np.ndarray) -> None:
    with h5py.File(folder / f"{slide_id}.h5", "w") as handle:
        handle.create_dataset("features", data=features.astype(np.float32))
        coords = handle.create_dataset(
            "coords", data=np.stack([np.arange(len(features)) * 224, np.zeros(len(features))], 1)
        )
        coords.attrs["patch_size_level0"] = 224


def _write_slides(
    tmp_path: Path, bags: list[np.ndarray], labels: np.ndarray, slides_per_patient: int
) -> tuple[Path, list[tuple[str, str, str]]]:
    """One feature file per bag in ``tmp_path/features`` and the matching label rows."""
    features_dir = tmp_path / "features"
    features_dir.mkdir()
    rows = []
    for i, (bag, label) in enumerate(zip(bags, labels, strict=True)):
        _write_bag(features_dir, f"slide{i:03d}", bag)
        rows.append((f"slide{i:03d}", f"patient{i // slides_per_patient}", str(label)))
    return features_dir, rows


def _write_csv(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["slide_id", "patient_id", "label"])
        writer.writerows(rows)
    return path


# --- models -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MIL_MODELS))
def test_padding_does_not_change_a_bags_output(name: str) -> None:
    torch.manual_seed(0)
    model = create_mil_model(name, in_dim=12, n_classes=3).eval()
    short, long = torch.randn(5, 12), torch.randn(9, 12)
    alone = model(short)
    x, mask = pad_bags([short, long])
    batched = model(x, mask)
    assert alone.logits.shape == (1, 3)
    torch.testing.assert_close(batched.logits[0], alone.logits[0], rtol=1e-4, atol=1e-5)
    if alone.attention is not None:
        torch.testing.assert_close(batched.attention[0, :5], alone.attention[0], rtol=1e-4, atol=1e-6)
        assert float(batched.attention[0, 5:].detach().abs().sum()) == 0.0
        torch.testing.assert_close(batched.attention.sum(1), torch.ones(2))


def test_unknown_model_is_a_model_error() -> None:
    with pytest.raises(ModelError, match="unknown MIL model 'clam'"):
        create_mil_model("clam", 8, 2)


# --- learning the "any tumour crop" rule --------------------------------------------------------------


@pytest.mark.parametrize("name", ["mean", "abmil", "gated_abmil", "transmil"])
def test_mil_learns_tumour_rule_on_held_out_bags(name: str, crop_pools) -> None:
    names, train_pool, test_pool = crop_pools
    bags, labels, _ = _make_bags(names, train_pool, 240, seed=0)
    patients = [f"p{i // 2}" for i in range(len(bags))]
    test_bags, test_labels, test_kinds = _make_bags(names, test_pool, 100, seed=1)
    fit = train_mil(name, bags, labels, patient_ids=patients, config=FAST, seed=0)
    prediction = predict_mil(fit.model, test_bags)
    auc = roc_auc_score(test_labels, prediction.proba[:, 1])
    # Mean pooling also learns the rule here: with 8-16 crops a single TUM crop is >= 1/16 of the bag, so a
    # ReLU feature that fires on tumour colour survives averaging. Much larger bags would dilute it.
    assert auc > 0.85, f"{name}: held-out AUROC {auc:.3f}"
    assert 1 <= fit.log.best_epoch <= fit.log.epochs
    if name in ("abmil", "gated_abmil"):
        tum = names.index("TUM")
        positives = np.flatnonzero(test_labels == 1)
        top_is_tumour = [test_kinds[i][np.argmax(prediction.attention[i])] == tum for i in positives]
        # TransMIL is not checked: its class-token attention after two mixing layers is not an
        # instance-importance score (measured here over three seeds: the top tile is TUM in 50-94% of positive bags).
        assert np.mean(top_is_tumour) >= 0.8, f"{name}: top attention on TUM in {np.mean(top_is_tumour):.0%}"


def test_mean_pooling_fails_when_one_tumour_crop_hides_in_a_large_bag(crop_pools) -> None:
    # One TUM crop among 60-120 is under 2% of the bag: averaging buries it in the spread of the other
    # crops' means, while attention can still single it out. Measured over three bag seeds: mean 0.44-0.52,
    # abmil 0.91-0.95 AUROC. One bag per step: with batches of 8 abmil may not leave its initial
    # chance-level plateau within the epoch budget.
    config = dataclasses.replace(FAST, batch_size=1, max_epochs=15, min_epochs=12, patience=3)
    names, train_pool, test_pool = crop_pools
    large = {"sizes": (60, 120), "n_tumour": (1, 1)}
    bags, labels, _ = _make_bags(names, train_pool, 240, seed=0, **large)
    patients = [f"p{i // 2}" for i in range(len(bags))]
    test_bags, test_labels, _ = _make_bags(names, test_pool, 100, seed=1, **large)
    auc = {}
    for name in ("mean", "abmil"):
        fit = train_mil(name, bags, labels, patient_ids=patients, config=config, seed=0)
        auc[name] = roc_auc_score(test_labels, predict_mil(fit.model, test_bags).proba[:, 1])
    assert auc["mean"] < 0.7 and auc["abmil"] > 0.8, auc


def test_training_is_seeded(crop_pools) -> None:
    names, train_pool, _ = crop_pools
    bags, labels, _ = _make_bags(names, train_pool, 60, seed=2)
    config = MILTrainConfig(max_epochs=3, batch_size=4, lr=1e-3)
    state = torch.random.get_rng_state()
    first = predict_mil(train_mil("gated_abmil", bags, labels, config=config, seed=7).model, bags).proba
    second = predict_mil(train_mil("gated_abmil", bags, labels, config=config, seed=7).model, bags).proba
    other = predict_mil(train_mil("gated_abmil", bags, labels, config=config, seed=8).model, bags).proba
    np.testing.assert_array_equal(first, second)
    assert not np.array_equal(first, other)
    assert torch.equal(torch.random.get_rng_state(), state)


# --- loading bags from HDF5 ----------------------------------------------------------------------------


def test_load_bags_skips_a_missing_slide_with_a_warning(tmp_path: Path, caplog) -> None:
    rng = np.random.default_rng(0)
    for slide in ("s1", "s2", "s3"):
        _write_bag(tmp_path, slide, rng.normal(size=(5, 6)))
    rows = [("s1", "a", "tumour"), ("s2", "b", "normal"), ("gone", "c", "tumour"), ("s3", "c", "normal")]
    csv_path = _write_csv(tmp_path / "labels.csv", rows)
    with caplog.at_level(logging.WARNING, logger="medfoundry.mil"):
        bag_set = load_bags(tmp_path, csv_path)
    assert bag_set.slide_ids == ["s1", "s2", "s3"]
    assert bag_set.classes == ["normal", "tumour"]
    assert bag_set.labels.tolist() == [1, 0, 0]
    assert bag_set.skipped == [("gone", "no feature file")]
    assert any("gone" in r.getMessage() and "gone.h5" in r.getMessage() for r in caplog.records)
    assert bag_set.bags[0].attrs["patch_size_level0"] == 224
    assert bag_set.bags[0].coords.shape == (5, 2)


def test_load_bags_rejects_nan_features_and_missing_labels(tmp_path: Path) -> None:
    features = np.ones((4, 3))
    _write_bag(tmp_path, "ok", features)
    features[2, 1] = np.nan
    _write_bag(tmp_path, "bad", features)
    with pytest.raises(DataError, match=r"bad\.h5.*NaN"):
        load_bags(tmp_path, _write_csv(tmp_path / "a.csv", [("ok", "p1", "0"), ("bad", "p2", "1")]))
    with pytest.raises(DataError, match=r"b\.csv.*line 3: empty label"):
        load_bags(tmp_path, _write_csv(tmp_path / "b.csv", [("ok", "p1", "0"), ("bad", "p2", "")]))


def test_slide_ids_that_name_paths_are_refused(tmp_path: Path) -> None:
    """Slide ids become file names (features/<id>.h5, heatmaps/<id>.png): a path in one must not escape."""
    _write_bag(tmp_path, "ok", np.ones((4, 3)))
    for bad in ("../../etc/passwd", "sub/slide", "..", ".hidden"):
        with pytest.raises(DataError, match="not a plain file name"):
            load_bags(tmp_path, _write_csv(tmp_path / "c.csv", [("ok", "p1", "0"), (bad, "p2", "1")]))


def test_heatmaps_open_only_slides_a_features_file_names(tmp_path: Path, caplog) -> None:
    """A features file made elsewhere may carry any slide_path: a device or a text file is never opened."""
    from medfoundry.mil.heatmap import write_attention_heatmaps

    text = tmp_path / "notes.txt"
    text.write_text("not a slide")
    bags = [
        dataclasses.make_dataclass("B", ["slide_id", "attrs", "coords"])(
            f"s{i}", {"slide_path": path, "patch_size_level0": 224}, np.zeros((1, 2))
        )
        for i, path in enumerate(("/dev/zero", str(text)))
    ]
    with caplog.at_level(logging.WARNING, logger="medfoundry.mil"):
        written = write_attention_heatmaps(bags, [np.ones(1), np.ones(1)], tmp_path / "heat")
    assert written == []
    assert sum("not a slide file or folder" in r.getMessage() for r in caplog.records) == 2


# --- cross-validation and report --------------------------------------------------------------------


def test_patient_folds_never_split_a_patient() -> None:
    rng = np.random.default_rng(0)
    patients = [f"p{i}" for i in rng.integers(0, 30, 150)]
    labels = rng.integers(0, 2, 150)
    fold = patient_folds(labels, patients, n_folds=5, seed=3)
    for patient in set(patients):
        assert len({int(fold[i]) for i, p in enumerate(patients) if p == patient}) == 1
    assert set(fold.tolist()) == set(range(5))
    with pytest.raises(DataError, match="5 patient-grouped folds from 3 patient"):
        patient_folds(labels[:3], ["a", "b", "c"], n_folds=5, seed=0)


def test_cross_validation_suite_writes_results_and_report(tmp_path: Path, crop_pools) -> None:
    # Was run_mil_cv: cross-validation is now a slide-mil task of the engine, one cell per model scored on every
    # slide's out-of-fold prediction (the pooled out-of-fold metrics run_mil_cv kept in its metadata).
    from medfoundry.bench.engine import run_suite
    from medfoundry.config import AdaptConfig, EvaluateConfig, SuiteConfig, TaskConfig

    names, train_pool, _ = crop_pools
    bags, labels, _ = _make_bags(names, train_pool, 120, seed=4)
    # Three slides per patient, labels mixed within a patient, so grouping matters.
    features_dir, rows = _write_slides(tmp_path, bags, labels, slides_per_patient=3)
    features_dir = features_dir.rename(tmp_path / "colour-stats")  # cells are named after the features folder
    task = TaskConfig(
        name="nct-tumour-bags",
        kind="slide-mil",
        source=str(features_dir),
        labels=str(_write_csv(tmp_path / "labels.csv", rows)),
        mil={"models": ["mean", "abmil"], "folds": 3, "train": dataclasses.asdict(FAST)},
    )
    suite = SuiteConfig(
        output_dir=tmp_path / "out",
        tasks=[task],
        adapt=AdaptConfig(label_fractions=[1.0], seeds=[0]),
        evaluate=EvaluateConfig(n_bootstrap=200),
    )
    results = run_suite(suite, show_progress=False, echo=lambda _: None).results
    reread = read_results(tmp_path / "out" / "results.json")
    metrics = results.metadata["primary_metric"]["nct-tumour-bags"]
    assert metrics == "auroc"
    n_metrics = len({r.metric for r in reread.records})
    assert len(reread.records) == len(results.records) == 2 * 1 * n_metrics  # models x seeds x metrics
    assert {r.adapter for r in reread.records} == {"mil-mean", "mil-abmil"}
    assert {r.model for r in reread.records} == {"colour-stats"}
    auroc = [r for r in reread.records if r.metric == "auroc" and r.adapter == "mil-abmil"]
    assert [r.seed for r in auroc] == [0]
    assert sum(r.n_test for r in auroc) == len(bags)  # every slide, predicted by the fold model that did not see it
    assert all(r.trainable_params and r.fit_seconds for r in auroc)
    assert np.mean([r.value for r in auroc]) > 0.85
    assert results.metadata["tasks"]["nct-tumour-bags"]["grouping"].startswith("3-fold cross-validation")
    html = render_report(reread, tmp_path / "report.html").read_text()
    assert "mil-abmil" in html and "colour-stats" in html


def test_small_cohort_early_stopping_uses_fewer_folds_or_none(caplog) -> None:
    # 3 slides per class: patient_split would cut 5 stratified folds, which scikit-learn refuses
    # ("n_splits=5 cannot be greater than the number of members in each class").
    rng = np.random.default_rng(0)
    bags = [rng.normal(size=(4, 6)).astype(np.float32) for _ in range(6)]
    config = MILTrainConfig(max_epochs=2, min_epochs=1)
    with caplog.at_level(logging.INFO, logger="medfoundry.mil"):
        fit = train_mil("mean", bags, [0, 0, 0, 1, 1, 1], patient_ids=list("abcdef"), config=config)
    assert fit.log.val_losses and fit.log.epochs == 2
    assert any("1/3 of the training patients" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="medfoundry.mil"):
        fit = train_mil("mean", bags, [0, 1, 2, 3, 4, 5], patient_ids=list("abcdef"), config=config)
    assert not fit.log.val_losses and fit.log.epochs == 2
    assert any("early stopping off" in r.getMessage() for r in caplog.records)


# --- heatmap ------------------------------------------------------------------------------------------


def test_attention_heatmap_over_a_thumbnail(tmp_path: Path, tiles: dict[str, np.ndarray]) -> None:
    names = sorted(tiles)
    # A 4 x 3 "slide" of 224 px tiles: the nine real tiles in the first three columns, glass in the fourth.
    slide = np.full((3 * 224, 4 * 224, 3), 240, dtype=np.uint8)
    coords = []
    for k, name in enumerate(names):
        row, col = divmod(k, 3)
        slide[row * 224 : (row + 1) * 224, col * 224 : (col + 1) * 224] = tiles[name]
        coords.append((col * 224, row * 224))
    thumbnail = Image.fromarray(slide).resize((448, 336))
    scores = np.where(np.asarray(names) == "TUM", 0.9, 0.01)
    scores[names.index("STR")] = 0.05
    heatmap = attention_heatmap(thumbnail, np.asarray(coords), 224, (4 * 224, 3 * 224), scores, alpha=0.6)
    path = save_heatmap(heatmap, tmp_path / "heat.png")
    png = np.asarray(Image.open(path))
    thumb = np.asarray(thumbnail).astype(int)
    assert Image.open(path).format == "PNG" and png.shape == (336, 448, 3)
    assert png.std() > 10 and np.abs(png.astype(int) - thumb)[:, :336].mean() > 10
    np.testing.assert_array_equal(png[:, 336:], np.asarray(thumbnail)[:, 336:])  # no tiles: untouched
    row, col = divmod(names.index("TUM"), 3)
    tum = png[row * 112 : (row + 1) * 112, col * 112 : (col + 1) * 112].astype(int).mean((0, 1))
    low = png[:112, :112].astype(int).mean((0, 1))  # ADI, the lowest score
    assert tum[0] > tum[2] and low[2] > low[0]  # jet: high attention red, low attention blue


def test_mil_command_cross_validates_into_a_report(tmp_path: Path, crop_pools) -> None:
    from typer.testing import CliRunner

    from medfoundry.cli import app

    names, train_pool, _ = crop_pools
    bags, labels, _ = _make_bags(names, train_pool, 48, seed=5)
    features_dir, rows = _write_slides(tmp_path, bags, labels, slides_per_patient=2)
    rows.append(("missing-slide", "patient-x", "1"))
    labels_csv = _write_csv(tmp_path / "labels.csv", rows)
    out = tmp_path / "mil"
    result = CliRunner().invoke(
        app, ["mil", str(features_dir), str(labels_csv), "--out", str(out), "--models", "mean", "--folds", "3"]
    )
    assert result.exit_code == 0, result.output
    results = read_results(out / "results.json")
    assert {r.adapter for r in results.records} == {"mil-mean"}
    assert sum(r.n_test for r in results.records if r.metric == "auroc") == 48  # the missing slide was skipped
    assert "mil-mean" in (out / "report.html").read_text()
