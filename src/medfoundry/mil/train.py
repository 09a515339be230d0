"""Training and patient-grouped cross-validation of MIL models on cached slide features.

Training follows common practice for slide-level MIL (CLAM, TransMIL): AdamW, one bag per step by default
(bags differ in size by orders of magnitude, so batching means padding), and early stopping on the validation
loss. The loss, not AUROC, drives early stopping because AUROC on a few dozen validation slides saturates at
1.0 and ties early, while the loss keeps ranking checkpoints.

Cross-validation splits by patient (``StratifiedGroupKFold``), so slides of one patient are never on both sides
of a fold; each fold's test metrics become ``ResultRecord``s (``seed`` = fold index), which the usual report
aggregates as mean +- sd over folds.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import StratifiedGroupKFold
from torch import nn

from medfoundry.data.splits import patient_split
from medfoundry.errors import DataError
from medfoundry.evaluate.metrics import DEFAULT_METRICS, MetricValue, compute_metrics
from medfoundry.evaluate.results import ResultRecord, ResultsFile, records_from_metrics, run_metadata, write_results
from medfoundry.mil.data import BagSet
from medfoundry.mil.heatmap import write_attention_heatmaps
from medfoundry.mil.models import count_trainable, create_mil_model

BagLike = np.ndarray | torch.Tensor


@dataclass
class MILTrainConfig:
    """Hyper-parameters of one MIL training run; the defaults suit 10^2-10^3 slides of 384-1536-d features."""

    hidden: int = 64
    dropout: float = 0.1
    lr: float = 5e-4
    weight_decay: float = 1e-4
    max_epochs: int = 100
    patience: int = 10  # epochs without a lower validation loss before stopping
    # Attention MIL often sits at chance-level loss for several epochs before it singles out the informative
    # tiles (measured in tests/test_mil.py's large-bag setting: 7-13 epochs at lr 5e-4, one bag per step), and
    # stopping on that plateau keeps a useless model, so early stopping only acts from this epoch on.
    min_epochs: int = 20
    batch_size: int = 1  # bags per optimiser step; more than one pads bags to the longest
    val_fraction: float = 0.2  # of the training patients, held out for early stopping
    max_instances: int | None = None  # random subset of tiles per bag per training step (memory cap)
    device: str = "cpu"


@dataclass
class MILTrainLog:
    epochs: int = 0
    best_epoch: int = 0
    train_losses: list[float] = field(default_factory=list)
    val_losses: list[float] = field(default_factory=list)
    fit_seconds: float = 0.0


@dataclass
class MILFit:
    model: nn.Module
    n_classes: int
    log: MILTrainLog


@dataclass
class MILPrediction:
    """Class probabilities (N, K) and each bag's attention scores (None for mean pooling)."""

    proba: np.ndarray
    attention: list[np.ndarray | None]


@dataclass
class MILCrossValidation:
    """Out-of-fold probabilities for every bag, its fold, per-fold test metrics and the result records."""

    model_name: str
    proba: np.ndarray
    fold: np.ndarray
    fold_metrics: list[dict[str, MetricValue]]
    records: list[ResultRecord]
    fits: list[MILFit]
    # Each bag's attention from the fold model that did not train on it (None for mean pooling).
    attention: list[np.ndarray | None] = field(default_factory=list)


def _to_tensors(bags: Sequence[BagLike]) -> list[torch.Tensor]:
    return [torch.as_tensor(np.asarray(b, dtype=np.float32)) if not torch.is_tensor(b) else b.float() for b in bags]


