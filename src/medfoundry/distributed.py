"""Scale-out on torch.distributed: process-group set-up from torchrun's environment, rank shards, DDP wrapping.

Under ``torchrun`` (``WORLD_SIZE`` > 1) pre-training and embedding split their work across ranks; without it
every helper here is a no-op and the single-process code runs unchanged. See docs/distributed.md.

What makes a run on W ranks compute what one process computes with the same global batch:

* every rank draws the same seeded permutation per epoch and takes its contiguous share of each global batch
  (:class:`RankBatchSampler`), and views are seeded per (seed, epoch, sample), so the union of the ranks' views
  is the single process's batch;
* batch norm is synchronised across ranks (:func:`prepare_for_ddp`), so heads with batch norm (SimCLR, MoCo v3,
  BYOL) normalise over the global batch;
* lightly losses and medfoundry's methods that support it gather across ranks (``gather_distributed``): SimCLR's
  NT-Xent negatives, MoCo v3's keys, DINO's and iBOT's Sinkhorn-Knopp sums and KoLeo neighbours;
* random masks (iBOT, MAE) are drawn for the global batch and each rank keeps its rows (:func:`rank_rows`);
* DistributedDataParallel averages the gradients, and the per-rank losses are means over equal shares.
"""

from __future__ import annotations

import atexit
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from lightly.utils import dist as lightly_dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Sampler

from medfoundry.errors import MedfoundryError

log = logging.getLogger("medfoundry.distributed")

K = TypeVar("K")


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands: its rank among ``world_size`` processes, and the device it computes on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None:
        if default is None:
            raise MedfoundryError(
                f"WORLD_SIZE is set but {name} is not: start the processes with torchrun (docs/distributed.md)"
            )
        return default
    try:
        return int(raw)
    except ValueError:
        raise MedfoundryError(f"environment variable {name}={raw!r} is not an integer") from None


def _current() -> DistEnv:
    backend = dist.get_backend()
    local_rank = _env_int("LOCAL_RANK", 0)
    device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, device)


