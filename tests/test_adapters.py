"""Adapters on real BreastMNIST embeddings: linear probe, kNN, missing classes, and supervised from scratch."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_limits

from medfoundry.adapt import knn as knn_module
from medfoundry.adapt.knn import KNNProbe, adaptive_k
from medfoundry.adapt.linear import LinearProbe
from medfoundry.adapt.registry import ADAPTERS, create_adapter
from medfoundry.adapt.selection import cv_folds, youden_threshold
from medfoundry.adapt.supervised import SupervisedFromScratch
from medfoundry.config import AdaptConfig, SupervisedBaselineConfig
from medfoundry.data.registry import load_dataset
from medfoundry.data.sample import Splits
from medfoundry.data.splits import label_fraction_indices
from medfoundry.errors import MedfoundryError
from medfoundry.evaluate.metrics import auroc
from medfoundry.models.backbones import create_encoder
from medfoundry.models.features import embed

torch.set_num_threads(1)
threadpool_limits(1)

# A short grid keeps the test fast; C=1e4 needs thousands of lbfgs iterations on unscaled-looking features.
C_GRID = (0.01, 0.1, 1.0, 10.0)


@pytest.fixture(scope="module")
def splits(breastmnist_npz: Path) -> Splits:
    return load_dataset(breastmnist_npz)


@pytest.fixture(scope="module")
def feats(splits: Splits) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Random-init vit_tiny_28 features and labels of train (546), val (78) and test (156)."""
    encoder = create_encoder("vit_tiny_28", in_chans=1, seed=0)
    return {name: (embed(encoder, images, batch_size=256).features, images.labels) for name, images in splits.items()}


@pytest.fixture(scope="module")
def linear(feats: dict[str, tuple[np.ndarray, np.ndarray]]) -> LinearProbe:
    (x, y), (xv, yv) = feats["train"], feats["val"]
    # The earlier protocol, C chosen on the validation split: still offered as selection="val".
    return LinearProbe(c_grid=C_GRID, seed=0, selection="val").fit(x, y, xv, yv)


def _check_proba(proba: np.ndarray, n: int, n_classes: int = 2) -> None:
    assert proba.shape == (n, n_classes)
    assert np.isfinite(proba).all() and (proba >= 0).all()
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-9)


def test_linear_probe_picks_c_by_val_auroc(linear: LinearProbe, feats: dict) -> None:
    assert linear.C_ in C_GRID
    assert sorted(linear.val_scores_) == sorted(C_GRID)
    assert all(0.0 <= s <= 1.0 for s in linear.val_scores_.values())
    assert linear.val_scores_[linear.C_] == max(linear.val_scores_.values())
    # The chosen C is the one the final model was refitted with, and it reproduces the recorded val score.
    assert linear.model_[-1].C == linear.C_
    xv, yv = feats["val"]
    assert auroc(yv, linear.predict_proba(xv)) == pytest.approx(linear.val_scores_[linear.C_])


def test_linear_probe_beats_chance(linear: LinearProbe, feats: dict) -> None:
    xt, yt = feats["test"]
    proba = linear.predict_proba(xt)
    _check_proba(proba, 156)
    assert auroc(yt, proba) > 0.6
    np.testing.assert_array_equal(linear.predict(xt), proba.argmax(axis=1))


def test_linear_probe_without_validation_uses_middle_of_grid(feats: dict) -> None:
    x, y = feats["train"]
    probe = LinearProbe(c_grid=(0.01, 0.1, 1.0), seed=0, selection="val").fit(x[:100], y[:100])
    assert probe.C_ == 0.1 and probe.val_scores_ == {}
    assert probe.selection_ == "default" and probe.threshold_ is None


def test_knn_beats_chance(feats: dict) -> None:
    (x, y), (xt, yt) = feats["train"], feats["test"]
    probe = KNNProbe(k=20).fit(x, y)
    proba = probe.predict_proba(xt)
    _check_proba(proba, 156)
    assert auroc(yt, proba) > 0.55


