"""Training and patient-grouped cross-validation of MIL models on cached slide features.

Training follows common practice for slide-level MIL (CLAM, TransMIL): AdamW, one bag per step by default
(bags differ in size by orders of magnitude, so batching means padding), and early stopping on the validation
loss. The loss, not AUROC, drives early stopping because AUROC on a few dozen validation slides saturates at
1.0 and ties early, while the loss keeps ranking checkpoints.

Cross-validation splits by patient (``StratifiedGroupKFold``), so slides of one patient are never on both sides
of a fold, and gives every slide the probability of the fold model that did not train on it. Scoring, results and
report are the evaluation engine's (``medfoundry.bench.mil``, the ``slide-mil`` task kind).

The ``cox`` objective trains the same heads for time-to-event: the targets are (time, event) rows, the head has one
output (the log hazard) and the loss is the negative Cox partial log-likelihood (Breslow ties). That loss
compares each patient with everyone still at risk in the batch, so Cox training needs several bags per step
(``batch_size`` >= 2) and the early-stopping loss is taken over the whole validation set at once. The survival task
kind uses it for MIL heads on slide bags and, on one-instance bags, for its deep Cox MLP (``bench/survival.py``).
"""

from __future__ import annotations

import copy
import logging
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field, field_validator
from pydantic.dataclasses import dataclass as settings_dataclass
from sklearn.model_selection import StratifiedGroupKFold
from torch import nn

from medfoundry.data.splits import patient_split
from medfoundry.errors import DataError
from medfoundry.mil.models import MIL_MODELS, create_mil_model
from medfoundry.registry import unknown_name_error
from medfoundry.settings import StrictModel

log = logging.getLogger("medfoundry.mil")

BagLike = np.ndarray | torch.Tensor
# classification: integer labels, cross-entropy, softmax probabilities; cox: (time, event) rows, Cox partial
# likelihood, the log hazard as the prediction.
Objective = Literal["classification", "cox"]


# A validated dataclass: a suite task's ``mil.train`` section is checked like any config (unknown keys are errors),
# while code keeps building and replacing it as a plain dataclass.
@settings_dataclass(config=ConfigDict(extra="forbid"))
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
    """Class probabilities (N, K), or the log hazard (N, 1) under the cox objective, and each bag's attention scores
    (None for mean pooling)."""

    proba: np.ndarray
    attention: list[np.ndarray | None]


class MILTaskConfig(StrictModel):
    """A ``slide-mil`` task's MIL settings (a suite task's ``mil:`` section)."""

    models: list[str] = Field(
        default_factory=lambda: ["abmil"], min_length=1, description="MIL models, the task's adapters: mean, abmil, ..."
    )
    folds: int | None = Field(
        None, ge=2, description="k-fold cross-validation by patient over all slides, instead of train/val/test splits"
    )
    heatmaps: bool = Field(False, description="draw attention over each slide (full-label cells of the first seed)")
    train: MILTrainConfig = Field(default_factory=MILTrainConfig)

    @field_validator("models")
    @classmethod
    def _registered(cls, names: list[str]) -> list[str]:
        for name in names:
            if name not in MIL_MODELS:
                raise unknown_name_error("MIL model", name, MIL_MODELS.names())
        return names


@dataclass
class MILCrossValidation:
    """Out-of-fold probabilities for every bag, its fold and the fold models."""

    model_name: str
    proba: np.ndarray
    fold: np.ndarray
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


