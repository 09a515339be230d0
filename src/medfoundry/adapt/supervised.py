"""Supervised training from scratch on the labelled subset: the baseline that SSL features must beat.

Light augmentation (flips and 2 px shifts, done on tensors with a seeded generator so runs repeat), Adam,
and early stopping on validation AUROC. Same fit / predict_proba shape as the probes, over ImageSets.
The training loop, ``train_with_early_stopping``, is shared with fine-tuning (``medfoundry.adapt.finetune``).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medfoundry.adapt.selection import youden_threshold
from medfoundry.data.sample import ImageSet
from medfoundry.evaluate.metrics import auroc
from medfoundry.models.backbones import create_encoder
from medfoundry.settings import StrictModel


class SupervisedBaselineConfig(StrictModel):
    """A network trained from scratch on the same labelled subset (the bar SSL must clear)."""

    enabled: bool = True
    backbone: str = "resnet18"
    max_steps: int = 200
    eval_every_steps: int = 20
    patience_evals: int = 4
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4


def _stack(images: ImageSet) -> torch.Tensor:
    return torch.from_numpy(np.stack([images.load(i) for i in range(len(images))]))


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    flip = torch.rand(x.shape[0], generator=generator) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    shift = 2
    padded = F.pad(x, (shift, shift, shift, shift), mode="reflect")
    dx, dy = (int(v) for v in torch.randint(0, 2 * shift + 1, (2,), generator=generator))
    return padded[..., dy : dy + x.shape[-2], dx : dx + x.shape[-1]]


@dataclass
class TrainLog:
    """What one early-stopped training run did; ``scores`` are (step, validation AUROC) pairs."""

    steps: int = 0
    best_step: int = 0
    best_score: float = -np.inf
    losses: list[float] = field(default_factory=list)
    scores: list[tuple[int, float]] = field(default_factory=list)


def train_with_early_stopping(
    modules: Sequence[nn.Module],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    evaluate: Callable[[], float] | None,
    *,
    max_steps: int,
    eval_every_steps: int,
    patience_evals: int,
    batch_size: int,
    generator: torch.Generator,
    augment: bool = True,
) -> TrainLog:
    """The image-level training loop shared by the from-scratch baseline and fine-tuning.

    Random mini-batches (optionally augmented), ``evaluate()`` (validation AUROC) every ``eval_every_steps``
    and at the last step, stopping after ``patience_evals`` evaluations without a strict gain. ``modules``
    end in the state of the best evaluation (the last step when there is no ``evaluate``).
    """
    log = TrainLog()
    best_state = None
    evals_without_gain = 0
    batch = min(batch_size, len(x_train))
    step = 0
    for step in range(1, max_steps + 1):
        for module in modules:
            module.train()
        index = torch.randperm(len(x_train), generator=generator)[:batch]
        # BatchNorm cannot train on a batch of one sample.
        if len(index) == 1:
            index = index.repeat(2)
        x = x_train[index]
        # The flips and shifts are 2D; volumes go in as they are.
        if augment and x.ndim == 4:
            x = _augment(x, generator)
        loss = loss_fn(x, y_train[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        log.losses.append(float(loss.detach()))
        if evaluate is not None and (step % eval_every_steps == 0 or step == max_steps):
            score = evaluate()
            score = -np.inf if np.isnan(score) else score
            log.scores.append((step, score))
            if score > log.best_score:
                log.best_score, log.best_step, evals_without_gain = score, step, 0
                best_state = [copy.deepcopy(module.state_dict()) for module in modules]
            else:
                evals_without_gain += 1
                if evals_without_gain >= patience_evals:
                    break
    if best_state is not None:
        for module, state in zip(modules, best_state, strict=True):
            module.load_state_dict(state)
    log.steps = step
    return log


class SupervisedFromScratch:
    """A timm network with random weights trained end to end on the labelled images."""

    def __init__(self, config: SupervisedBaselineConfig, in_chans: int, n_classes: int, seed: int = 0) -> None:
        self.config = config
        self.in_chans = in_chans
        self.n_classes = n_classes
        self.seed = seed

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.encoder.normalize(x)))

    @torch.inference_mode()
    def _proba(self, x: torch.Tensor) -> np.ndarray:
        self.encoder.eval()
        chunks = [F.softmax(self._logits(x[i : i + 256]), dim=1) for i in range(0, len(x), 256)]
        return torch.cat(chunks).double().numpy()

    def fit(self, train: ImageSet, val: ImageSet | None = None) -> SupervisedFromScratch:
        cfg = self.config
        started = time.perf_counter()
        self.encoder = create_encoder(cfg.backbone, in_chans=self.in_chans, seed=self.seed)
        self.head = nn.Linear(self.encoder.embed_dim, self.n_classes)
        params = list(self.encoder.parameters()) + list(self.head.parameters())
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        x_val = _stack(val) if val is not None else None
        evaluate = (lambda: auroc(val.labels, self._proba(x_val))) if val is not None else None
        log = train_with_early_stopping(
            [self.encoder, self.head],
            lambda x, y: F.cross_entropy(self._logits(x), y),
            optimizer,
            _stack(train),
            torch.as_tensor(train.labels, dtype=torch.long),
            evaluate,
            max_steps=cfg.max_steps,
            eval_every_steps=cfg.eval_every_steps,
            patience_evals=cfg.patience_evals,
            batch_size=cfg.batch_size,
            generator=torch.Generator().manual_seed(self.seed),
        )
        self.steps_, self.best_step_ = log.steps, log.best_step
        # The decision threshold comes from the same validation cases that chose the stopping step.
        binary = self.n_classes == 2 and val is not None
        self.threshold_ = youden_threshold(np.asarray(val.labels), self._proba(x_val)[:, 1]) if binary else None
        self.seconds_ = time.perf_counter() - started
        self.trainable_parameters_ = sum(p.numel() for p in params)
        return self

    def predict_proba(self, images: ImageSet) -> np.ndarray:
        return self._proba(_stack(images))
