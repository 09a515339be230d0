"""GPU check: every CUDA path of medfoundry, run once through its public API, timed against a bare backbone.

Stages (each through the API a user calls, on real bundled data):

* ``bare``      forward and forward+backward of the backbone alone on random input, fp32 and bf16: the baselines.
* ``pretrain``  ``medfoundry.ssl.trainer.pretrain`` with DINO (bf16 autocast): warm-up steps, then resumed to the end.
* ``embed``     ``medfoundry.models.features.embed`` of BreastMNIST (repeated to a few thousand images), bf16.
* ``wsi``       ``medfoundry.wsi.tile_slides`` + ``embed_slides`` on CMU-1-Small-Region (tiled N x N into a
                pyramidal TIFF on the GPU, so that there are hundreds of tiles), bf16.
* ``finetune``  ``medfoundry.adapt.finetune.FineTuner`` (full and LoRA) on BreastMNIST under bf16 autocast.
* ``ddp``       ``pretrain`` under torchrun: 2 ranks with NCCL when there are 2+ GPUs; one NCCL rank on one GPU
                (which checks the backend and the launch, not the gradient averaging: medfoundry's DDP helpers
                are no-ops at world size 1); 2 gloo ranks on the CPU.

Every stage prints absolute throughput and a ratio to the bare backbone measured in the same run, e.g.
``pretrain (DINO) 0.27x of bare fwd+bwd``, and ends with a ``RESULT stage=... ratio=...`` line that
tests/test_gpu_check.py parses. A stage that fails prints ``FAILED`` with the error and the others still run;
the exit status is 1 if any failed. A stage meant for the GPU that left no CUDA memory allocated fails too
(the work ran on the CPU).

    python benchmarks/gpu_check.py                       # CUDA, a few minutes on one H200
    python benchmarks/gpu_check.py --tiny --device cpu   # seconds of work, for the test (plus torchrun start-up)

DINO's ratio has a ceiling well below 1: per image, the student runs forward and backward over 2 global and the
local crops and the teacher runs forward over the 2 global crops. The line prints that arithmetic bound (counted in
tokens, a forward taken as a third of forward+backward) beside the ratio.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
# The device machine gets the repository only: the slide is copied into this ignored folder beforehand.
DATA_CANDIDATES = [REPO_ROOT / ".gpucheck_data", REPO_ROOT.parent / "shared" / "data" / "wsi_samples"]
BUNDLED_NPZ = REPO_ROOT / "data" / "breastmnist" / "breastmnist.npz"
SLIDE_NAME = "CMU-1-Small-Region.svs"


@dataclass
class Sizes:
    """What one mode runs: the model, batch sizes and amounts of work."""

    model: str
    model_kwargs: dict[str, Any]
    bare_batch: int
    bare_iters: int
    pretrain_batch: int
    pretrain_warmup_steps: int
    pretrain_steps: int
    global_crop: int
    local_crop: int
    n_local: int
    pretrain_workers: int
    embed_images: int
    embed_batch: int
    mosaic: int
    wsi_batch: int
    finetune_batch: int
    finetune_steps: int
    ddp_steps: int
    dino_head: dict[str, int] = field(default_factory=dict)


def sizes_for(tiny: bool) -> Sizes:
    if tiny:
        # Seconds on a loaded 2-core CPU: a 2-block ViT on 28 px inputs.
        return Sizes(
            model="vit_tiny_28",
            model_kwargs={"depth": 2},
            bare_batch=16,
            bare_iters=3,
            pretrain_batch=16,
            pretrain_warmup_steps=1,
            pretrain_steps=3,
            global_crop=28,
            local_crop=16,
            n_local=2,
            pretrain_workers=0,
            embed_images=256,
            embed_batch=64,
            mosaic=1,
            wsi_batch=32,
            finetune_batch=16,
            finetune_steps=3,
            ddp_steps=2,
            dino_head={"out_dim": 128, "hidden_dim": 64, "bottleneck_dim": 32},
        )
    # ViT-S/16 at 224 px: the size of a typical pathology or radiology FM backbone, large enough to load an H200.
    return Sizes(
        model="vit_small_224",
        model_kwargs={},
        bare_batch=256,
        bare_iters=50,
        pretrain_batch=256,
        pretrain_warmup_steps=5,
        pretrain_steps=40,
        global_crop=224,
        local_crop=96,
        n_local=2,
        pretrain_workers=min(12, os.cpu_count() or 1),
        embed_images=16384,
        embed_batch=512,
        mosaic=6,
        wsi_batch=256,
        finetune_batch=256,
        finetune_steps=30,
        ddp_steps=20,
        dino_head={"out_dim": 4096, "hidden_dim": 1024, "bottleneck_dim": 256},
    )


@dataclass
class Row:
    stage: str
    label: str
    images_per_s: float
    ratio: float
    baseline: str
    note: str = ""


class Check:
    """The run's shared state: device, sizes, the baselines measured first, and the rows printed at the end."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device(args.device)
        self.sizes = sizes_for(args.tiny)
        self.work = Path(args.work)
        self.baselines: dict[str, float] = {}
        self.rows: list[Row] = []
        self.failures: list[tuple[str, str]] = []

    def encoder(self, seed: int = 0) -> Any:
        from medfoundry.models.backbones import create_encoder

        s = self.sizes
        # img_size set explicitly: a preset without one (vit_small_224) would get 28 px images unresized.
        return create_encoder(s.model, in_chans=3, img_size=s.global_crop, seed=seed, **s.model_kwargs)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def report(self, row: Row) -> None:
        self.rows.append(row)
        note = f" ({row.note})" if row.note else ""
        print(f"{row.label}: {row.images_per_s:,.0f} img/s, {row.ratio:.2f}x of {row.baseline}{note}", flush=True)
        print(f"RESULT stage={row.stage} img_s={row.images_per_s:.6g} ratio={row.ratio:.6g}", flush=True)

    def run_stage(self, name: str, body: Callable[[], None]) -> None:
        print(f"\n== {name} ==", flush=True)
        started = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            body()
        except Exception as error:  # noqa: BLE001 - a failed stage is a finding; the others still run
            message = f"{type(error).__name__}: {error}".strip().splitlines()
            self.failures.append((name, " | ".join(message)[:2000]))
            traceback.print_exc()
            print(f"FAILED stage={name}: {' | '.join(message)[:2000]}", flush=True)
        else:
            if self.device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(self.device) / 2**30
                print(f"{name}: peak CUDA memory {peak:.2f} GiB", flush=True)
        print(f"{name}: {time.perf_counter() - started:.1f} s", flush=True)

    def expect_cuda_used(self, what: str) -> None:
        """A GPU stage that allocated nothing on the GPU ran on the CPU: the CUDA path was never taken."""
        if self.device.type == "cuda" and torch.cuda.max_memory_allocated(self.device) == 0:
            raise RuntimeError(f"{what} allocated no CUDA memory: it ran on the CPU")