def test_knn_with_fewer_samples_than_k(feats: dict) -> None:
    (x, y), (xt, _) = feats["train"], feats["test"]
    index = np.concatenate([np.flatnonzero(y == 0)[:3], np.flatnonzero(y == 1)[:4]])
    probe = KNNProbe(k=20).fit(x[index], y[index])
    assert probe.model_.n_neighbors == 7
    _check_proba(probe.predict_proba(xt), 156)


def test_knn_k1_is_the_nearest_cosine_neighbour(feats: dict) -> None:
    (x, y), (xt, _) = feats["train"], feats["test"]
    predicted = KNNProbe(k=1).fit(x, y).predict(xt)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    unit_t = xt / np.linalg.norm(xt, axis=1, keepdims=True)
    nearest = (unit_t @ unit.T).argmax(axis=1)
    np.testing.assert_array_equal(predicted, y[nearest])


def test_knn_votes_are_weighted_by_similarity(feats: dict) -> None:
    (x, y), (xt, _) = feats["train"], feats["test"]
    k, temperature = 10, 0.07
    proba = KNNProbe(k=k, temperature=temperature).fit(x, y).predict_proba(xt[:20])
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    sim = (xt[:20] / np.linalg.norm(xt[:20], axis=1, keepdims=True)) @ unit.T
    top = np.argsort(-sim, axis=1)[:, :k]
    weights = np.exp(np.take_along_axis(sim, top, axis=1) / temperature)
    expected = np.stack([(weights * (y[top] == c)).sum(axis=1) for c in (0, 1)], axis=1)
    np.testing.assert_allclose(proba, expected / expected.sum(axis=1, keepdims=True), atol=1e-6)


@pytest.mark.parametrize("name", ["linear", "knn"])
def test_missing_class_gets_zero_probability(feats: dict, name: str) -> None:
    # A 3-class task whose small training subset only has classes 0 and 1.
    (x, y), (xv, yv), (xt, _) = feats["train"], feats["val"], feats["test"]
    adapter = create_adapter(name, AdaptConfig(linear_c_grid=[0.1, 1.0]), seed=0, n_classes=3)
    adapter.fit(x[:60], y[:60], xv, yv)
    proba = adapter.predict_proba(xt)
    _check_proba(proba, 156, n_classes=3)
    assert (proba[:, 2] == 0).all()
    assert (proba[:, :2] > 0).any(axis=0).all()


def test_knn_trained_on_one_class(feats: dict) -> None:
    (x, y), (xt, _) = feats["train"], feats["test"]
    index = np.flatnonzero(y == 1)[:10]
    proba = KNNProbe(k=5, n_classes=2).fit(x[index], y[index]).predict_proba(xt)
    _check_proba(proba, 156)
    np.testing.assert_array_equal(proba, np.tile([0.0, 1.0], (156, 1)))


def test_create_adapter() -> None:
    config = AdaptConfig(knn_k=7, knn_temperature=0.1, linear_c_grid=[0.5, 2.0])
    knn = create_adapter("knn", config, seed=0, n_classes=2)
    assert isinstance(knn, KNNProbe) and (knn.k, knn.temperature, knn.n_classes) == (7, 0.1, 2)
    linear = create_adapter("linear", config, seed=3, n_classes=2)
    assert isinstance(linear, LinearProbe) and linear.c_grid == (0.5, 2.0) and linear.seed == 3
    assert (linear.selection, linear.folds, knn.selection, knn.folds) == ("cv", 5, "cv", 5)
    earlier = AdaptConfig(selection="val", selection_folds=3)
    assert create_adapter("linear", earlier, seed=0, n_classes=2).selection == "val"
    assert create_adapter("knn", earlier, seed=0, n_classes=2).folds == 3
    assert create_adapter("knn", AdaptConfig(), seed=0, n_classes=2).k is None
    with pytest.raises(MedfoundryError, match="unknown adapter 'lora'; known: fewshot, knn, linear, mlp"):
        create_adapter("lora", config, seed=0, n_classes=2)


class _RecordingSupervised(SupervisedFromScratch):
    """The real trainer; also keeps each validation prediction so the kept state can be checked."""

    def _proba(self, x: torch.Tensor) -> np.ndarray:
        proba = super()._proba(x)
        self.evaluations_ = [*getattr(self, "evaluations_", []), proba]
        return proba


