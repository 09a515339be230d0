"""Fine-tuning an encoder on the labelled images: full (with layer-wise learning-rate decay) or LoRA.

Full fine-tuning follows BEiT / RETFound: AdamW whose learning rate shrinks by ``layer_decay`` per block going
down a ViT (patch embedding, CLS and position tokens at layer 0, block ``i`` at layer ``i + 1``, the final norm
and the head on top), so the pre-trained lower layers move least. LoRA (through peft) adds rank-``r`` updates
to the fused ``qkv`` projections of a timm ViT and trains only those and the head; ``merged_encoder()`` folds
them back into a plain timm model, so the result saves and loads like any other encoder.

Both use the training loop of the from-scratch baseline (random batches, light augmentation, early stopping on
validation AUROC, best weights restored) and the same ``fit`` / ``predict_proba`` shape over ImageSets. They
work on images, not on feature arrays, so they are not in the feature-adapter registry.
"""

from __future__ import annotations

import copy
import re
import time
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from medfoundry.adapt.selection import youden_threshold
from medfoundry.adapt.supervised import TrainLog, _stack, train_with_early_stopping
from medfoundry.data.sample import ImageSet
from medfoundry.errors import ModelError
from medfoundry.evaluate.metrics import auroc
from medfoundry.models.backbones import TOKEN_PARAMETERS, Encoder, is_vit, skips_weight_decay
from medfoundry.models.features import prepare_batch
from medfoundry.settings import StrictModel

_BLOCK = re.compile(r"^blocks\.(\d+)\.")


class FineTuneConfig(StrictModel):
    """End-to-end adaptation of the pre-trained encoder on the same label subsets (off by default: it is the slow
    rung of the ladder). ``full`` trains everything with layer-wise LR decay, ``lora`` only low-rank qkv updates."""

    modes: list[Literal["full", "lora"]] = Field(default_factory=list)
    lr: float = 1e-3
    layer_decay: float = 0.75
    weight_decay: float = 0.05
    max_steps: int = 200
    eval_every_steps: int = 20
    patience_evals: int = 4
    batch_size: int = 64
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0


def vit_layer_id(name: str, num_layers: int) -> int:
    """Layer of a ViT backbone parameter for layer-wise decay: embeddings 0, block i -> i + 1, the rest on top."""
    if name.startswith(TOKEN_PARAMETERS) or name.startswith("patch_embed"):
        return 0
    match = _BLOCK.match(name)
    if match:
        return int(match.group(1)) + 1
    return num_layers + 1


def layer_decay_param_groups(
    backbone: nn.Module, head: nn.Module, lr: float, weight_decay: float, layer_decay: float
) -> list[dict[str, Any]]:
    """AdamW groups with ``lr * layer_decay ** (num_layers + 1 - layer_id)``; one layer for non-ViT backbones.

    Each group carries ``layer_id`` and ``lr_scale`` so the schedule can be checked and reported.
    """
    vit = is_vit(backbone)
    num_layers = len(backbone.blocks) if vit else 0
    groups: dict[tuple[int, bool], dict[str, Any]] = {}

    def add(name: str, param: nn.Parameter, layer_id: int) -> None:
        if not param.requires_grad:
            return
        no_decay = skips_weight_decay(name, param)
        key = (layer_id, no_decay)
        if key not in groups:
            scale = layer_decay ** (num_layers + 1 - layer_id)
            groups[key] = {
                "params": [],
                "names": [],
                "layer_id": layer_id,
                "lr_scale": scale,
                "lr": lr * scale,
                "weight_decay": 0.0 if no_decay else weight_decay,
            }
        groups[key]["params"].append(param)
        groups[key]["names"].append(name)

    for name, param in backbone.named_parameters():
        # Without blocks to count there is no depth to decay over: the whole backbone is the top layer.
        add(name, param, vit_layer_id(name, num_layers) if vit else num_layers + 1)
    for name, param in head.named_parameters():
        add(f"head.{name}", param, num_layers + 1)
    return [groups[key] for key in sorted(groups)]


def _has_qkv(backbone: nn.Module) -> bool:
    return any(name.split(".")[-1] == "qkv" and isinstance(m, nn.Linear) for name, m in backbone.named_modules())