# ---- data ---------------------------------------------------------------------------------------------------


def breastmnist(args: argparse.Namespace) -> dict[str, Any]:
    from medfoundry.data.medmnist import load_medmnist_npz

    return load_medmnist_npz(args.npz)


def repeated(images: Any, count: int, name: str) -> Any:
    """``count`` images cycling through ``images``, with unique ids (embedding and pre-training need volume)."""
    from medfoundry.data.sample import ArrayImageSet

    pixels = np.stack([images.load(i) for i in range(len(images))])
    index = np.arange(count) % len(pixels)
    ids = [f"{name}_{i:06d}" for i in range(count)]
    labels = None if images.labels is None else np.asarray(images.labels)[index]
    return ArrayImageSet(name, Path(name), pixels[index], ids, ids, labels)


def find_slide(explicit: Path | None) -> Path:
    if explicit is not None:
        return explicit
    for folder in DATA_CANDIDATES:
        if (folder / SLIDE_NAME).is_file():
            return folder / SLIDE_NAME
    raise FileNotFoundError(f"{SLIDE_NAME} not found in {', '.join(map(str, DATA_CANDIDATES))}; pass --slide")


# ---- stages -------------------------------------------------------------------------------------------------


def _timed(check: Check, step: Callable[[], None], iters: int) -> float:
    for _ in range(2):  # kernels picked, allocator warm: first calls belong to no measurement
        step()
    check.sync()
    started = time.perf_counter()
    for _ in range(iters):
        step()
    check.sync()
    return time.perf_counter() - started


