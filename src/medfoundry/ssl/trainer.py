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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
from medfoundry.models.checkpoint import (
    default_model_card,
    encoder_config,
    load_encoder_or_build,
    save_encoder,
    weights_hash,
)
from medfoundry.models.names import parse_model_name
from medfoundry.ssl.base import SSL_METHODS, SSLMethod
from medfoundry.ssl.monitor import CollapseMonitor, KNNMonitorSet
from medfoundry.ssl.schedules import Schedules, budget_steps
from medfoundry.ssl.views import EpochBatchSampler, SeededViewDataset

if TYPE_CHECKING:
    from medfoundry.config import PretrainConfig

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
    "threads",
}
# PretrainConfig's per-method sections; each method reads only the one named after it.
METHOD_SECTIONS = frozenset({"dino", "ibot", "simclr", "mocov3", "byol", "mae", "distill", "clip"})
# The budget is kept out of the fingerprint: a finished or stopped run can be extended to a larger budget.
_BUDGET = ("epochs", "max_steps", "max_minutes")
# A minutes budget times this many steps, after one untimed step (which pays for allocation and the first batches).
CALIBRATION_STEPS = 5
# The schedules during those steps are built for a run this long: all warm-ups are still at their start.
_PROVISIONAL_STEPS = 10_000


@dataclass
class PretrainResult:
    """What a pre-training call did.

    ``total_steps`` is the step count the schedules span (estimated for a minutes budget, 0 while not yet
    estimated). ``monitor`` holds every health reading (step, loss, feature_std, effective_rank, for DINO/iBOT
    teacher_entropy, prototypes_used and prototype_use, knn_accuracy and knn_balanced_accuracy with a kNN monitor
    set, and the warnings raised at that reading); ``warnings`` the health warnings raised over the whole run
    (step, check, message); ``collapsed`` the monitor's verdict at the end (a check failing ``patience`` readings in
    a row, or in most recent readings) and ``verdict`` its reasons, one line per check; ``init_from`` the file name
    of the encoder it continued from.
    """

    output_dir: Path
    encoder_dir: Path
    steps: int
    total_steps: int
    seconds: float
    images_per_second: float
    collapsed: bool
    resumed_from_step: int
    monitor: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[dict[str, Any]] = field(default_factory=list)
    time_up: bool = False
    budget: dict[str, Any] = field(default_factory=dict)
    init_from: str | None = None
    verdict: list[str] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        """The budget is spent: every scheduled step taken, or (minutes budget) the time is up."""
        return self.time_up or (self.total_steps > 0 and self.steps >= self.total_steps)


def run_fingerprint(
    config: PretrainConfig,
    images: ImageSet,
    encoder: Encoder,
    init_weights: str = "",
    method_inputs: dict[str, Any] | None = None,
    content: bool = True,
) -> str:
    """What makes a run the same run: its functional config, starting weights, architecture and data.

    The data enter by their content (``ImageSet.content_fingerprint``): a run whose data folder was copied, moved
    or restored still resumes. ``content=False`` uses the quick fingerprint (paths, sizes, times) instead.
    """
    data = images.content_fingerprint() if content else images.fingerprint()
    functional = {
        k: v for k, v in config.model_dump(mode="json").items() if k not in _NON_FUNCTIONAL and k not in _BUDGET
    }
    # Only the running method's own section: a setting added to (or changed in) another method's section does not
    # make a SimCLR run's state "another config".
    for section in METHOD_SECTIONS - {config.method}:
        functional.pop(section, None)
    # The starting weights, not their path: a moved checkpoint folder still resumes.
    functional["init_from"] = init_weights or None
    # What else a method learns from (a distillation teacher's weights): a replaced teacher file is another run.
    if method_inputs:
        functional["method_inputs"] = method_inputs
    return hash_json({"config": functional, "data": data, "arch": [encoder.timm_name, encoder.timm_kwargs]})


