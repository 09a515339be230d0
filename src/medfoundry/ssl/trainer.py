"""One trainer for every SSL method: schedules, AMP, clipping, monitors, atomic checkpoints, resume.

Resume is exact: batches come from a seeded permutation per epoch and each view from a generator seeded by
(seed, epoch, index), so a killed run resumed from its last checkpoint ends with the same weights as an
uninterrupted run with the same seed.

Under torchrun (medfoundry.distributed, docs/distributed.md) each rank trains on its share of every global
batch with DistributedDataParallel; rank 0 alone writes checkpoints, logs, progress and the encoder, and every
rank resumes from the same state file. ``batch_size`` stays the global batch, so the state is independent of
the number of processes and a run can resume on another number of them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from torch.utils.data import DataLoader

from medfoundry.config import PretrainConfig
from medfoundry.data.mixture import ConvertedChannels, MixedImageSet
from medfoundry.data.sample import ImageSet
from medfoundry.distributed import (
    DistEnv,
    RankBatchSampler,
    barrier,
    gather_rows,
    init_distributed,
    mean_across_ranks,
    prepare_for_ddp,
    wrap_training_step,
)
from medfoundry.errors import MedfoundryError
from medfoundry.io_utils import atomic_path, ensure_writable_dir, hash_json, load_training_state, write_json_atomic
from medfoundry.models.backbones import Encoder, skips_weight_decay
from medfoundry.models.checkpoint import save_encoder
from medfoundry.ssl.base import SSL_METHODS, SSLMethod
from medfoundry.ssl.monitor import CollapseMonitor
from medfoundry.ssl.schedules import Schedules
from medfoundry.ssl.views import EpochBatchSampler, SeededViewDataset

log = logging.getLogger("medfoundry.pretrain")

STATE_FILE = "state/last.pt"
ENCODER_DIR = "encoder"
SUMMARY_FILE = "summary.json"
# Settings that change how a run is logged or executed, not what it computes.
_NON_FUNCTIONAL = {
    "num_workers",
    "log_every_steps",
    "monitor_every_steps",
    "checkpoint_every_steps",
    "tensorboard",
    "stop_on_collapse",
}


@dataclass
class PretrainResult:
    output_dir: Path
    encoder_dir: Path
    steps: int
    total_steps: int
    seconds: float
    images_per_second: float
    collapsed: bool
    resumed_from_step: int
    monitor: list[dict[str, float]] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.steps >= self.total_steps


def run_fingerprint(config: PretrainConfig, images: ImageSet, encoder: Encoder) -> str:
    functional = {k: v for k, v in config.model_dump(mode="json").items() if k not in _NON_FUNCTIONAL}
    return hash_json(
        {"config": functional, "data": images.fingerprint(), "arch": [encoder.timm_name, encoder.timm_kwargs]}
    )


def _optimizer(method: SSLMethod, config: PretrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for module in method.trainable_modules():
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            (no_decay if skips_weight_decay(name, param) else decay).append(param)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
    )


def _save_state(
    path: Path,
    method: SSLMethod,
    optimizer: torch.optim.Optimizer,
    step: int,
    fingerprint: str,
    monitor: list[dict[str, float]],
) -> None:
    with atomic_path(path) as tmp:
        torch.save(
            {
                "method": method.state_dict(),
                "optimizer": optimizer.state_dict(),
                "step": step,
                "fingerprint": fingerprint,
                "monitor": monitor,
            },
            tmp,
        )


def pretrain(
    images: ImageSet,
    encoder: Encoder,
    config: PretrainConfig,
    output_dir: Path,
    resume: bool = True,
    data_description: str = "",
    stop_after_steps: int | None = None,
    show_progress: bool = True,
) -> PretrainResult:
    """Pre-train ``encoder`` on the unlabeled ``images`` with ``config.method``.

    Writes ``state/last.pt`` (resumable), ``encoder/`` (checkpoint folder), ``log.jsonl``, TensorBoard
    scalars under ``tensorboard/`` and ``summary.json``. ``stop_after_steps`` ends this call early (as a
    kill would) after checkpointing. Under torchrun the ranks share each global batch of ``config.batch_size``.
    """
    env = init_distributed()
    output_dir = ensure_writable_dir(Path(output_dir))
    images = _match_channels(images, encoder)
    torch.manual_seed(config.seed)
    if config.method not in SSL_METHODS:
        raise MedfoundryError(f"unknown SSL method '{config.method}'; known: {', '.join(sorted(SSL_METHODS))}")
    method = SSL_METHODS[config.method](encoder, config)
    # Before the optimiser is built: synchronised batch norm keeps the parameters, and they move to the device.
    method = prepare_for_ddp(method, env).to(env.device)
    optimizer = _optimizer(method, config)
    fingerprint = run_fingerprint(config, images, encoder)
    state_path = output_dir / STATE_FILE
    start_step, monitor = 0, CollapseMonitor()
    if not method.spread_signals_collapse:
        monitor.min_feature_std = 0.0
    if resume and state_path.is_file():
        state = load_training_state(state_path)
        if state["fingerprint"] != fingerprint:
            raise MedfoundryError(
                "existing training state was made with another config or data; use a new output folder "
                "or delete it to start over",
                state_path,
            )
        method.load_state_dict(state["method"])
        optimizer.load_state_dict(state["optimizer"])
        start_step, monitor.history = int(state["step"]), list(state["monitor"])
        log.info("resuming from step %d (%s)", start_step, state_path)

    views = method.build_views(encoder, config)
    epoch_order = images.epoch_order if isinstance(images, MixedImageSet) else None
    sampler = EpochBatchSampler(len(images), config.batch_size, config.epochs, config.seed, start_step, epoch_order)
    schedules = Schedules(config, sampler.steps_per_epoch)
    step_fn = wrap_training_step(method, env)
    loader = DataLoader(
        SeededViewDataset(images, views, config.seed),
        batch_sampler=RankBatchSampler(sampler, config.batch_size, env) if env.enabled else sampler,
        num_workers=config.num_workers,
        persistent_workers=False,
    )
    writer = _tensorboard(output_dir, config) if env.is_main else None
    log_path = output_dir / "log.jsonl"
    step, started, images_seen = start_step, time.perf_counter(), 0
    stop_at = schedules.total_steps if stop_after_steps is None else min(stop_after_steps, schedules.total_steps)
    method.train()
    with training_progress(show_progress and env.is_main) as progress, _log_file(log_path, env) as log_file:
        task = progress.add_task(f"{config.method} pre-training", total=schedules.total_steps, completed=start_step)
        for batch in loader:
            if step >= stop_at:
                break
            values = schedules.at(step)
            for group in optimizer.param_groups:
                group["lr"] = values.lr
            optimizer.param_groups[0]["weight_decay"] = values.weight_decay
            if env.device.type != "cpu":
                batch = [view.to(env.device, non_blocking=True) for view in batch]
            with torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=config.bf16):
                output = step_fn(batch, values)
            # The mean over ranks is the global batch's loss; every rank sees it, so all stop together on NaN.
            logs = mean_across_ranks(output.logs, env)
            if not math.isfinite(float(output.loss.detach())) or not math.isfinite(logs["loss"]):
                raise MedfoundryError(
                    f"loss became {float(output.loss.detach())} at step {step}; lower the learning rate or use fp32"
                )
            optimizer.zero_grad(set_to_none=True)
            output.loss.backward()
            method.before_optimizer_step(values)
            if config.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(
                    [p for m in method.trainable_modules() for p in m.parameters()], config.clip_grad
                )
            optimizer.step()
            method.after_optimizer_step(values)
            step += 1
            images_seen += batch[0].shape[0] * env.world_size
            record: dict[str, float] = {"step": step, "epoch": values.epoch, "lr": values.lr, **logs}
            if step % config.monitor_every_steps == 0 or step == stop_at:
                # Every rank reads the monitor on the global batch's features, so all agree on a collapse stop.
                reading = monitor.update(
                    step,
                    gather_rows(output.monitor_features.float(), env).cpu(),
                    mean_across_ranks(output.monitor_extra, env),
                )
                record.update({k: v for k, v in reading.items() if k != "step"})
                if monitor.collapsed:
                    log.warning(monitor.message())
            if env.is_main and (step % config.log_every_steps == 0 or "feature_std" in record):
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
                if writer is not None:
                    for key, value in record.items():
                        if key not in ("step", "epoch"):
                            writer.add_scalar(f"pretrain/{key}", value, step)
            progress.update(task, completed=step, description=f"{config.method} loss {logs['loss']:.3f}")
            if (
                show_progress
                and env.is_main
                and not progress.console.is_terminal
                and step % max(1, schedules.total_steps // 10) == 0
            ):
                # No live bar in logs and CI: a line every tenth of the run instead.
                log.info("step %d/%d loss %.3f", step, schedules.total_steps, logs["loss"])
            if env.is_main and (step % config.checkpoint_every_steps == 0 or step == stop_at):
                _save_state(state_path, method, optimizer, step, fingerprint, monitor.history)
            if config.stop_on_collapse and monitor.collapsed:
                log.error("stopping: %s", monitor.message())
                if env.is_main:
                    _save_state(state_path, method, optimizer, step, fingerprint, monitor.history)
                break
    if writer is not None:
        writer.close()
    seconds = time.perf_counter() - started
    if env.is_main and step > start_step and not state_path.is_file():
        _save_state(state_path, method, optimizer, step, fingerprint, monitor.history)
    result = PretrainResult(
        output_dir=output_dir,
        encoder_dir=output_dir / ENCODER_DIR,
        steps=step,
        total_steps=schedules.total_steps,
        seconds=seconds,
        images_per_second=images_seen / seconds if seconds > 0 else 0.0,
        collapsed=monitor.collapsed,
        resumed_from_step=start_step,
        monitor=monitor.history,
    )
    if result.finished and env.is_main:
        exported = method.export_encoder().cpu()
        save_encoder(
            exported,
            result.encoder_dir,
            extra={
                "ssl_method": config.method,
                "data": data_description or images.name,
                "pretrain_steps": step,
                "pretrain_fingerprint": fingerprint,
                "pretrain_config": config.model_dump(mode="json"),
            },
        )
    if env.is_main:
        _write_summary(output_dir, fingerprint, step, start_step, seconds, result, monitor)
    # No rank returns before rank 0 has written the state, the encoder and the summary that callers read next.
    barrier(env)
    return result


def _write_summary(
    output_dir: Path,
    fingerprint: str,
    step: int,
    start_step: int,
    seconds: float,
    result: PretrainResult,
    monitor: CollapseMonitor,
) -> None:
    write_json_atomic(
        output_dir / SUMMARY_FILE,
        {
            "fingerprint": fingerprint,
            "steps": step,
            "total_steps": result.total_steps,
            "finished": result.finished,
            "seconds_this_run": seconds,
            "images_per_second": result.images_per_second,
            "collapsed": result.collapsed,
            "resumed_from_step": start_step,
            "last_monitor": monitor.history[-1] if monitor.history else None,
        },
    )


def _match_channels(images: ImageSet, encoder: Encoder) -> ImageSet:
    """Grey X-rays saved as RGB files, or grey images for an RGB model: convert, and say so once."""
    if encoder.is_3d or len(images) == 0 or isinstance(images, MixedImageSet):
        return images  # a mixture converts its sources itself
    have = images.num_channels
    if have == encoder.in_chans:
        return images
    log.warning(
        "%s has %d-channel images and the model takes %d: converting them (%s)",
        images.name,
        have,
        encoder.in_chans,
        "RGB to grey by luma" if encoder.in_chans == 1 else "grey repeated to RGB",
    )
    return ConvertedChannels(images, encoder.in_chans)


def _log_file(path: Path, env: DistEnv) -> contextlib.AbstractContextManager[Any]:
    """log.jsonl on rank 0; the other ranks write their (identical, all-reduced) records nowhere."""
    return path.open("a") if env.is_main else open(os.devnull, "w")  # noqa: SIM115 - closed by the with block


def _tensorboard(output_dir: Path, config: PretrainConfig) -> Any:
    if not config.tensorboard:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(output_dir / "tensorboard"))


def training_progress(enabled: bool) -> Progress:
    """The rich progress bar of training loops (SSL and CLIP); disabled, it prints nothing."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
    )