def pad_bags(bags: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack bags of different sizes into (B, N_max, D) with a (B, N_max) mask of real instances."""
    longest = max(b.shape[0] for b in bags)
    x = bags[0].new_zeros(len(bags), longest, bags[0].shape[1])
    mask = torch.zeros(len(bags), longest, dtype=torch.bool, device=bags[0].device)
    for i, bag in enumerate(bags):
        x[i, : bag.shape[0]] = bag
        mask[i, : bag.shape[0]] = True
    return x, mask


def _subsample(bag: torch.Tensor, limit: int | None, generator: torch.Generator) -> torch.Tensor:
    if limit is None or bag.shape[0] <= limit:
        return bag
    return bag[torch.randperm(bag.shape[0], generator=generator)[:limit]]


@torch.inference_mode()
def predict_mil(model: nn.Module, bags: Sequence[BagLike], batch_size: int = 32) -> MILPrediction:
    """Softmax probabilities and attention of every bag, in order; the model is left in eval mode."""
    model.eval()
    device = next(model.parameters()).device
    tensors = _to_tensors(bags)
    probas, attention = [], []
    for start in range(0, len(tensors), batch_size):
        chunk = [t.to(device) for t in tensors[start : start + batch_size]]
        x, mask = pad_bags(chunk)
        out = model(x, mask)
        probas.append(F.softmax(out.logits.float(), dim=1).double().cpu())
        for i, bag in enumerate(chunk):
            attention.append(None if out.attention is None else out.attention[i, : bag.shape[0]].cpu().numpy())
    return MILPrediction(torch.cat(probas).numpy(), attention)


@torch.inference_mode()
def _mean_loss(model: nn.Module, bags: list[torch.Tensor], labels: torch.Tensor, batch_size: int = 32) -> float:
    model.eval()
    total = 0.0
    for start in range(0, len(bags), batch_size):
        x, mask = pad_bags(bags[start : start + batch_size])
        logits = model(x, mask).logits
        total += float(F.cross_entropy(logits, labels[start : start + batch_size], reduction="sum"))
    return total / len(bags)


def _epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    bags: list[torch.Tensor],
    labels: torch.Tensor,
    config: MILTrainConfig,
    generator: torch.Generator,
) -> float:
    model.train()
    order = torch.randperm(len(bags), generator=generator)
    losses = []
    for start in range(0, len(bags), config.batch_size):
        index = order[start : start + config.batch_size]
        x, mask = pad_bags([_subsample(bags[i], config.max_instances, generator) for i in index])
        loss = F.cross_entropy(model(x, mask).logits, labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return float(np.mean(losses))


def _early_stopping_split(
    labels: np.ndarray, patient_ids: Sequence[str] | None, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices split by patient; no validation part when there are too few patients for one."""
    groups = list(patient_ids) if patient_ids is not None else [str(i) for i in range(len(labels))]
    if fraction <= 0 or len(set(groups)) < 4:
        return np.arange(len(labels)), np.arange(0)
    parts = patient_split(groups, labels, (1.0 - fraction, fraction), seed=seed)
    return parts["train"], parts["val"]


def train_mil(
    model_name: str,
    bags: Sequence[BagLike],
    labels: Sequence[int] | np.ndarray,
    *,
    patient_ids: Sequence[str] | None = None,
    n_classes: int | None = None,
    config: MILTrainConfig | None = None,
    seed: int = 0,
) -> MILFit:
    """Train a registered MIL model on bags (each (N_i, D)) with slide labels, early-stopped and seeded.

    ``config.val_fraction`` of the patients (each bag its own patient without ``patient_ids``) is held out
    for early stopping; the returned model holds the weights of the epoch with the lowest validation loss.
    The global torch RNG is left as it was.
    """
    config = config or MILTrainConfig()
    y = np.asarray(labels, dtype=np.int64)
    if len(bags) != len(y) or len(y) == 0:
        raise DataError(f"need one label per bag, got {len(bags)} bags and {len(y)} labels")
    n_classes = n_classes or max(int(y.max()) + 1, 2)
    started = time.perf_counter()
    train_idx, val_idx = _early_stopping_split(y, patient_ids, config.val_fraction, seed)
    tensors = [t.to(config.device) for t in _to_tensors(bags)]
    targets = torch.as_tensor(y, device=config.device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = create_mil_model(
            model_name, tensors[0].shape[1], n_classes, hidden=config.hidden, dropout=config.dropout
        ).to(config.device)
        log = _fit(model, tensors, targets, train_idx, val_idx, config, seed)
    log.fit_seconds = time.perf_counter() - started
    return MILFit(model, n_classes, log)


def _fit(
    model: nn.Module,
    bags: list[torch.Tensor],
    targets: torch.Tensor,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    config: MILTrainConfig,
    seed: int,
) -> MILTrainLog:
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    train_bags, train_y = [bags[i] for i in train_idx], targets[torch.as_tensor(train_idx)]
    val_bags, val_y = [bags[i] for i in val_idx], targets[torch.as_tensor(val_idx, dtype=torch.long)]
    log, best_state, best_loss = MILTrainLog(), None, float("inf")
    for epoch in range(1, config.max_epochs + 1):
        log.train_losses.append(_epoch(model, optimizer, train_bags, train_y, config, generator))
        log.epochs = epoch
        if not val_bags:
            continue
        val_loss = _mean_loss(model, val_bags, val_y)
        log.val_losses.append(val_loss)
        if val_loss < best_loss:
            best_loss, log.best_epoch, best_state = val_loss, epoch, copy.deepcopy(model.state_dict())
        elif epoch - log.best_epoch >= config.patience and epoch >= config.min_epochs:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    else:
        log.best_epoch = log.epochs
    return log


def patient_folds(labels: np.ndarray, patient_ids: Sequence[str], n_folds: int, seed: int) -> np.ndarray:
    """Fold index (0..n_folds-1) of every bag; all bags of a patient share a fold, labels are stratified."""
    groups = np.asarray([str(p) for p in patient_ids])
    n_patients = len(np.unique(groups))
    if n_folds < 2 or n_patients < n_folds:
        raise DataError(f"cannot make {n_folds} patient-grouped folds from {n_patients} patient(s)")
    fold = np.empty(len(groups), dtype=np.int64)
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # sklearn warns when a class has fewer patients than folds; the folds are still grouped.
        warnings.simplefilter("ignore", UserWarning)
        for k, (_, test) in enumerate(splitter.split(np.zeros(len(groups)), labels, groups)):
            fold[test] = k
    return fold


def cross_validate_mil(
    model_name: str,
    bags: Sequence[BagLike],
    labels: Sequence[int] | np.ndarray,
    patient_ids: Sequence[str],
    *,
    n_folds: int = 5,
    seed: int = 0,
    config: MILTrainConfig | None = None,
    n_classes: int | None = None,
    task: str = "mil",
    features_name: str = "features",
    metrics: Sequence[str] = DEFAULT_METRICS,
    n_bootstrap: int = 1000,
) -> MILCrossValidation:
    """k-fold CV split by patient: train on k-1 folds (with its own patient-grouped early-stopping split),
    predict the held-out fold, and score it with patient-resampled bootstrap CIs.

    Records carry model=``features_name``, adapter=``mil-<model_name>``, label_fraction 1 and seed = fold.
    """
    y = np.asarray(labels, dtype=np.int64)
    pids = [str(p) for p in patient_ids]
    n_classes = n_classes or max(int(y.max()) + 1, 2)
    fold = patient_folds(y, pids, n_folds, seed)
    proba = np.full((len(y), n_classes), np.nan)
    attention: list[np.ndarray | None] = [None] * len(y)
    fold_metrics, records, fits = [], [], []
    for k in range(n_folds):
        train, test = np.flatnonzero(fold != k), np.flatnonzero(fold == k)
        fit = train_mil(
            model_name,
            [bags[i] for i in train],
            y[train],
            patient_ids=[pids[i] for i in train],
            n_classes=n_classes,
            config=config,
            seed=seed + k,
        )
        prediction = predict_mil(fit.model, [bags[i] for i in test])
        proba[test] = prediction.proba
        for i, scores_i in zip(test, prediction.attention, strict=True):
            attention[i] = scores_i
        scores = compute_metrics(y[test], proba[test], [pids[i] for i in test], metrics, n_bootstrap, seed=seed)
        fold_metrics.append(scores)
        fits.append(fit)
        records += records_from_metrics(
            scores,
            task=task,
            model=features_name,
            adapter=f"mil-{model_name}",
            label_fraction=1.0,
            seed=k,
            n_train=len(train),
            n_test=len(test),
            trainable_params=count_trainable(fit.model),
            fit_seconds=fit.log.fit_seconds,
        )
    return MILCrossValidation(model_name, proba, fold, fold_metrics, records, fits, attention)


def run_mil_cv(
    bag_set: BagSet,
    model_names: Sequence[str],
    *,
    task: str,
    features_name: str,
    n_folds: int = 5,
    seed: int = 0,
    config: MILTrainConfig | None = None,
    metrics: Sequence[str] = DEFAULT_METRICS,
    n_bootstrap: int = 1000,
    out_path: str | Path | None = None,
    heatmaps_dir: str | Path | None = None,
) -> ResultsFile:
    """Cross-validate each MIL model on the same patient folds and collect one ``ResultsFile``.

    Pooled out-of-fold metrics (all folds' predictions scored together, CIs over patients) go into
    ``metadata["mil_pooled_oof"]``; the file is written atomically to ``out_path`` when given. With
    ``heatmaps_dir``, each attention model's out-of-fold attention is drawn over every slide it can find
    (``heatmaps_dir/<model>/<slide>.png``; see ``heatmap.write_attention_heatmaps``).
    """
    config = config or MILTrainConfig()
    records: list[ResultRecord] = []
    durations: dict[str, float] = {}
    pooled: dict[str, dict[str, dict[str, float]]] = {}
    for name in model_names:
        started = time.perf_counter()
        cv = cross_validate_mil(
            name,
            bag_set.features,
            bag_set.labels,
            bag_set.patient_ids,
            n_folds=n_folds,
            seed=seed,
            config=config,
            n_classes=max(len(bag_set.classes), 2),
            task=task,
            features_name=features_name,
            metrics=metrics,
            n_bootstrap=n_bootstrap,
        )
        durations[f"mil-{name}"] = time.perf_counter() - started
        records += cv.records
        if heatmaps_dir is not None and any(a is not None for a in cv.attention):
            write_attention_heatmaps(bag_set.bags, cv.attention, Path(heatmaps_dir) / name)
        oof = compute_metrics(bag_set.labels, cv.proba, bag_set.patient_ids, metrics, n_bootstrap, seed=seed)
        pooled[name] = {m: {"value": v.value, "ci_low": v.ci_low, "ci_high": v.ci_high} for m, v in oof.items()}
    metadata = run_metadata(
        config={**asdict(config), "n_folds": n_folds, "seed": seed, "models": list(model_names)},
        durations=durations,
        mil_pooled_oof=pooled,
        n_slides=len(bag_set.bags),
        n_skipped_slides=len(bag_set.skipped),
        classes=list(bag_set.classes),
    )
    results = ResultsFile(records=records, metadata=metadata)
    if out_path is not None:
        write_results(out_path, results)
    return results