def stage_bare(check: Check) -> None:
    s = check.sizes
    encoder = check.encoder().to(check.device)
    size = encoder.img_size or s.global_crop
    x = torch.randn(s.bare_batch, 3, size, size, device=check.device)
    results: dict[str, float] = {}
    for precision in ("fp32", "bf16"):
        enabled = precision == "bf16"

        def forward(enabled: bool = enabled) -> None:
            with torch.inference_mode(), torch.autocast(check.device.type, torch.bfloat16, enabled=enabled):
                encoder(x)

        def forward_backward(enabled: bool = enabled) -> None:
            with torch.autocast(check.device.type, torch.bfloat16, enabled=enabled):
                loss = encoder(x).float().square().mean()
            loss.backward()
            encoder.zero_grad(set_to_none=True)

        encoder.eval()
        results[f"fwd_{precision}"] = s.bare_batch * s.bare_iters / _timed(check, forward, s.bare_iters)
        encoder.train()
        results[f"fwdbwd_{precision}"] = s.bare_batch * s.bare_iters / _timed(check, forward_backward, s.bare_iters)
    check.expect_cuda_used("the bare backbone")
    check.baselines.update(results)
    for key, value in results.items():
        kind, precision = key.split("_")
        print(f"bare {'forward' if kind == 'fwd' else 'fwd+bwd'} {precision}: {value:,.0f} img/s", flush=True)
    check.report(
        Row(
            "bf16_fwd",
            "bf16 speed-up, bare forward",
            results["fwd_bf16"],
            results["fwd_bf16"] / results["fwd_fp32"],
            "fp32 bare forward",
        )
    )
    check.report(
        Row(
            "bf16_fwdbwd",
            "bf16 speed-up, bare fwd+bwd",
            results["fwdbwd_bf16"],
            results["fwdbwd_bf16"] / results["fwdbwd_fp32"],
            "fp32 bare fwd+bwd",
        )
    )


def _pretrain_config(check: Check, steps: int, batch: int, images: int) -> Any:
    from medfoundry.config import PretrainConfig

    s = check.sizes
    # One epoch of exactly ``steps`` batches; no warm-up epochs so the schedule does not depend on the size.
    return PretrainConfig.model_validate(
        {
            "method": "dino",
            "epochs": max(1, math.ceil(steps * batch / images)),
            "batch_size": batch,
            "warmup_epochs": 0,
            "bf16": check.device.type == "cuda",
            "num_workers": s.pretrain_workers,
            "tensorboard": False,
            "checkpoint_every_steps": 10_000,
            "monitor_every_steps": 10_000,
            "log_every_steps": 10_000,
            "views": {"global_crop_size": s.global_crop, "local_crop_size": s.local_crop, "n_local_views": s.n_local},
            "dino": s.dino_head,
        }
    )


