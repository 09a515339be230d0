"""Every SSL method at the same wall-clock budget, on BreastMNIST and on the Kermany chest X-ray subset.

For each dataset and method: measure the trainer's step time on a short calibration run, set the number of
epochs so that pre-training takes about ``--budget`` seconds, pre-train with the method's YAML recipe
(configs/pretrain/<method>.yaml), then embed and report images per second, the linear-probe test AUROC (C chosen
on a validation split) and the kNN test accuracy, next to the same network with random weights.

BreastMNIST: official splits (546 / 78 / 156), 28 px, 1 channel, the recipes as they are.
Kermany: the 600 X-rays in ../shared/data, grey at 64 px, a stratified 80/20 split (the subset has no patient ids,
so the split is by image); the probe's C is chosen on a fifth of the 80%, then refitted on all of it. ViT with 8 px
patches (vit_tiny_64), views scaled to 64 px, radiology view preset.

It also measures the trainer's throughput against a bare loop (timm ViT + lightly SimCLR head and NT-Xent, the
same views, batch, bf16 autocast and gradient clipping; no schedules, seeded views, monitors, logs or checkpoints),
interleaved in the same run. Its ratio is given from the images per second each loop measures (wall) and from the
CPU seconds (user + system, loader workers included; benchmarks/_timing.py) of each whole call, set-up included,
which hold steady on a loaded machine.
Target: ratio >= 0.95.

    python benchmarks/ssl_methods.py                   # 120 s per method and dataset: about 40 min on 2 CPU cores
    python benchmarks/ssl_methods.py --budget 20 --methods simclr,dino --datasets breastmnist   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import timm
import torch
from lightly.loss import NTXentLoss
from lightly.models.modules import SimCLRProjectionHead
from torch.utils.data import DataLoader, Dataset

from medfoundry.adapt.knn import KNNProbe
from medfoundry.adapt.linear import LinearProbe
from medfoundry.bench.run import build_encoder
from medfoundry.config import ExperimentConfig, PretrainConfig, load_config
from medfoundry.data.registry import load_dataset
from medfoundry.data.sample import ImageSet
from medfoundry.data.splits import patient_split
from medfoundry.evaluate.metrics import auroc
from medfoundry.models.backbones import Encoder
from medfoundry.models.checkpoint import load_encoder
from medfoundry.models.features import extract_features
from medfoundry.ssl.base import SSL_METHODS
from medfoundry.ssl.trainer import pretrain
from medfoundry.ssl.views import to_pil

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared timer beside this script, however it is run
from _timing import Timed, median, timed  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MEDFOUNDRY_SHARED_DATA", REPO.parent / "shared" / "data"))
METHODS = ("simclr", "mocov3", "byol", "dino", "ibot", "mae")
CALIBRATION_STEPS = 6


@dataclass
class Task:
    name: str
    train: ImageSet  # pre-training images (labels unused) and the probes' training set
    val: ImageSet | None  # None: the probe's C is chosen on a fifth of ``train``, then refitted on all of it
    test: ImageSet
    overrides: list[str]  # applied on top of each method's recipe


@dataclass
class Row:
    dataset: str
    method: str
    epochs: int
    steps: int
    seconds: float
    images_per_second: float
    linear_auroc: float
    knn_accuracy: float
    collapsed: bool


def breastmnist() -> Task:
    splits = load_dataset(REPO / "data/breastmnist/breastmnist.npz")
    return Task("breastmnist", splits["train"], splits["val"], splits["test"], [])


def kermany() -> Task:
    images = load_dataset(SHARED / "kermany_cxr_224_trainsubset", channels=1, image_size=64)["train"]
    labels = np.asarray(images.labels)
    outer = patient_split(images.ids, labels, (0.8, 0.2), seed=0, names=("train", "test"))
    return Task(
        "kermany",
        images.subset(outer["train"], "kermany-train"),
        None,
        images.subset(outer["test"], "kermany-test"),
        [
            "model.backbone=vit_tiny_64",
            "model.img_size=64",
            "pretrain.views.domain=radiology",
            "pretrain.views.global_crop_size=64",
            "pretrain.views.local_crop_size=32",
        ],
    )


def recipe(method: str, task: Task, output: Path) -> ExperimentConfig:
    # One pooling for all methods, so that the probes compare like with like.
    overrides = [*task.overrides, f"output_dir={output}", "pretrain.tensorboard=false", "model.pool=token+avg"]
    return load_config(ExperimentConfig, REPO / f"configs/pretrain/{method}.yaml", overrides)


def unlabeled(images: ImageSet) -> ImageSet:
    subset = images.subset(np.arange(len(images)), name=f"{images.name}-unlabeled")
    subset.labels = None
    return subset


def calibrate(config: ExperimentConfig, images: ImageSet, folder: Path) -> float:
    """Seconds per optimisation step of this method on this data, from a short run (thrown away)."""
    shutil.rmtree(folder, ignore_errors=True)
    long = config.pretrain.model_copy(update={"epochs": 1000})
    result = pretrain(
        images, build_encoder(config), long, folder, stop_after_steps=CALIBRATION_STEPS, show_progress=False
    )
    shutil.rmtree(folder, ignore_errors=True)
    return result.seconds / result.steps


def probe_scores(encoder: Encoder, task: Task) -> tuple[float, float]:
    train, test = extract_features(encoder, task.train), extract_features(encoder, task.test)
    y_train, y_test = np.asarray(task.train.labels), np.asarray(task.test.labels)
    if task.val is None:
        inner = patient_split(task.train.ids, y_train, (0.8, 0.2), seed=1)
        chooser = LinearProbe().fit(
            train[inner["train"]], y_train[inner["train"]], train[inner["val"]], y_train[inner["val"]]
        )
        probe = LinearProbe(c_grid=(chooser.C_,)).fit(train, y_train)
    else:
        probe = LinearProbe().fit(train, y_train, extract_features(encoder, task.val), np.asarray(task.val.labels))
    linear = auroc(y_test, probe.predict_proba(test))
    knn = float((KNNProbe().fit(train, y_train).predict(test) == y_test).mean())
    return linear, knn


def run_method(method: str, task: Task, budget: float, root: Path) -> Row:
    config = recipe(method, task, root / task.name / method)
    images = unlabeled(task.train)
    seconds_per_step = calibrate(config, images, root / task.name / f"{method}-calibration")
    steps_per_epoch = len(images) // config.pretrain.batch_size
    epochs = max(1, round(budget / (seconds_per_step * steps_per_epoch)))
    pretrain_config = config.pretrain.model_copy(update={"epochs": epochs})
    folder = root / task.name / method
    shutil.rmtree(folder, ignore_errors=True)
    result = pretrain(images, build_encoder(config), pretrain_config, folder, show_progress=False)
    linear, knn = probe_scores(load_encoder(result.encoder_dir), task)
    return Row(
        task.name, method, epochs, result.steps, result.seconds, result.images_per_second, linear, knn, result.collapsed
    )


def random_init_row(task: Task, root: Path) -> Row:
    config = recipe("dino", task, root)
    linear, knn = probe_scores(build_encoder(config), task)
    return Row(task.name, "random-init", 0, 0, 0.0, 0.0, linear, knn, False)


class _ViewsOf(Dataset):
    def __init__(self, images: ImageSet, transform) -> None:  # noqa: ANN001
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> list[torch.Tensor]:
        return self.transform(to_pil(self.images.load(index)))


def bare_simclr_loop(config: PretrainConfig, encoder: Encoder, images: ImageSet, steps: int) -> float:
    """Images per second of a plain SimCLR loop: timm model, lightly head and loss, same views, batch and bf16."""
    torch.manual_seed(0)
    model = timm.create_model(encoder.timm_name, pretrained=False, **{**encoder.timm_kwargs, "num_classes": 0})
    cfg = config.simclr
    head = SimCLRProjectionHead(int(model.num_features), cfg.hidden_dim, cfg.out_dim, num_layers=cfg.num_layers)
    criterion = NTXentLoss(temperature=cfg.temperature)
    optimizer = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=config.lr)
    transform = SSL_METHODS["simclr"](encoder, config).build_views(encoder, config)
    loader = DataLoader(_ViewsOf(images, transform), batch_size=config.batch_size, shuffle=True, drop_last=True)
    started, seen, step = time.perf_counter(), 0, 0
    while step < steps:
        for views in loader:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):
                loss = criterion(head(model(views[0])), head(model(views[1])))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.clip_grad > 0:  # the recipe's clipping, so both loops optimise the same way
                torch.nn.utils.clip_grad_norm_([*model.parameters(), *head.parameters()], config.clip_grad)
            optimizer.step()
            seen += views[0].shape[0]
            step += 1
            if step >= steps:
                break
    return seen / (time.perf_counter() - started)


def trainer_overhead(task: Task, root: Path, steps: int, reps: int) -> dict[str, float]:
    """Trainer vs bare-loop images per second for SimCLR, interleaved ``reps`` times; medians."""
    config = recipe("simclr", task, root / "overhead")
    images = unlabeled(task.train)
    steps_per_epoch = len(images) // config.pretrain.batch_size
    trainer_config = config.pretrain.model_copy(update={"epochs": -(-steps // steps_per_epoch)})
    ours, bare = [], []
    ours_cpu: list[Timed] = []
    bare_cpu: list[Timed] = []
    for _ in range(reps):
        folder = root / "overhead" / "trainer"
        shutil.rmtree(folder, ignore_errors=True)
        with timed() as span:
            result = pretrain(
                images, build_encoder(config), trainer_config, folder, stop_after_steps=steps, show_progress=False
            )
        ours.append(result.images_per_second)
        ours_cpu.append(span)
        with timed() as span:
            bare.append(bare_simclr_loop(config.pretrain, build_encoder(config), images, steps))
        bare_cpu.append(span)
    trainer_ips, bare_ips = statistics.median(ours), statistics.median(bare)
    return {
        "trainer_img_s": trainer_ips,
        "bare_img_s": bare_ips,
        "ratio": trainer_ips / bare_ips,
        # Both calls run the same steps over the same batch size, so CPU seconds compare per image as they stand.
        "trainer_cpu_s": median(ours_cpu).cpu,
        "bare_cpu_s": median(bare_cpu).cpu,
        "cpu_ratio": median(bare_cpu).cpu / max(median(ours_cpu).cpu, 1e-12),
        "steps": steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=120.0, help="seconds of pre-training per method")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--datasets", default="breastmnist,kermany")
    parser.add_argument("--overhead-steps", type=int, default=40)
    parser.add_argument("--overhead-reps", type=int, default=3)
    parser.add_argument("--output", type=Path, default=REPO / "runs/bench-ssl-methods")
    args = parser.parse_args()
    torch.manual_seed(0)
    builders = {"breastmnist": breastmnist, "kermany": kermany}
    tasks = [builders[name]() for name in args.datasets.split(",")]
    rows: list[Row] = []
    for task in tasks:
        rows.append(random_init_row(task, args.output / task.name / "random"))
        for method in args.methods.split(","):
            started = time.perf_counter()
            rows.append(run_method(method, task, args.budget, args.output))
            print(f"{task.name} {method}: {time.perf_counter() - started:.0f} s", flush=True)
    overhead = trainer_overhead(tasks[0], args.output, args.overhead_steps, args.overhead_reps)

    print(f"\nSSL methods at ~{args.budget:.0f} s of pre-training each (test split; kNN k=20, T=0.07)")
    print(
        f"{'dataset':12} {'method':12} {'epochs':>6} {'steps':>6} {'seconds':>8} {'img/s':>7} "
        f"{'linear AUROC':>12} {'vs random':>9} {'kNN acc':>8} {'vs random':>9}"
    )
    random_rows = {row.dataset: row for row in rows if row.method == "random-init"}
    for row in rows:
        base = random_rows[row.dataset]
        flag = "  (collapse warning)" if row.collapsed else ""
        print(
            f"{row.dataset:12} {row.method:12} {row.epochs:6d} {row.steps:6d} {row.seconds:8.0f} "
            f"{row.images_per_second:7.1f} {row.linear_auroc:12.3f} {row.linear_auroc - base.linear_auroc:+9.3f} "
            f"{row.knn_accuracy:8.3f} {row.knn_accuracy - base.knn_accuracy:+9.3f}{flag}"
        )
    print(
        f"\nTrainer vs bare loop (SimCLR, {tasks[0].name}, {overhead['steps']} steps, median of "
        f"{args.overhead_reps}): {overhead['trainer_img_s']:.1f} vs {overhead['bare_img_s']:.1f} img/s, "
        f"ratio wall {overhead['ratio']:.3f} (target >= 0.95), CPU {overhead['cpu_ratio']:.3f} "
        f"({overhead['trainer_cpu_s']:.1f} vs {overhead['bare_cpu_s']:.1f} CPU-s per call, set-up included)"
    )
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "results.json").write_text(
        json.dumps({"budget_s": args.budget, "rows": [asdict(r) for r in rows], "trainer_overhead": overhead}, indent=2)
    )


if __name__ == "__main__":
    main()