def cox_loss(log_hazard: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Negative Cox partial log-likelihood, Breslow's ties, averaged over events: log hazards (N, 1) for (time,
    event) rows (N, 2).

    Written here rather than taken from torchsurv: importing torchsurv imports torchmetrics (and through it
    transformers), measured at 26 s against torch's 11 s on the 2-core test machine, longer than a whole deep Cox
    fit, for a loss of a few lines. It equals torchsurv's ``neg_partial_log_likelihood(..., ties_method="breslow",
    reduction="sum")`` divided by the number of events (checked to 1e-6, with and without tied times), and its
    minimum is scikit-survival's Breslow Cox fit (tests/test_survival_heads.py).
    """
    hazard = log_hazard.reshape(-1).float()
    time, event = targets[:, 0].float(), targets[:, 1].bool()
    if not bool(event.any()):
        return hazard.sum() * 0.0  # no event, no term; keeps the graph so a caller may still step
    order = torch.argsort(time, descending=True)
    hazard, time, event = hazard[order], time[order], event[order]
    # In descending time, the risk set of a patient is everyone up to the last patient tied with them.
    _, group, sizes = torch.unique_consecutive(time, return_inverse=True, return_counts=True)
    log_risk = torch.logcumsumexp(hazard, 0)[(torch.cumsum(sizes, 0) - 1)[group]]
    return -(hazard - log_risk)[event].sum() / event.sum()


def _loss(logits: torch.Tensor, targets: torch.Tensor, objective: Objective) -> torch.Tensor:
    return cox_loss(logits, targets) if objective == "cox" else F.cross_entropy(logits, targets)


@torch.inference_mode()
def predict_mil(
    model: nn.Module, bags: Sequence[BagLike], batch_size: int = 32, objective: Objective = "classification"
) -> MILPrediction:
    """Softmax probabilities (the log hazard under ``cox``) and attention of every bag, in order; the model is left
    in eval mode."""
    model.eval()
    device = next(model.parameters()).device
    tensors = _to_tensors(bags)
    probas, attention = [], []
    for start in range(0, len(tensors), batch_size):
        chunk = [t.to(device) for t in tensors[start : start + batch_size]]
        x, mask = pad_bags(chunk)
        out = model(x, mask)
        scores = out.logits.float() if objective == "cox" else F.softmax(out.logits.float(), dim=1)
        probas.append(scores.double().cpu())
        for i, bag in enumerate(chunk):
            attention.append(None if out.attention is None else out.attention[i, : bag.shape[0]].cpu().numpy())
    return MILPrediction(torch.cat(probas).numpy(), attention)


@torch.inference_mode()
def _mean_loss(
    model: nn.Module, bags: list[torch.Tensor], labels: torch.Tensor, objective: Objective, batch_size: int = 32
) -> float:
    model.eval()
    if objective == "cox":
        # A patient's partial likelihood depends on everyone at risk: one loss over all validation bags.
        logits = torch.cat([model(*pad_bags(bags[s : s + batch_size])).logits for s in range(0, len(bags), batch_size)])
        return float(cox_loss(logits, labels))
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
    objective: Objective,
) -> float:
    model.train()
    order = torch.randperm(len(bags), generator=generator)
    losses = []
    for start in range(0, len(bags), config.batch_size):
        index = order[start : start + config.batch_size]
        if objective == "cox" and not bool(labels[index, 1].any()):
            continue  # no event in this batch: the partial likelihood has no term to learn from
        x, mask = pad_bags([_subsample(bags[i], config.max_instances, generator) for i in index])
        loss = _loss(model(x, mask).logits, labels[index], objective)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return float(np.mean(losses)) if losses else float("nan")


def early_stopping_split(
    labels: np.ndarray, patient_ids: Sequence[str] | None, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices split by patient; no validation part when there are too few patients for one.

    ``patient_split`` cuts ``round(1 / fraction)`` stratified folds, and scikit-learn refuses more folds than the
    largest class has slides; a small cohort then gets fewer, larger folds (a bigger validation share), or no early
    stopping when no class has two slides. Either is said in one log line.
    """
    groups = list(patient_ids) if patient_ids is not None else [str(i) for i in range(len(labels))]
    if fraction <= 0 or len(set(groups)) < 4:
        return np.arange(len(labels)), np.arange(0)
    largest_class = int(np.bincount(np.asarray(labels, dtype=np.int64)).max())
    if round(1 / fraction) > largest_class:
        if largest_class < 2:
            log.info("early stopping off: no class has 2 training slides to hold one out")
            return np.arange(len(labels)), np.arange(0)
        log.info(
            "early stopping on 1/%d of the training patients instead of %.2f: the largest class has %d slides",
            largest_class, fraction, largest_class,
        )  # fmt: skip
        fraction = 1 / largest_class
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
    validation: tuple[Sequence[BagLike], Sequence[int] | np.ndarray] | None = None,
    objective: Objective = "classification",
) -> MILFit:
    """Train a registered MIL model on bags (each (N_i, D)) with slide labels, early-stopped and seeded.

    Under the ``cox`` objective ``labels`` are (time, event) rows (N, 2), the model has one output (the log hazard)
    and the early-stopping split is stratified on the event.

    Early stopping watches ``validation`` (bags, labels) when given (a task's own val split); otherwise
    ``config.val_fraction`` of the patients (each bag its own patient without ``patient_ids``) is held out. The
    returned model holds the weights of the epoch with the lowest validation loss. The global torch RNG is left as
    it was.
    """
    config = config or MILTrainConfig()
    cox = objective == "cox"
    y = np.asarray(labels, dtype=np.float64 if cox else np.int64)
    if len(bags) != len(y) or len(y) == 0:
        raise DataError(f"need one label per bag, got {len(bags)} bags and {len(y)} labels")
    if cox and (y.ndim != 2 or y.shape[1] != 2):
        raise DataError(f"a Cox objective needs (time, event) rows, got labels of shape {y.shape}")
    if cox and config.batch_size < 2:
        raise DataError("a Cox loss compares patients within a batch: set the MIL batch_size to at least 2")
    n_classes = 1 if cox else n_classes or max(int(y.max()) + 1, 2)
    strata = y[:, 1].astype(np.int64) if cox else y
    started = time.perf_counter()
    if validation is None:
        train_idx, val_idx = early_stopping_split(strata, patient_ids, config.val_fraction, seed)
    else:
        # The held-out bags go after the training ones, so one index space serves both.
        val_bags, val_labels = validation
        train_idx, val_idx = np.arange(len(y)), np.arange(len(y), len(y) + len(val_bags))
        bags, y = [*bags, *val_bags], np.concatenate([y, np.asarray(val_labels, dtype=y.dtype)])
    if cox and len(val_idx) and not y[val_idx, 1].any():
        log.info("early stopping off: no event among the validation patients")
        val_idx = np.arange(0)
    tensors = [t.to(config.device) for t in _to_tensors(bags)]
    targets = torch.as_tensor(y, device=config.device, dtype=torch.float32 if cox else torch.int64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = create_mil_model(
            model_name, tensors[0].shape[1], n_classes, hidden=config.hidden, dropout=config.dropout
        ).to(config.device)
        train_log = _fit(model, tensors, targets, train_idx, val_idx, config, seed, objective)
    train_log.fit_seconds = time.perf_counter() - started
    return MILFit(model, n_classes, train_log)


def _fit(
    model: nn.Module,
    bags: list[torch.Tensor],
    targets: torch.Tensor,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    config: MILTrainConfig,
    seed: int,
    objective: Objective = "classification",
) -> MILTrainLog:
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    train_bags, train_y = [bags[i] for i in train_idx], targets[torch.as_tensor(train_idx)]
    val_bags, val_y = [bags[i] for i in val_idx], targets[torch.as_tensor(val_idx, dtype=torch.long)]
    log, best_state, best_loss = MILTrainLog(), None, float("inf")
    for epoch in range(1, config.max_epochs + 1):
        log.train_losses.append(_epoch(model, optimizer, train_bags, train_y, config, generator, objective))
        log.epochs = epoch
        if not val_bags:
            continue
        val_loss = _mean_loss(model, val_bags, val_y, objective)
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
    labelled: np.ndarray | None = None,
) -> MILCrossValidation:
    """k-fold CV split by patient: train on k-1 folds (with its own patient-grouped early-stopping split) and
    predict the held-out fold, so every bag gets an out-of-fold probability.

    ``labelled`` (indices) narrows the bags whose labels training may use (a label budget); every bag is still
    predicted. Folds are drawn with ``seed``, so seeds repeat the cross-validation on other partitions.
    """
    y = np.asarray(labels, dtype=np.int64)
    pids = [str(p) for p in patient_ids]
    n_classes = n_classes or max(int(y.max()) + 1, 2)
    fold = patient_folds(y, pids, n_folds, seed)
    usable = np.zeros(len(y), dtype=bool)
    usable[np.arange(len(y)) if labelled is None else labelled] = True
    proba = np.full((len(y), n_classes), np.nan)
    attention: list[np.ndarray | None] = [None] * len(y)
    fits = []
    for k in range(n_folds):
        train, test = np.flatnonzero((fold != k) & usable), np.flatnonzero(fold == k)
        if len(train) == 0:
            raise DataError(f"fold {k} of {n_folds} has no labelled training slide; use a larger label fraction")
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
        fits.append(fit)
    return MILCrossValidation(model_name, proba, fold, fits, attention)
