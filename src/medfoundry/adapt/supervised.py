"""Supervised training from scratch on the labelled subset: the baseline that SSL features must beat.

Light augmentation (flips and 2 px shifts, done on tensors with a seeded generator so runs repeat), Adam,
and early stopping on validation AUROC. Same fit / predict_proba shape as the probes, over ImageSets.
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medfoundry.config import SupervisedBaselineConfig
from medfoundry.data.sample import ImageSet
from medfoundry.evaluate.metrics import auroc
from medfoundry.models.backbones import create_encoder


def _stack(images: ImageSet) -> torch.Tensor:
    return torch.from_numpy(np.stack([images.load(i) for i in range(len(images))]))


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    flip = torch.rand(x.shape[0], generator=generator) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    shift = 2
    padded = F.pad(x, (shift, shift, shift, shift), mode="reflect")
    dx, dy = (int(v) for v in torch.randint(0, 2 * shift + 1, (2,), generator=generator))
    return padded[..., dy : dy + x.shape[-2], dx : dx + x.shape[-1]]


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
        generator = torch.Generator().manual_seed(self.seed)
        x_train, y_train = _stack(train), torch.as_tensor(train.labels, dtype=torch.long)
        x_val = _stack(val) if val is not None else None
        best_score, best_state, evals_without_gain, self.best_step_ = -np.inf, None, 0, 0
        batch = min(cfg.batch_size, len(x_train))
        for step in range(1, cfg.max_steps + 1):
            self.encoder.train()
            index = torch.randperm(len(x_train), generator=generator)[:batch]
            # BatchNorm cannot train on a batch of one sample.
            if len(index) == 1:
                index = index.repeat(2)
            loss = F.cross_entropy(self._logits(_augment(x_train[index], generator)), y_train[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if x_val is not None and (step % cfg.eval_every_steps == 0 or step == cfg.max_steps):
                score = auroc(val.labels, self._proba(x_val))
                score = -np.inf if np.isnan(score) else score
                if score > best_score:
                    best_score, evals_without_gain, self.best_step_ = score, 0, step
                    best_state = copy.deepcopy((self.encoder.state_dict(), self.head.state_dict()))
                else:
                    evals_without_gain += 1
                    if evals_without_gain >= cfg.patience_evals:
                        break
        if best_state is not None:
            self.encoder.load_state_dict(best_state[0])
            self.head.load_state_dict(best_state[1])
        self.steps_ = step
        self.seconds_ = time.perf_counter() - started
        self.trainable_parameters_ = sum(p.numel() for p in params)
        return self

    def predict_proba(self, images: ImageSet) -> np.ndarray:
        return self._proba(_stack(images))