def _checked_fingerprint(
    state: dict[str, Any] | None, quick: str, content_fingerprint: Callable[[], str], state_path: Path
) -> str:
    """The run's fingerprint, checked against a saved ``state`` when there is one.

    An untouched run resumes on its quick fingerprint without reading the data. Otherwise the images' bytes
    decide: the same content under new paths or times resumes, anything else is another run and is refused.
    """
    # A state written before content fingerprints holds only the quick one, as "fingerprint".
    if state is not None and state.get("quick_fingerprint", state["fingerprint"]) == quick:
        return str(state["fingerprint"])
    fingerprint = content_fingerprint()
    if state is not None:
        if state["fingerprint"] != fingerprint:
            raise MedfoundryError(
                "existing training state was made with another config or data; use a new output folder "
                "or delete it to start over",
                state_path,
            )
        log.info("the data files were moved or rewritten, with the same content: resuming")
    return fingerprint


def budget_of(config: PretrainConfig) -> dict[str, Any]:
    return {name: getattr(config, name) for name in _BUDGET if getattr(config, name) is not None}


def init_name(spec: str) -> str:
    """What a model card says a run started from: file names only, never a private absolute path."""
    parsed = parse_model_name(spec)
    if parsed.kind == "public" and parsed.path is not None:
        variant = "" if parsed.variant == "full" else f"@{parsed.variant}"
        return f"public:{parsed.name}{variant}:{parsed.path.name}"
    return Path(spec).name if parsed.kind == "folder" else spec


def initial_encoder(spec: str) -> Encoder:
    """The encoder continued pre-training starts from: a checkpoint folder or a public model from local weights."""
    parsed = parse_model_name(spec)
    if parsed.kind not in ("folder", "public"):
        raise MedfoundryError(
            f"pretrain.init_from '{spec}' is neither a checkpoint folder nor public:NAME:PATH; continued pre-training "
            "starts from trained weights (the model section gives random ones)"
        )
    return load_encoder_or_build(spec, in_chans=3, img_size=None)


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