def test_supervised_from_scratch_keeps_best_val_state(splits: Splits) -> None:
    train, val, test = splits["train"], splits["val"], splits["test"]
    subset = label_fraction_indices(train.labels, 0.1, seed=0)
    assert len(subset) == 55
    config = SupervisedBaselineConfig(backbone="resnet18", max_steps=30, eval_every_steps=10, patience_evals=10)
    model = _RecordingSupervised(config, in_chans=1, n_classes=2, seed=0).fit(train.subset(subset), val)
    assert model.steps_ == 30
    assert model.best_step_ in (10, 20, 30) and model.best_step_ <= model.steps_
    assert model.trainable_parameters_ > 11_000_000
    # Three evaluations during training (steps 10, 20, 30), then one of the kept network that picks the threshold.
    assert len(model.evaluations_) == 4
    np.testing.assert_allclose(model.evaluations_[3], model.predict_proba(val), rtol=0, atol=1e-6)
    scores = [auroc(val.labels, p) for p in model.evaluations_[:3]]
    assert len(scores) == 3
    best = int(np.argmax(scores))  # first maximum, as the trainer only keeps strict improvements
    assert model.best_step_ == 10 * (best + 1)
    # After fit, the network is the one from the best evaluation, not the last step.
    np.testing.assert_allclose(model.predict_proba(val), model.evaluations_[best], rtol=0, atol=1e-6)
    proba = model.predict_proba(test)
    _check_proba(proba, 156)


def test_cv_selection_looks_only_inside_the_labelled_subset(feats: dict) -> None:
    (x, y), (xv, yv) = feats["train"], feats["val"]
    index = label_fraction_indices(y, 0.1, seed=0)
    probe = LinearProbe(c_grid=C_GRID, seed=0).fit(x[index], y[index], xv, yv)
    assert probe.selection_ == "cv" and probe.val_scores_ == {} and sorted(probe.cv_scores_) == sorted(C_GRID)
    assert probe.cv_scores_[probe.C_] == max(probe.cv_scores_.values())
    # The validation split plays no part: dropping it, or giving a different one, changes nothing.
    without = LinearProbe(c_grid=C_GRID, seed=0).fit(x[index], y[index])
    assert (without.C_, without.cv_scores_, without.threshold_) == (probe.C_, probe.cv_scores_, probe.threshold_)
    np.testing.assert_array_equal(without.predict_proba(xv), probe.predict_proba(xv))
    # Each score is the AUROC of the pooled out-of-fold probabilities over min(5, smallest class) stratified folds.
    folds = cv_folds(y[index])
    assert len(folds) == min(5, int(np.bincount(y[index]).min()))
    for c in C_GRID:
        oof = np.zeros((len(index), 2))
        for train, test in folds:
            model = LinearProbe(c_grid=(c,), selection="val").fit(x[index][train], y[index][train])
            oof[test] = model.predict_proba(x[index][test])
        assert probe.cv_scores_[c] == pytest.approx(auroc(y[index], oof))
        if c == probe.C_:
            assert probe.threshold_ == youden_threshold(y[index], oof[:, 1])
    assert probe.model_[-1].C == probe.C_ and 0.0 < probe.threshold_ < 1.0


def test_cv_folds_follow_the_smallest_class_and_fall_back_below_two(feats: dict) -> None:
    (x, y), (xv, yv) = feats["train"], feats["val"]
    two_and_four = np.concatenate([np.flatnonzero(y == 0)[:2], np.flatnonzero(y == 1)[:4]])  # 1% of BreastMNIST
    assert [len(test) for _, test in cv_folds(y[two_and_four])] == [3, 3]
    assert all(set(y[two_and_four][test]) == {0, 1} for _, test in cv_folds(y[two_and_four]))
    one_case = np.concatenate([np.flatnonzero(y == 0)[:1], np.flatnonzero(y == 1)[:8]])
    assert cv_folds(y[one_case]) == [] and cv_folds(np.ones(5, dtype=int)) == []
    # A class with one case leaves nothing to cross-validate: the middle of the grid, no threshold.
    probe = LinearProbe(c_grid=(0.01, 0.1, 1.0), seed=0).fit(x[one_case], y[one_case], xv, yv)
    assert (probe.selection_, probe.C_, probe.cv_scores_, probe.threshold_) == ("default", 0.1, {}, None)
    multilabel = np.column_stack([y, 1 - y, y])[:40]
    assert len(cv_folds(multilabel)) == min(5, int(min(multilabel[:, 0].sum(), 40 - multilabel[:, 0].sum())))