def dino_bound(check: Check) -> float:
    """DINO's best ratio to one bare fwd+bwd: the work per image counted in global-crop tokens."""
    s = check.sizes
    patch = 16 if s.global_crop >= 96 else 4
    tokens = (s.global_crop // patch) ** 2 + 1
    local_tokens = (s.local_crop // patch) ** 2 + 1
    student = 2 + s.n_local * local_tokens / tokens
    teacher = 2 / 3  # forward only
    return 1 / (student + teacher)


def stage_pretrain(check: Check, data: dict[str, Any]) -> None:
    from medfoundry.ssl.trainer import pretrain

    s = check.sizes
    total = s.pretrain_warmup_steps + s.pretrain_steps
    images = repeated(data["train"], total * s.pretrain_batch, "breastmnist_pretrain")
    config = _pretrain_config(check, total, s.pretrain_batch, len(images))
    out = check.work / "pretrain"
    # Warm-up steps (CUDA context, kernel choice, workers) are checkpointed; the resumed call is the measurement.
    pretrain(images, check.encoder(), config, out, stop_after_steps=s.pretrain_warmup_steps, show_progress=False)
    result = pretrain(images, check.encoder(), config, out, show_progress=False)
    check.expect_cuda_used("pretrain()")
    if result.resumed_from_step != s.pretrain_warmup_steps or not result.finished:
        raise RuntimeError(f"expected a resume from step {s.pretrain_warmup_steps} to the end, got {result}")
    bound = dino_bound(check)
    ratio = result.images_per_second / check.baselines["fwdbwd_bf16" if config.bf16 else "fwdbwd_fp32"]
    check.baselines["pretrain"] = result.images_per_second
    check.report(
        Row(
            "pretrain",
            "pretrain (DINO)",
            result.images_per_second,
            ratio,
            f"bare fwd+bwd {'bf16' if config.bf16 else 'fp32'}",
            f"arithmetic bound {bound:.2f}x: {ratio / bound:.0%} of it; "
            f"{s.pretrain_steps} steps of {s.pretrain_batch}, {2 + s.n_local} views, {s.pretrain_workers} workers",
        )
    )


def stage_embed(check: Check, data: dict[str, Any]) -> None:
    from medfoundry.models.features import embed

    s = check.sizes
    bf16 = check.device.type == "cuda"
    images = repeated(data["test"], s.embed_images, "breastmnist_embed")
    encoder = check.encoder().to(check.device)
    embed(encoder, repeated(data["test"], s.embed_batch * 2, "warmup"), None, s.embed_batch, bf16=bf16)
    result = embed(encoder, images, check.work / "embed.h5", s.embed_batch, bf16=bf16)
    check.expect_cuda_used("embed()")
    if result.features.shape != (len(images), encoder.embed_dim) or not np.isfinite(result.features).all():
        raise RuntimeError(f"unexpected features {result.features.shape}")
    speed = len(images) / result.seconds
    check.report(
        Row(
            "embed",
            "embed",
            speed,
            speed / check.baselines["fwd_bf16" if bf16 else "fwd_fp32"],
            f"bare forward {'bf16' if bf16 else 'fp32'}",
            f"{len(images)} BreastMNIST images 28 px resized on the device, batch {s.embed_batch}, HDF5 written",
        )
    )


def stage_wsi(check: Check) -> None:
    from medfoundry.wsi import embed_slides, tile_slides

    s = check.sizes
    bf16 = check.device.type == "cuda"
    slide = find_slide(check.args.slide)
    if s.mosaic > 1:
        from wsi import write_mosaic  # benchmarks/wsi.py, beside this script (on sys.path when run as a script)

        slide = write_mosaic(slide, s.mosaic, check.work / f"cmu1_mosaic{s.mosaic}.tif")
    out = check.work / "wsi"
    started = time.perf_counter()
    tiled = tile_slides([slide], out / "tiles", mpp=0.5, tile_size=224, echo=lambda line: None)
    tiling_seconds = time.perf_counter() - started
    if not tiled.done:
        raise RuntimeError(f"tiling failed: {tiled.skipped}")
    encoder = check.encoder()
    summary = embed_slides(
        out / "tiles" / "patches",
        s.model,
        out / "features",
        slides=[slide],
        batch_size=s.wsi_batch,
        bf16=bf16,
        device=str(check.device),
        encoder=encoder,
        progress=False,
        echo=lambda line: None,
    )
    if summary.failed or not summary.done:
        raise RuntimeError(f"embed_slides failed: {summary.failed}")
    check.expect_cuda_used("embed_slides()")
    row = summary.done[0]
    tiles, seconds = int(row["tiles"]), float(row["seconds"])
    bare = check.baselines["fwd_bf16" if bf16 else "fwd_fp32"]
    # The bare baseline ran at the encoder's input size; the tiles are 224 px, resized to it as embed() does.
    baseline = f"bare forward {'bf16' if bf16 else 'fp32'}"
    check.report(
        Row(
            "wsi_embed",
            "slide embedding",
            tiles / seconds,
            tiles / seconds / bare,
            baseline,
            f"{tiles} tiles of 224 px, batch {s.wsi_batch}, loader workers read the slide",
        )
    )
    total = tiling_seconds + seconds
    check.report(
        Row(
            "wsi_tile_embed",
            "slide tiling + embedding",
            tiles / total,
            tiles / total / bare,
            baseline,
            f"tiling {tiling_seconds:.2f} s",
        )
    )


def stage_finetune(check: Check, data: dict[str, Any]) -> None:
    from medfoundry.adapt.finetune import FineTuner

    s = check.sizes
    bf16 = check.device.type == "cuda"
    train = repeated(data["train"], max(len(data["train"]), s.finetune_batch * 2), "breastmnist_finetune")
    encoder = check.encoder().to(check.device)
    baseline = check.baselines["fwdbwd_bf16" if bf16 else "fwdbwd_fp32"]
    for mode in ("full", "lora"):

        def fit(steps: int, mode: str = mode) -> Any:
            tuner = FineTuner(
                encoder, 2, mode=mode, max_steps=steps, eval_every_steps=10**6, batch_size=s.finetune_batch
            )
            # FineTuner has no precision option: autocast around fit is how a caller asks for bf16.
            with torch.autocast(check.device.type, torch.bfloat16, enabled=bf16):
                return tuner.fit(train)

        fit(2)  # warm-up (kernels, LoRA wrapping)
        tuner = fit(s.finetune_steps)
        proba = tuner.predict_proba(data["test"])
        if proba.shape != (len(data["test"]), 2) or not np.isfinite(proba).all():
            raise RuntimeError(f"predict_proba gave {proba.shape}")
        check.expect_cuda_used(f"FineTuner({mode!r})")
        speed = tuner.steps_ * s.finetune_batch / tuner.seconds_
        check.report(
            Row(
                f"finetune_{mode}",
                f"fine-tune ({mode})",
                speed,
                speed / baseline,
                f"bare fwd+bwd {'bf16' if bf16 else 'fp32'}",
                f"{tuner.steps_} steps of {s.finetune_batch}, 28 px resized on the device; "
                f"trainable {tuner.trainable_parameters_:,} of {tuner.total_parameters_:,}",
            )
        )


def stage_ddp(check: Check) -> None:
    gpus = torch.cuda.device_count() if check.device.type == "cuda" else 0
    ranks = min(2, gpus) if gpus else 2
    backend = "nccl" if gpus else "gloo"
    out = check.work / "ddp"
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if not gpus:
        env["CUDA_VISIBLE_DEVICES"] = ""  # gloo on the CPU even where a GPU exists
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]
    command += [__file__, "--ddp-worker", str(out), "--npz", str(check.args.npz)]
    command += ["--tiny"] if check.args.tiny else []
    print(f"torchrun: {ranks} rank(s), {backend}", flush=True)
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=check.args.ddp_timeout)
    if done.returncode != 0:
        raise RuntimeError(f"torchrun exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    report = json.loads((out / "ddp.json").read_text())
    print(json.dumps(report), flush=True)
    if report["backend"] != backend or report["world_size"] != ranks:
        raise RuntimeError(f"expected {ranks} {backend} rank(s), the workers report {report}")
    reference = check.baselines.get("pretrain")
    note = f"{ranks} rank(s), {backend}, {report['steps']} steps of global batch {report['batch']}"
    if reference:
        note += f"; {report['images_per_s'] / reference:.2f}x of single-process pretrain"
    bf16 = check.device.type == "cuda"
    baseline = check.baselines["fwdbwd_bf16" if bf16 else "fwdbwd_fp32"]
    check.report(
        Row(
            "ddp",
            "pretrain (DINO) under torchrun",
            report["images_per_s"],
            report["images_per_s"] / baseline,
            f"bare fwd+bwd {'bf16' if bf16 else 'fp32'}" + (" (one GPU)" if bf16 else ""),
            note,
        )
    )


def ddp_worker(out: Path, args: argparse.Namespace) -> None:
    """One torchrun rank: DINO pre-training through ``pretrain``, which joins the group itself."""
    import torch.distributed as dist

    from medfoundry.distributed import init_distributed
    from medfoundry.ssl.trainer import pretrain

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and torch.cuda.is_available():
        # medfoundry starts no group for one process; join a one-rank NCCL group so init_distributed takes its
        # "already initialised" branch and one NCCL collective runs on this GPU.
        torch.cuda.set_device(0)
        dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    env = init_distributed()
    if dist.is_initialized():
        probe = torch.ones(1, device=env.device if env.device.type == "cuda" else "cpu")
        dist.all_reduce(probe)
        if float(probe) != world:
            raise RuntimeError(f"all_reduce gave {float(probe)} on {world} ranks")
    check = Check(argparse.Namespace(**{**vars(args), "device": str(env.device), "work": str(out)}))
    s = check.sizes
    # Under torchrun the device is medfoundry's choice (cuda:LOCAL_RANK, or the CPU for gloo); bf16 follows it.
    check.device = env.device
    images = repeated(breastmnist(args)["train"], (s.ddp_steps + 1) * s.pretrain_batch, "breastmnist_ddp")
    config = _pretrain_config(check, s.ddp_steps + 1, s.pretrain_batch, len(images))
    pretrain(images, check.encoder(), config, out / "run", stop_after_steps=1, show_progress=False)
    result = pretrain(images, check.encoder(), config, out / "run", show_progress=False)
    if env.is_main:
        backend = dist.get_backend() if dist.is_initialized() else "none"
        report = {
            "backend": backend,
            "world_size": world,
            "device": str(env.device),
            "steps": result.steps - result.resumed_from_step,
            "batch": s.pretrain_batch,
            "images_per_s": result.images_per_second,
        }
        (out / "ddp.json").write_text(json.dumps(report))


# ---- main ---------------------------------------------------------------------------------------------------


def print_table(check: Check) -> None:
    print("\n" + "=" * 100)
    device = torch.cuda.get_device_name(check.device) if check.device.type == "cuda" else "CPU"
    tiny = " (tiny)" if check.args.tiny else ""
    print(f"GPU check on {device}, torch {torch.__version__}, model {check.sizes.model}{tiny}")
    print(f"{'stage':<34}{'img/s':>12}{'ratio':>9}  of")
    for row in check.rows:
        print(f"{row.label:<34}{row.images_per_s:>12,.0f}{row.ratio:>8.2f}x  {row.baseline}")
        if row.note:
            print(f"{'':<57}{row.note}")
    for stage, message in check.failures:
        print(f"FAILED {stage}: {message[:300]}")
    print("=" * 100, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="a 2-block ViT at 28 px and a few steps (CPU test)")
    parser.add_argument("--npz", type=Path, default=BUNDLED_NPZ)
    parser.add_argument("--slide", type=Path, default=None, help=f"default: {SLIDE_NAME} in .gpucheck_data/")
    parser.add_argument("--stages", default="bare,pretrain,embed,wsi,finetune,ddp")
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows and failures here")
    parser.add_argument("--ddp-timeout", type=float, default=300.0)
    parser.add_argument("--ddp-worker", type=Path, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.ddp_worker is not None:
        ddp_worker(args.ddp_worker, args)
        return 0
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no GPU (use --device cpu --tiny)")
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as scratch:
        args.work = args.work or scratch
        check = Check(args)
        if check.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = False  # fp32 baselines stay true fp32
            print(
                f"{torch.cuda.get_device_name(check.device)}, torch {torch.__version__}, "
                f"CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s), {os.cpu_count()} CPUs",
                flush=True,
            )
        data = breastmnist(args)
        stages: dict[str, Callable[[], None]] = {
            "bare": lambda: stage_bare(check),
            "pretrain": lambda: stage_pretrain(check, data),
            "embed": lambda: stage_embed(check, data),
            "wsi": lambda: stage_wsi(check),
            "finetune": lambda: stage_finetune(check, data),
            "ddp": lambda: stage_ddp(check),
        }
        wanted = [name.strip() for name in args.stages.split(",") if name.strip()]
        if "bare" not in wanted:
            wanted.insert(0, "bare")  # every ratio needs it
        for name in wanted:
            check.run_stage(name, stages[name])
        print_table(check)
        if args.json is not None:
            payload = {"rows": [vars(row) for row in check.rows], "failures": check.failures}
            args.json.write_text(json.dumps(payload, indent=2))
    return 1 if check.failures else 0


if __name__ == "__main__":
    sys.exit(main())