@dataclass
class _Budget:
    """Where a run stands against its budget; saved in the state so a resumed or extended run continues it."""

    budget: dict[str, Any]
    total_steps: int | None
    trained_seconds: float = 0.0
    seconds_per_step: float | None = None

    @property
    def seconds(self) -> float | None:
        minutes = self.budget.get("max_minutes")
        return None if minutes is None else 60.0 * float(minutes)

    def estimate(self, step: int, spent: float) -> int:
        """Steps a minutes budget allows: those taken plus the remaining seconds at the measured speed."""
        assert self.seconds is not None and self.seconds_per_step is not None
        return step + max(0, int((self.seconds - spent) // self.seconds_per_step))


def _save_state(
    path: Path,
    method: SSLMethod,
    optimizer: torch.optim.Optimizer,
    step: int,
    fingerprints: tuple[str, str],
    monitor: CollapseMonitor,
    budget: _Budget,
) -> None:
    with atomic_path(path) as tmp:
        torch.save(
            {
                "method": method.state_dict(),
                "optimizer": optimizer.state_dict(),
                "step": step,
                "fingerprint": fingerprints[0],
                "quick_fingerprint": fingerprints[1],
                "monitor": monitor.history,
                "warnings": monitor.warnings,
                "budget": budget.budget,
                "total_steps": budget.total_steps,
                "trained_seconds": budget.trained_seconds,
                "seconds_per_step": budget.seconds_per_step,
            },
            tmp,
        )


def _resumed_budget(state: dict[str, Any], config: PretrainConfig, planned: int | None, step: int) -> _Budget:
    """The budget of a resumed run: the saved one, or the config's when it changed (the run is extended)."""
    saved = _Budget(
        state.get("budget", {}),
        state.get("total_steps"),
        float(state.get("trained_seconds", 0.0)),
        state.get("seconds_per_step"),
    )
    budget = budget_of(config)
    if saved.budget == budget:
        return saved
    current = _Budget(budget, planned, saved.trained_seconds, saved.seconds_per_step)
    if current.seconds is not None and current.seconds_per_step is not None:
        current.total_steps = current.estimate(step, current.trained_seconds)
    if current.total_steps is not None and current.total_steps < step:
        raise MedfoundryError(
            f"this run has taken {step} steps, more than the new budget's {current.total_steps} ({budget}); give a "
            "larger budget to extend it, or use a new output folder"
        )
    log.info(
        "budget changed from %s to %s: continuing from step %d, schedules recomputed over %s steps",
        saved.budget or "an earlier one",
        budget,
        step,
        current.total_steps if current.total_steps is not None else "the estimated",
    )
    return current


def pretrain(
    images: ImageSet,
    encoder: Encoder,
    config: PretrainConfig,
    output_dir: Path,
    resume: bool = True,
    data_description: str = "",
    stop_after_steps: int | None = None,
    show_progress: bool = True,
    knn_monitor: KNNMonitorSet | None = None,
) -> PretrainResult:
    """Pre-train ``encoder`` on the unlabeled ``images`` with ``config.method``.

    Writes ``state/last.pt`` (resumable), ``encoder/`` (checkpoint folder), ``log.jsonl``, TensorBoard
    scalars under ``tensorboard/`` and ``summary.json``. ``stop_after_steps`` ends this call early (as a
    kill would) after checkpointing. Under torchrun the ranks share each global batch of ``config.batch_size``.

    The budget is ``config.epochs``, ``max_steps`` or ``max_minutes``. A minutes budget times steps 2 to
    1 + CALIBRATION_STEPS of the run (the schedules hold their start values meanwhile), sets the step count to the
    steps taken plus the remaining time over the mean time per step, and stops at that count or when the time is
    up, whichever comes first, saving the state either way. Calling again with a larger budget continues a
    finished or stopped run from its state, with the schedules recomputed over the new step count.

    ``config.init_from`` replaces ``encoder`` with trained weights (fresh SSL heads); ``knn_monitor`` adds the kNN
    accuracy of the encoder's features on its held-out part to every monitor reading (rank 0 only).
    """
    env = init_distributed()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    output_dir = ensure_writable_dir(Path(output_dir))
    init_weights, started_from = "", None
    if config.init_from is not None:
        encoder = initial_encoder(config.init_from)
        init_weights, started_from = weights_hash(encoder.backbone), init_name(config.init_from)
        log.info("continuing pre-training from %s with fresh %s heads", started_from, config.method)
    images = _match_channels(images, encoder)
    torch.manual_seed(config.seed)
    method = SSL_METHODS.get(config.method)(encoder, config)
    # Before the optimiser is built: synchronised batch norm keeps the parameters, and they move to the device.
    method = prepare_for_ddp(method, env).to(env.device)
    optimizer = _optimizer(method, config)
    method_inputs = method.fingerprint_inputs() if hasattr(method, "fingerprint_inputs") else None
    quick = run_fingerprint(config, images, encoder, init_weights, method_inputs, content=False)
    state_path = output_dir / STATE_FILE
    state = load_training_state(state_path) if resume and state_path.is_file() else None
    fingerprint = _checked_fingerprint(
        state, quick, lambda: run_fingerprint(config, images, encoder, init_weights, method_inputs), state_path
    )
    steps_per_epoch = EpochBatchSampler(len(images), config.batch_size, 1, config.seed).steps_per_epoch
    planned = budget_steps(config, steps_per_epoch)
    start_step, monitor = 0, CollapseMonitor()
    saved_readings: dict[str, Any] | None = None
    budget = _Budget(budget_of(config), planned)
    if not method.spread_signals_collapse:
        monitor.min_feature_std = 0.0
    if state is not None:
        method.load_state_dict(state["method"])
        optimizer.load_state_dict(state["optimizer"])
        start_step, saved_readings = int(state["step"]), state
        budget = _resumed_budget(state, config, planned, start_step)
        log.info("resuming from step %d (%s)", start_step, state_path)

    def schedules_for(total: int | None) -> Schedules:
        # Until a minutes budget is estimated: a run so long that its warm-ups have barely begun.
        provisional = max(_PROVISIONAL_STEPS, 10 * (start_step + CALIBRATION_STEPS + 1))
        schedules = Schedules(config, steps_per_epoch, total if total is not None else provisional)
        # A fresh head is near uniform by construction: judge the teacher once its warm-ups are over.
        monitor.judge_teacher_from_step = max(schedules.warmup_steps, schedules.teacher_warmup_steps)
        return schedules

    def stop_step(total: int | None) -> float:
        limit = math.inf if total is None else total
        return limit if stop_after_steps is None else min(stop_after_steps, limit)

    views = method.build_views(encoder, config)
    epoch_order = images.epoch_order if isinstance(images, MixedImageSet) else None
    # A minutes budget without an estimate yet draws epochs until the time is up.
    epochs = -(-budget.total_steps // steps_per_epoch) if budget.total_steps is not None else 1_000_000
    sampler = EpochBatchSampler(len(images), config.batch_size, epochs, config.seed, start_step, epoch_order)
    schedules = schedules_for(budget.total_steps)
    if saved_readings is not None:
        # After the schedules: the replayed readings are judged from the same step as they were.
        monitor.restore(list(saved_readings["monitor"]), list(saved_readings.get("warnings", [])))
    step_fn = wrap_training_step(method, env)
    loader = DataLoader(
        SeededViewDataset(images, views, config.seed),
        batch_sampler=RankBatchSampler(sampler, config.batch_size, env) if env.enabled else sampler,
        num_workers=config.num_workers,
        persistent_workers=False,
    )
    writer = _tensorboard(output_dir, config) if env.is_main else None
    log_path = output_dir / "log.jsonl"
    step, started, images_seen, saved_at = start_step, time.perf_counter(), 0, -1
    stop_at = stop_step(budget.total_steps)
    time_up = budget.seconds is not None and budget.trained_seconds >= budget.seconds
    timing_from = started
    progress_total = budget.total_steps or None
    method.train()
    with training_progress(show_progress and env.is_main) as progress, _log_file(log_path, env) as log_file:
        task = progress.add_task(f"{config.method} pre-training", total=progress_total, completed=start_step)
        for batch in loader:
            if step >= stop_at or time_up:
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
            now = time.perf_counter()
            if budget.seconds is not None:
                # The mean over ranks: every rank reads the same time, so all stop at the same step.
                spent = mean_across_ranks({"spent": budget.trained_seconds + now - started}, env)["spent"]
                if budget.total_steps is None and step - start_step == 1:
                    timing_from = now
                elif budget.total_steps is None and step - start_step == 1 + CALIBRATION_STEPS:
                    budget.seconds_per_step = (now - timing_from) / CALIBRATION_STEPS
                    budget.total_steps = budget.estimate(step, spent)
                    schedules, stop_at = schedules_for(budget.total_steps), stop_step(budget.total_steps)
                    progress.update(task, total=budget.total_steps)
                    log.info(
                        "%.3f s per step: %s min give %d steps; the schedules span them",
                        budget.seconds_per_step,
                        budget.budget["max_minutes"],
                        budget.total_steps,
                    )
                time_up = spent >= budget.seconds
            record: dict[str, Any] = {"step": step, "epoch": values.epoch, "lr": values.lr, **logs}
            if step % config.monitor_every_steps == 0 or step == stop_at or time_up:
                extra = mean_across_ranks(output.monitor_extra, env)
                if knn_monitor is not None and env.is_main:
                    extra.update(knn_monitor.evaluate(method.export_encoder(), env.device))
                # Every rank reads the monitor on the global batch's features, so all agree on a collapse stop.
                reading = monitor.update(
                    step, gather_rows(output.monitor_features.float(), env).cpu(), extra, loss=logs["loss"]
                )
                record.update({k: v for k, v in reading.items() if k != "step"})
            if env.is_main and (step % config.log_every_steps == 0 or "feature_std" in record):
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
                if writer is not None:
                    for key, value in record.items():
                        if key not in ("step", "epoch") and isinstance(value, int | float):
                            writer.add_scalar(f"pretrain/{key}", value, step)
            progress.update(task, completed=step, description=f"{config.method} loss {logs['loss']:.3f}")
            tenth = max(1, (budget.total_steps or _PROVISIONAL_STEPS) // 10)
            if show_progress and env.is_main and not progress.console.is_terminal and step % tenth == 0:
                # No live bar in logs and CI: a line every tenth of the run instead.
                log.info("step %d/%s loss %.3f", step, budget.total_steps or "?", logs["loss"])
            at_end = step == stop_at or time_up
            if env.is_main and (step % config.checkpoint_every_steps == 0 or at_end):
                budget_now = _Budget(budget.budget, budget.total_steps, budget.trained_seconds + now - started)
                budget_now.seconds_per_step = budget.seconds_per_step
                _save_state(state_path, method, optimizer, step, (fingerprint, quick), monitor, budget_now)
                saved_at = step
            if config.stop_on_collapse and monitor.collapsed:
                log.error("stopping: %s", monitor.message())
                break
    if writer is not None:
        writer.close()
    seconds = time.perf_counter() - started
    budget.trained_seconds += seconds
    if time_up and budget.total_steps is None:
        # The time ran out before the speed was measured: the run ends at the steps it took.
        log.warning("%s min ran out within the first steps; give a larger budget", budget.budget["max_minutes"])
        budget.total_steps = step
    finished = time_up or (budget.total_steps is not None and step >= budget.total_steps)
    # A verdict on the state the encoder ends in, kept in the state like every other reading.
    final_warnings = monitor.finish() if finished else []
    if env.is_main and (saved_at != step or final_warnings) and (step > start_step or final_warnings):
        _save_state(state_path, method, optimizer, step, (fingerprint, quick), monitor, budget)
    result = PretrainResult(
        output_dir=output_dir,
        encoder_dir=output_dir / ENCODER_DIR,
        steps=step,
        total_steps=budget.total_steps or 0,
        seconds=seconds,
        images_per_second=images_seen / seconds if seconds > 0 else 0.0,
        collapsed=monitor.collapsed,
        resumed_from_step=start_step,
        monitor=monitor.history,
        warnings=monitor.warnings,
        time_up=time_up,
        budget=budget.budget,
        init_from=started_from,
        verdict=monitor.verdict(),
    )
    if result.finished and env.is_main:
        exported = method.export_encoder().cpu()
        dumped = config.model_dump(mode="json")
        dumped["init_from"] = started_from
        # A method may name what it learnt from (a distillation teacher) and record its settings without paths.
        method_extra = dict(method.checkpoint_extra()) if hasattr(method, "checkpoint_extra") else {}
        dumped.update(method_extra.pop("settings", {}))
        extra = {
            "ssl_method": config.method,
            "data": data_description or images.name,
            "pretrain_steps": step,
            "pretrain_fingerprint": fingerprint,
            "pretrain_config": dumped,
            **({"init_from": started_from} if started_from else {}),
            **method_extra,
        }
        save_encoder(exported, result.encoder_dir, extra=extra, card=_model_card(exported, extra))
    if env.is_main:
        _write_summary(output_dir, fingerprint, step, start_step, seconds, result, monitor)
    # No rank returns before rank 0 has written the state, the encoder and the summary that callers read next.
    barrier(env)
    return result


def _model_card(encoder: Encoder, extra: dict[str, Any]) -> str:
    """The default card, plus what continued pre-training started from and the teacher a student learnt from."""
    card = default_model_card(encoder_config(encoder, extra))
    if "init_from" not in extra and "distilled_from" not in extra:
        return card
    lines = card.splitlines()
    at = next((i + 1 for i, line in enumerate(lines) if line.startswith("- Training:")), len(lines))
    if "distilled_from" in extra:
        lines.insert(at, f"- Distilled from: {extra['distilled_from']} (a frozen teacher; its weights are not here)")
    if "init_from" in extra:
        lines.insert(at, f"- Continued from: {extra['init_from']} (its encoder weights; fresh SSL heads)")
    return "\n".join(lines) + "\n"


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
            "verdict": result.verdict,
            "resumed_from_step": start_step,
            "time_up": result.time_up,
            "budget": result.budget,
            "init_from": result.init_from,
            "warnings": monitor.warnings,
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
