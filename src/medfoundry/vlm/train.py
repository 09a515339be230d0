"""CLIP training: seeded batches, light image augmentation, cosine schedule, atomic checkpoints and exact resume.

Each step's batch is a seeded permutation of the images per epoch; an image with several texts gets one of them,
drawn per epoch, so a batch never holds the same image twice (which would be a false negative). The global
torch RNG is re-seeded from (seed, step) before each step (crops and dropout), so a run killed and resumed from
its last checkpoint ends with the same weights as one that was never stopped.

Augmentation is a random resized crop only: horizontal flips would contradict texts that say "left" or "right",
and colour jitter means little for grey radiographs.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.transforms import v2

from medfoundry.config import ExperimentConfig, ModelConfig, PretrainConfig
from medfoundry.errors import DataError, MedfoundryError, ModelError
from medfoundry.io_utils import atomic_path, ensure_writable_dir, hash_json, load_training_state, write_json_atomic
from medfoundry.models.backbones import encoder_from_config, skips_weight_decay
from medfoundry.ssl.schedules import Schedules
from medfoundry.ssl.trainer import PretrainResult, training_progress
from medfoundry.vlm.clip import CLIPModel, save_clip
from medfoundry.vlm.pairs import PairSet, load_pair_images, load_pairs, split_pairs
from medfoundry.vlm.text import (
    TOKENIZER_FILE,
    TextTokenizer,
    TextTower,
    build_text_model,
    load_text_model,
    warn_truncated,
)

log = logging.getLogger("medfoundry.vlm")

STATE_FILE = "state/last.pt"
MODEL_DIR = "clip"
_NON_FUNCTIONAL = {"num_workers", "log_every_steps", "monitor_every_steps", "checkpoint_every_steps", "tensorboard"}


@dataclass
class CLIPTrainResult:
    output_dir: Path
    model_dir: Path
    steps: int
    total_steps: int
    seconds: float
    resumed_from_step: int
    losses: list[float] = field(default_factory=list)  # every step's loss since step 0, across resumes
    n_images: int = 0
    n_texts: int = 0
    n_truncated: int = 0
    skipped: str = ""

    @property
    def finished(self) -> bool:
        return self.steps >= self.total_steps


def _functional_config(config: PretrainConfig, model_config: ModelConfig) -> dict[str, Any]:
    pretrain = {k: v for k, v in config.model_dump(mode="json").items() if k not in _NON_FUNCTIONAL}
    # Only the CLIP section matters here; the SSL methods' sections and views do not change a CLIP run.
    pretrain = {
        k: v for k, v in pretrain.items() if k not in ("views", "dino", "ibot", "simclr", "mocov3", "byol", "mae")
    }
    return {"pretrain": pretrain, "model": model_config.model_dump(mode="json")}


def _optimizer(model: CLIPModel, config: PretrainConfig) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if skips_weight_decay(name, param) else decay).append(param)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
    )


def build_clip(
    model_config: ModelConfig, config: PretrainConfig, tokenizer: TextTokenizer, seed: int
) -> tuple[CLIPModel, str]:
    """The untrained CLIP model and a description of its text tower."""
    clip = config.clip
    encoder = encoder_from_config(model_config, seed)
    if clip.text_checkpoint is not None:
        text_model, source = load_text_model(clip.text_checkpoint), f"checkpoint {clip.text_checkpoint}"
    else:
        text_model = build_text_model(
            tokenizer.vocab_size,
            clip.max_tokens,
            clip.text_width,
            clip.text_layers,
            clip.text_heads,
            clip.text_dropout,
            tokenizer.pad_id,
        )
        source = f"BERT trained from scratch ({clip.text_layers} layers, width {clip.text_width})"
    tower = TextTower(text_model, clip.text_pooling)
    if tower.max_positions is not None and clip.max_tokens > tower.max_positions:
        raise ModelError(f"clip.max_tokens {clip.max_tokens} exceeds the text model's {tower.max_positions} positions")
    return CLIPModel(encoder, tower, clip.embed_dim, clip.init_temperature, clip.max_logit_scale), source


def train_clip(
    pairs: PairSet,
    model_config: ModelConfig,
    config: PretrainConfig,
    output_dir: Path,
    resume: bool = True,
    stop_after_steps: int | None = None,
    show_progress: bool = True,
    data_description: str = "",
) -> CLIPTrainResult:
    """Train CLIP on ``pairs`` (all of them: split first). Writes ``state/last.pt``, ``tokenizer.json``,
    ``log.jsonl``, ``summary.json`` and, when finished, the model folder ``clip/`` (see ``vlm.clip``).
    ``stop_after_steps`` ends this call early (as a kill would) after checkpointing."""
    output_dir = ensure_writable_dir(Path(output_dir))
    clip = config.clip
    images, pairs = load_pair_images(pairs, model_config.img_size, model_config.in_chans)
    texts, owner = pairs.texts()
    fingerprint = hash_json({"config": _functional_config(config, model_config), "data": pairs.fingerprint(images)})
    state_path, tokenizer_path = output_dir / STATE_FILE, output_dir / TOKENIZER_FILE
    state = load_training_state(state_path) if resume and state_path.is_file() else None
    if state is not None and state["fingerprint"] != fingerprint:
        raise MedfoundryError(
            "existing training state was made with another config or data; use a new output folder or delete it",
            state_path,
        )
    if clip.text_checkpoint is not None:
        tokenizer = TextTokenizer.load(clip.text_checkpoint, clip.max_tokens)
    elif state is not None and tokenizer_path.is_file():
        tokenizer = TextTokenizer.load(tokenizer_path, clip.max_tokens)
    else:
        tokenizer = TextTokenizer.train(texts, clip.max_tokens, clip.tokenizer, clip.vocab_size, clip.min_frequency)
        tokenizer.save(tokenizer_path)
    encoded = tokenizer.encode(texts)
    warn_truncated(encoded.n_truncated, len(texts), clip.max_tokens, "training texts")

    model, text_source = build_clip(model_config, config, tokenizer, config.seed)
    optimizer = _optimizer(model, config)
    start_step, losses = 0, []
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_step, losses = int(state["step"]), [float(v) for v in state["losses"]]
        log.info("resuming CLIP training from step %d (%s)", start_step, state_path)

    n = len(pairs)
    batch_size = min(config.batch_size, n)
    # Whole batches only: a last batch of a few pairs gives a loss with almost no negatives.
    steps_per_epoch = max(1, n // batch_size)
    schedules = Schedules(config, steps_per_epoch)
    stop_at = schedules.total_steps if stop_after_steps is None else min(stop_after_steps, schedules.total_steps)
    offsets = np.concatenate([[0], np.cumsum(np.bincount(owner, minlength=n))[:-1]])
    counts = np.bincount(owner, minlength=n)
    crop = v2.RandomResizedCrop(model_config.img_size, scale=tuple(clip.crop_scale), antialias=True)
    image_tensor = torch.from_numpy(images)

    def save_state(step: int) -> None:
        with atomic_path(state_path) as tmp:
            torch.save(
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "step": step,
                    "fingerprint": fingerprint,
                    "losses": losses,
                },
                tmp,
            )

    step, started = start_step, time.perf_counter()
    model.train()
    with training_progress(show_progress) as progress, (output_dir / "log.jsonl").open("a") as log_file:
        task = progress.add_task("clip", total=schedules.total_steps, completed=start_step)
        while step < stop_at:
            values = schedules.at(step)
            epoch, position = divmod(step, steps_per_epoch)
            order = np.random.default_rng([config.seed, epoch]).permutation(n)
            chosen = np.random.default_rng([config.seed, epoch, 1]).integers(0, counts)
            batch = order[position * batch_size : (position + 1) * batch_size]
            torch.manual_seed(config.seed * 1_000_003 + step)
            batch_images = torch.stack([crop(image_tensor[i]) for i in batch])
            rows = torch.from_numpy(offsets[batch] + chosen[batch])
            mask = encoded.attention_mask[rows]
            length = int(mask.sum(dim=1).max())
            for group in optimizer.param_groups:
                group["lr"] = values.lr
            optimizer.param_groups[0]["weight_decay"] = values.weight_decay
            loss = model(batch_images, encoded.input_ids[rows, :length], mask[:, :length])
            if not math.isfinite(float(loss.detach())):
                raise MedfoundryError(
                    f"CLIP loss became {float(loss.detach())} at step {step}; lower the learning rate"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad)
            optimizer.step()
            model.clamp_logit_scale()
            step += 1
            losses.append(float(loss.detach()))
            if step % config.log_every_steps == 0 or step == stop_at:
                record = {"step": step, "epoch": epoch, "lr": values.lr, "loss": losses[-1]}
                record["temperature"] = float(1.0 / model.logit_scale.detach().exp())
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
            progress.update(task, completed=step, description=f"clip loss {losses[-1]:.3f}")
            if step % config.checkpoint_every_steps == 0 or step == stop_at:
                save_state(step)
    seconds = time.perf_counter() - started
    result = CLIPTrainResult(
        output_dir,
        output_dir / MODEL_DIR,
        step,
        schedules.total_steps,
        seconds,
        start_step,
        losses,
        n,
        len(texts),
        encoded.n_truncated,
        pairs.skipped.summary(),
    )
    if result.finished:
        window = max(1, min(10, len(losses) // 5))
        info = {
            "image_backbone": model_config.backbone,
            "image_size": model_config.img_size,
            "text_source": text_source,
            "data": data_description or pairs.name,
            "steps": step,
            "loss_start": float(np.mean(losses[:window])),
            "loss_end": float(np.mean(losses[-window:])),
            "loss_window_steps": window,
            "n_train_images": n,
            "n_train_texts": len(texts),
            "n_truncated_texts": encoded.n_truncated,
            "skipped": pairs.skipped.summary(),
            "split": {"test_fraction": clip.test_fraction, "split_seed": clip.split_seed},
            "fingerprint": fingerprint,
            "pretrain_config": config.model_dump(mode="json"),
        }
        save_clip(
            model, tokenizer, result.model_dir, info, pairs.image_ids, {"data": info["data"], "pretrain_steps": step}
        )
        log.info("CLIP model folder: %s", result.model_dir)
    write_json_atomic(
        output_dir / "summary.json",
        {
            "fingerprint": fingerprint,
            "steps": step,
            "total_steps": schedules.total_steps,
            "finished": result.finished,
            "seconds_this_run": seconds,
            "resumed_from_step": start_step,
            "loss_first": losses[0] if losses else None,
            "loss_last": losses[-1] if losses else None,
            "n_truncated_texts": encoded.n_truncated,
            "skipped": pairs.skipped.summary(),
        },
    )
    return result


def run_clip_pretraining(config: ExperimentConfig, resume: bool = True, show_progress: bool = True) -> PretrainResult:
    """``medfoundry pretrain --method clip``: pairs from ``data.source``, split by image (or patient), trained on
    ``data.pretrain_split``; the model folder is ``<output_dir>/pretrain/clip``."""
    pairs = load_pairs(config.data.source)
    splits = split_pairs(pairs, config.pretrain.clip.test_fraction, config.pretrain.clip.split_seed)
    split = config.data.pretrain_split
    if split not in splits:
        raise DataError(f"no split '{split}' in the pairs (found {sorted(splits)})", config.data.source)
    train = splits[split]
    description = f"{config.data.source} split '{split}' ({len(train)} images, {train.n_texts} texts)"
    result = train_clip(
        train,
        config.model,
        config.pretrain,
        config.output_dir / "pretrain",
        resume=resume,
        show_progress=show_progress,
        data_description=description,
    )
    if len(pairs.skipped):
        log.warning(pairs.skipped.summary())
    return PretrainResult(
        output_dir=result.output_dir,
        encoder_dir=result.model_dir / "image_encoder",
        steps=result.steps,
        total_steps=result.total_steps,
        seconds=result.seconds,
        images_per_second=(result.steps - result.resumed_from_step)
        * min(config.pretrain.batch_size, len(train))
        / max(result.seconds, 1e-9),
        collapsed=False,
        resumed_from_step=result.resumed_from_step,
    )