def test_youden_threshold_by_hand() -> None:
    y = np.array([0, 0, 1, 1])
    # Perfect separation between 0.2 and 0.7: the cut is half-way between them.
    assert youden_threshold(y, np.array([0.1, 0.2, 0.7, 0.9])) == pytest.approx(0.45)
    # J = 0.5 at p >= 0.8 and at p >= 0.35; the higher cut wins, half-way down to the next score (0.4).
    assert youden_threshold(y, np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.6)
    # No cut beats chance, or one class only: no threshold.
    assert youden_threshold(np.array([0, 1]), np.array([0.9, 0.1])) is None
    assert youden_threshold(np.array([1, 1]), np.array([0.9, 0.1])) is None


def test_knn_k_follows_the_training_set_and_is_logged_once(
    feats: dict, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    (x, y), xt = feats["train"], feats["test"][0]
    monkeypatch.setattr(knn_module, "_LOGGED_REDUCTIONS", set())  # other tests' fits may have logged already
    index = label_fraction_indices(y, 36 / 546, seed=0)
    assert len(index) == 36
    with caplog.at_level(logging.INFO, logger="medfoundry.adapt"):
        probe = KNNProbe().fit(x[index], y[index])
        KNNProbe().fit(x[index], y[index])
    assert probe.k_ == probe.model_.n_neighbors == 6  # round(sqrt(36))
    assert [r.getMessage() for r in caplog.records if "kNN uses k=" in r.getMessage()] == [
        "kNN uses k=6 for 36 training cases (round(sqrt(n)), at most 20)"
    ]
    assert KNNProbe().fit(x, y).k_ == 20  # sqrt(546) = 23.4, capped at the DINO protocol's 20
    assert adaptive_k(1) == 1 and adaptive_k(7, k=20) == 7 and adaptive_k(100, k=3) == 3
    _check_proba(probe.predict_proba(xt), 156)


def test_binary_adapters_choose_a_threshold_on_their_selection_data(feats: dict) -> None:
    (x, y), (xv, yv) = feats["train"], feats["val"]
    index = label_fraction_indices(y, 0.1, seed=1)
    for name in ("knn", "fewshot"):
        cv = create_adapter(name, AdaptConfig(), seed=0, n_classes=2).fit(x[index], y[index], xv, yv)
        assert cv.threshold_ is not None and 0.0 < cv.threshold_ < 1.0, name
        val = create_adapter(name, AdaptConfig(selection="val"), seed=0, n_classes=2).fit(x[index], y[index], xv, yv)
        assert val.threshold_ == youden_threshold(yv, val.predict_proba(xv)[:, 1]), name
    # Multi-class: the arg-max decides, no threshold.
    three = create_adapter("linear", AdaptConfig(linear_c_grid=[1.0]), seed=0, n_classes=3)
    assert three.fit(x[:60], y[:60]).threshold_ is None


@pytest.mark.parametrize("name", ["linear", "knn", "fewshot", "mlp"])
def test_deterministic_metadata_says_whether_the_seed_can_change_the_fit(feats: dict, name: str) -> None:
    (x, y), (xt, _) = feats["train"], feats["test"]
    index = label_fraction_indices(y, 0.1, seed=0)
    config = AdaptConfig(linear_c_grid=[0.1, 10.0], mlp_hidden_dim=16, mlp_alpha_grid=[1.0], mlp_max_iter=50)
    fits = [create_adapter(name, config, seed=seed, n_classes=2).fit(x[index], y[index]) for seed in (0, 5)]
    same = np.array_equal(fits[0].predict_proba(xt), fits[1].predict_proba(xt))
    assert ADAPTERS.metadata(name)["deterministic"] is same
    assert same is (name != "mlp")