def init_distributed() -> DistEnv:
    """Join the process group that torchrun describes in RANK, WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/PORT.

    NCCL with one GPU per rank (``cuda:LOCAL_RANK``) when CUDA is available, gloo on the CPU otherwise. Without
    torchrun (no WORLD_SIZE, or WORLD_SIZE=1) nothing is initialised and the single-process environment is
    returned, on the current GPU when there is one. Calling it again returns the group already joined. Ranks other
    than 0 log warnings and errors only.
    """
    if dist.is_available() and dist.is_initialized():
        return _current()
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size <= 1:
        # The trainer computes on env.device: a CPU default here left single-process pre-training on the CPU of
        # GPU machines (benchmarks/gpu_check.py).
        if torch.cuda.is_available():
            return DistEnv(device=torch.device("cuda", torch.cuda.current_device()))
        return DistEnv()
    if not dist.is_available():
        raise MedfoundryError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    rank, local_rank = _env_int("RANK"), _env_int("LOCAL_RANK")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise MedfoundryError(f"WORLD_SIZE > 1 but {name} is not set: start the processes with torchrun")
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise MedfoundryError(
                f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPUs are visible: "
                "use --nproc_per_node <= the number of GPUs"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", rank=rank, world_size=world_size, device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
    atexit.register(_destroy)
    if rank != 0:
        # One copy of every info line is enough; warnings and errors still show which rank raised them.
        logging.getLogger("medfoundry").setLevel(logging.WARNING)
    log.info("rank %d of %d on %s (%s)", rank, world_size, device, dist.get_backend())
    return DistEnv(rank, world_size, local_rank, device)


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.enabled:
        if env.device.type == "cuda":
            dist.barrier(device_ids=[env.device.index])
        else:
            dist.barrier()


def shard_bounds(num_items: int, env: DistEnv, align: int = 1) -> tuple[int, int]:
    """This rank's contiguous share ``[start, stop)`` of ``num_items``, cut at multiples of ``align``.

    Cutting at batch boundaries gives each rank the very batches a single process would run, so a sharded
    embedding computes bit-for-bit the same features. Ranks past the end get an empty share.
    """
    if align < 1:
        raise MedfoundryError(f"shard alignment must be at least 1, got {align}")
    blocks = -(-num_items // align)
    first, last = env.rank * blocks // env.world_size, (env.rank + 1) * blocks // env.world_size
    return min(first * align, num_items), min(last * align, num_items)


class RankBatchSampler(Sampler[list[K]]):
    """This rank's contiguous share of each global batch from ``batches`` (any batch sampler).

    Every rank iterates the same global batches (the trainer's sampler draws a permutation seeded by
    (seed, epoch), so, unlike torch's DistributedSampler, no ``set_epoch`` call is needed) and keeps
    rows ``[rank * b, (rank + 1) * b)`` with ``b = global batch / world_size``. Concatenating the ranks' shares
    in rank order gives back the global batch.
    """

    def __init__(self, batches: Sampler[list[K]], batch_size: int, env: DistEnv) -> None:
        if batch_size % env.world_size:
            raise MedfoundryError(
                f"batch_size {batch_size} is the global batch and must divide evenly over {env.world_size} "
                f"processes; use a multiple of {env.world_size}"
            )
        self.batches = batches
        self.per_rank = batch_size // env.world_size
        self.rank = env.rank

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[list[K]]:
        start = self.rank * self.per_rank
        for batch in self.batches:
            yield batch[start : start + self.per_rank]


class GlooSyncBatchNorm(_BatchNorm):
    """Batch norm over the global batch for CPU tensors under gloo, so CPU runs match one process.

    Written here because torch's SyncBatchNorm only runs on GPUs (and DDP rejects it in CPU modules). Two
    differentiable sums over ranks (lightly's all-gather, which all-reduces the gradients on the way back) give
    the global mean, then the global biased variance (two passes, as batch_norm itself computes it).
    Outside training, or on one process, it is plain batch norm.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:  # noqa: A002 - torch's argument name
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - torch's argument name
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(input)
        self._check_input_dim(input)
        dims = [0, *range(2, input.ndim)]
        shape = [1, -1] + [1] * (input.ndim - 2)
        local_count = input.numel() // input.shape[1]
        sums = torch.cat([input.sum(dims), input.new_tensor([float(local_count)])])
        sums = _sum_over_ranks(sums)
        count = sums[-1]
        mean = sums[:-1] / count
        squares = _sum_over_ranks((input - mean.view(shape)).square().sum(dims))
        var = squares / count
        output = (input - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)
        if self.affine:
            output = output * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                unbiased = var * (count / (count - 1).clamp(min=1))
                self.running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
                self.running_var.mul_(1 - factor).add_(unbiased.detach(), alpha=factor)
        return output


def _sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """A differentiable all-reduce (sum), added in rank order so that every rank gets the same bits."""
    return torch.stack(lightly_dist.gather(tensor)).sum(dim=0)


def sync_batchnorm(module: nn.Module, env: DistEnv) -> nn.Module:
    """Every batch-norm layer in ``module`` synchronised across ranks (torch's on GPU, gloo's on CPU).

    The layers keep their parameter and buffer objects, so the state dict and the optimiser are unchanged.
    """
    if env.device.type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, _BatchNorm) and not isinstance(module, GlooSyncBatchNorm):
        layer = GlooSyncBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        if module.affine:
            layer.weight, layer.bias = module.weight, module.bias
        if module.track_running_stats:
            layer.running_mean, layer.running_var = module.running_mean, module.running_var
            layer.num_batches_tracked = module.num_batches_tracked
        return layer.train(module.training)
    for name, child in module.named_children():
        module.add_module(name, sync_batchnorm(child, env))
    return module


def rank_rows(rows: torch.Tensor, blocks: int = 1) -> torch.Tensor:
    """This rank's rows of ``rows``, drawn for the whole global batch (random masks, say); unchanged on one process.

    ``rows`` holds ``blocks`` equal blocks (one per view), each the global batch in rank order; of each block the
    rank's contiguous share is kept, as :class:`RankBatchSampler` deals out the samples. Drawing for the global batch
    and keeping the rank's rows gives every sample what one process would draw for it.
    """
    world = lightly_dist.world_size()
    if world == 1:
        return rows
    if rows.shape[0] % (blocks * world):
        raise MedfoundryError(f"{rows.shape[0]} rows do not split into {blocks} blocks over {world} ranks")
    per_rank = rows.shape[0] // (blocks * world)
    return rows.view(blocks, world, per_rank, *rows.shape[1:])[:, lightly_dist.rank()].flatten(0, 1)


def gather_negatives(module: nn.Module) -> list[str]:
    """Turn on ``gather_distributed`` in every module of ``module`` that has it (lightly's NTXentLoss, MoCo v3, ...).

    Such losses then contrast each rank's samples with the negatives of the whole global batch, as one process
    would. Returns the names of the losses changed.
    """
    changed = []
    for name, child in module.named_modules():
        if isinstance(getattr(child, "gather_distributed", None), bool):
            child.gather_distributed = True
            changed.append(name or type(child).__name__)
    return changed


def prepare_for_ddp(method: nn.Module, env: DistEnv) -> nn.Module:
    """Synchronised batch norm and gathered negatives; returns ``method`` unchanged on one process."""
    if not env.enabled:
        return method
    method = sync_batchnorm(method, env)
    gathered = gather_negatives(method)
    if gathered:
        log.info("negatives gathered across ranks in %s", ", ".join(gathered))
    return method


class _TrainingStep(nn.Module):
    """Exposes ``training_step`` as ``forward``: DDP hooks gradient averaging onto the forward call."""

    def __init__(self, method: nn.Module) -> None:
        super().__init__()
        self.method = method

    def forward(self, views: Sequence[torch.Tensor], values: Any) -> Any:
        return self.method.training_step(views, values)


def wrap_training_step(method: nn.Module, env: DistEnv) -> Callable[..., Any]:
    """``method.training_step`` itself on one process; under DDP, the same step with gradients averaged.

    The whole method is wrapped, teachers included: DDP broadcasts rank 0's parameters and buffers at the start
    (so resumed and fresh runs begin identical everywhere) and averages the gradients of the trainable ones.
    """
    if not env.enabled:
        return method.training_step
    device_ids = [env.device.index] if env.device.type == "cuda" else None
    return DistributedDataParallel(_TrainingStep(method), device_ids=device_ids)


def mean_across_ranks(values: dict[str, float], env: DistEnv) -> dict[str, float]:
    """The mean over ranks of each value (the same keys on every rank); unchanged on one process."""
    if not env.enabled or not values:
        return dict(values)
    names = sorted(values)
    tensor = torch.tensor([values[n] for n in names], dtype=torch.float64, device=env.device)
    dist.all_reduce(tensor)
    return {name: float(value) / env.world_size for name, value in zip(names, tensor.tolist(), strict=True)}


def gather_rows(tensor: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """All ranks' equally sized ``tensor`` concatenated in rank order (the global batch); unchanged on one."""
    if not env.enabled:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(env.world_size)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def gather_objects(obj: Any, env: DistEnv) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order."""
    if not env.enabled:
        return [obj]
    found: list[Any] = [None] * env.world_size
    dist.all_gather_object(found, obj)
    return found


def reduce_any(flag: bool, env: DistEnv) -> bool:
    """Whether ``flag`` is true on any rank (so that all ranks take the same branch)."""
    if not env.enabled:
        return flag
    tensor = torch.tensor([1.0 if flag else 0.0], device=env.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item() > 0)


__all__ = [
    "DistEnv",
    "GlooSyncBatchNorm",
    "RankBatchSampler",
    "barrier",
    "gather_negatives",
    "gather_objects",
    "gather_rows",
    "init_distributed",
    "mean_across_ranks",
    "prepare_for_ddp",
    "rank_rows",
    "reduce_any",
    "shard_bounds",
    "sync_batchnorm",
    "wrap_training_step",
]