class FineTuner:
    """An encoder plus a linear head on its pooled feature, trained end to end (``full``) or with LoRA.

    ``fit`` leaves the input encoder untouched: it trains a copy (``encoder_``). ``history_`` holds the
    training losses and the (step, validation AUROC) pairs; ``best_score_`` is the AUROC of the weights kept.
    """

    multilabel_: bool = False  # set by fit from the labels' shape

    def __init__(
        self,
        encoder: Encoder,
        n_classes: int,
        mode: Literal["full", "lora"] = "full",
        lr: float = 1e-3,
        layer_decay: float = 0.75,
        weight_decay: float = 0.05,
        max_steps: int = 200,
        eval_every_steps: int = 20,
        patience_evals: int = 4,
        batch_size: int = 64,
        seed: int = 0,
        lora_rank: int = 8,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.0,
        augment: bool = True,
    ) -> None:
        if mode not in ("full", "lora"):
            raise ModelError(f"unknown fine-tuning mode '{mode}': use 'full' or 'lora'")
        if mode == "lora" and not _has_qkv(encoder.backbone):
            raise ModelError(
                f"LoRA needs a ViT with fused 'qkv' linear projections; backbone '{encoder.timm_name}' has none"
            )
        if not 0.0 < layer_decay <= 1.0:
            raise ModelError(f"layer_decay must be in (0, 1], got {layer_decay}")
        self.encoder = encoder
        self.n_classes = n_classes
        self.mode = mode
        self.lr = lr
        self.layer_decay = layer_decay
        self.weight_decay = weight_decay
        self.max_steps = max_steps
        self.eval_every_steps = eval_every_steps
        self.patience_evals = patience_evals
        self.batch_size = batch_size
        self.seed = seed
        self.lora_rank = lora_rank
        self.lora_alpha = lora_alpha
        self.lora_dropout = lora_dropout
        self.augment = augment

    def build(self) -> FineTuner:
        """Copy the encoder, add the head (and LoRA) and the optimizer; ``fit`` calls it first."""
        # Seeded here so the head and the LoRA matrices start the same for the same seed.
        torch.manual_seed(self.seed)
        self.encoder_ = copy.deepcopy(self.encoder)
        self.head_ = nn.Linear(self.encoder_.embed_dim, self.n_classes).to(self.encoder_.mean.device)
        if self.mode == "lora":
            from medfoundry.extras import require

            require("peft", "lora", "LoRA fine-tuning")
            from peft import LoraConfig, get_peft_model

            config = LoraConfig(
                r=self.lora_rank,
                lora_alpha=self.lora_alpha,
                lora_dropout=self.lora_dropout,
                target_modules=["qkv"],
            )
            # get_peft_model freezes every base parameter; only lora_A / lora_B stay trainable.
            self.encoder_.backbone = get_peft_model(self.encoder_.backbone, config)
            params = [p for p in self.encoder_.parameters() if p.requires_grad] + list(self.head_.parameters())
            # LoRA has no depth to decay over: every trainable tensor gets the base rate.
            self.param_groups_ = [{"params": params, "lr": self.lr, "weight_decay": self.weight_decay}]
        else:
            for param in self.encoder_.parameters():
                param.requires_grad_(True)
            self.param_groups_ = layer_decay_param_groups(
                self.encoder_.backbone, self.head_, self.lr, self.weight_decay, self.layer_decay
            )
        self.optimizer_ = torch.optim.AdamW(self.param_groups_, lr=self.lr)
        self.trainable_parameters_ = sum(p.numel() for group in self.param_groups_ for p in group["params"])
        self.total_parameters_ = sum(p.numel() for p in self.encoder_.parameters()) + sum(
            p.numel() for p in self.head_.parameters()
        )
        return self

    def _loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        y = y.to(self.encoder_.mean.device)
        if self.multilabel_:
            return F.binary_cross_entropy_with_logits(self._logits(x), y)
        return F.cross_entropy(self._logits(x), y)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.encoder_.mean.device, non_blocking=True)
        return self.head_(self.encoder_(prepare_batch(self.encoder_, x)))

    @torch.inference_mode()
    def _proba(self, x: torch.Tensor) -> np.ndarray:
        self.encoder_.eval()
        self.head_.eval()
        # Multi-label heads give one independent probability per label; single-label heads a distribution.
        activate = torch.sigmoid if self.multilabel_ else (lambda logits: F.softmax(logits, dim=1))
        chunks = [activate(self._logits(x[i : i + 256])) for i in range(0, len(x), 256)]
        return torch.cat(chunks).double().cpu().numpy()

    def fit(self, train: ImageSet, val: ImageSet | None = None) -> FineTuner:
        labels = None if train.labels is None else np.asarray(train.labels)
        if labels is None or labels.ndim not in (1, 2):
            raise ModelError(
                "fine-tuning needs labelled training images (labels (N,) or multi-label (N, K))", train.source
            )
        if labels.ndim == 2 and labels.shape[1] != self.n_classes:
            raise ModelError(f"{labels.shape[1]} label columns but n_classes={self.n_classes}", train.source)
        self.multilabel_ = labels.ndim == 2
        started = time.perf_counter()
        self.build()
        x_val = _stack(val) if val is not None else None
        evaluate = (lambda: auroc(np.asarray(val.labels), self._proba(x_val))) if val is not None else None
        self.history_: TrainLog = train_with_early_stopping(
            [self.encoder_, self.head_],
            self._loss,
            self.optimizer_,
            _stack(train),
            torch.as_tensor(labels, dtype=torch.float32 if self.multilabel_ else torch.long),
            evaluate,
            max_steps=self.max_steps,
            eval_every_steps=self.eval_every_steps,
            patience_evals=self.patience_evals,
            batch_size=self.batch_size,
            generator=torch.Generator().manual_seed(self.seed),
            augment=self.augment,
        )
        self.steps_, self.best_step_, self.best_score_ = (
            self.history_.steps,
            self.history_.best_step,
            self.history_.best_score,
        )
        # The decision threshold comes from the same validation cases that chose the stopping step.
        binary = not self.multilabel_ and self.n_classes == 2 and val is not None
        self.threshold_ = youden_threshold(np.asarray(val.labels), self._proba(x_val)[:, 1]) if binary else None
        self.seconds_ = time.perf_counter() - started
        return self

    def predict_proba(self, images: ImageSet) -> np.ndarray:
        return self._proba(_stack(images))

    def merged_encoder(self) -> Encoder:
        """The trained encoder as a plain timm model (LoRA merged into ``qkv``), ready for ``save_encoder``."""
        if not hasattr(self, "encoder_"):
            raise ModelError("the fine-tuner has not been fitted (call fit or build first)")
        encoder = copy.deepcopy(self.encoder_)
        if self.mode == "lora":
            # merge_and_unload adds B @ A * alpha / r to each qkv weight and strips the peft wrappers,
            # leaving timm's own module tree and parameter names.
            encoder.backbone = encoder.backbone.merge_and_unload()
        for param in encoder.parameters():
            param.requires_grad_(True)
        return encoder.eval()
