"""Recipe study (issue 14, item 2): which SSL recipe to ship per domain and CPU budget, kept as a benchmark.

For each dataset x SSL recipe x budget it pre-trains through medfoundry's own API (a recipe from
configs/pretrain/*.yaml plus dotted overrides, ``run_pretraining``), then evaluates through the one engine
(``run_suite``): linear probe and kNN AUROC at 1%, 10% and 100% of the training labels (3 seeds), against the same
ViT with its random initial weights (a recipe with its own network, ``simclr-resnet18``: against that network's), with
the engine's paired bootstrap differences (results.json "comparisons").
One more cell (item 3) pre-trains SimCLR on the unlabelled Kermany pool (every patient of the 600-image subset
removed) and probes the patient-split subset, against random init and a ResNet-18 trained from scratch.

Budgets are in optimisation steps: the steps that about 5 and about 30 minutes give on 2 CPU cores, from the
throughput each method measured on 2 cores (benchmarks/ssl_methods.py, README "SSL methods at an equal budget"):
steps = budget seconds x images/s / batch 64. So the study measures quality at CPU budgets while it can run much
faster on a GPU. Every cell is printed, losers included, and written to JSON as soon as it finishes.

    python benchmarks/recipe_study.py --tiny --device cpu        # a smoke test: seconds on 2 CPU cores
    python benchmarks/recipe_study.py --device cuda --deadline 270 --parallel 4 --out runs/recipe_study
    python benchmarks/recipe_study.py --device cpu --budgets 5 --datasets breastmnist   # one row, hours on 2 cores

Cells run in priority order: the Kermany pool cell first, since it is the longest and runs beside the others.
Then, per dataset (BreastMNIST, Kermany, pathology), its random-init baseline and its recipes at 5 minutes, and
then the 30-minute budgets. ``--parallel`` cells run at a time, each in its own process, so that several small runs
share one GPU. A cell that would not finish before ``--deadline`` is not started. One still running at the
deadline is stopped and reported as such.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
KERMANY_PATIENT = r"^(person\d+|(?:NORMAL2-)?IM-\d+)[-_]"
BATCH = 64

# Pre-training throughput on 2 CPU cores, images per second (bf16 autocast, batch 64), as measured by
# benchmarks/ssl_methods.py (README, "SSL methods at an equal budget"): 28 px (BreastMNIST) and 64 px (Kermany).
# SimCLR on a ResNet-18: its measured ratio to ViT SimCLR (``--calibrate``: 1.46x at 28 px, 1.21x on the Kermany
# images and 1.23x on the pathology tiles at 64 px; 7 December 2026) times the ViT's figure.
CPU_IMAGES_PER_SECOND = {
    "28": {"simclr": 121, "mocov3": 101, "byol": 104, "dino": 61, "ibot": 56, "mae": 269, "simclr-resnet18": 177},
    "64": {"simclr": 81, "mocov3": 71, "byol": 67, "dino": 42, "ibot": 40, "mae": 199, "simclr-resnet18": 98},
}
BUDGET_MINUTES = (5, 30)

# Recipes: a YAML of configs/pretrain plus overrides. "dino"/"ibot" are the shipped recipes (1024 prototypes);
# the "-small" variants are the repairs for small data and short runs (issue 14): 256 prototypes through a
# 64-wide bottleneck, teacher temperature 0.05 warmed up from 0.04 over 30% of the run, a higher learning rate.
_SMALL_HEAD = ["out_dim=256", "bottleneck_dim=64", "teacher_temp=0.05", "warmup_teacher_temp=0.04"]
RECIPES: dict[str, tuple[str, list[str]]] = {
    "simclr": ("simclr.yaml", []),
    "mocov3": ("mocov3.yaml", []),
    "byol": ("byol.yaml", []),
    "mae": ("mae.yaml", []),
    "dino-small-sk": ("dino.yaml", [f"pretrain.dino.{o}" for o in _SMALL_HEAD] + ["pretrain.lr=0.001"]),
    "dino-small-center": (
        "dino.yaml",
        [f"pretrain.dino.{o}" for o in _SMALL_HEAD]
        + ["pretrain.dino.teacher_targets=centering", "pretrain.dino.koleo_weight=0.1", "pretrain.lr=0.001"],
    ),
    "ibot-small-sk": ("ibot.yaml", [f"pretrain.ibot.{o}" for o in _SMALL_HEAD] + ["pretrain.lr=0.001"]),
    "dino": ("dino.yaml", []),
    "ibot": ("ibot.yaml", []),
    # The same SimCLR on a ResNet-18 (timm, random weights, global average pool): a convolutional network's
    # locality prior against the ViT's, at the same wall-clock budget. Its random-init baseline is its own.
    "simclr-resnet18": ("simclr.yaml", ["model.backbone=resnet18", "model.pool=default"]),
}
# Teacher-temperature warm-up as a share of the run (the recipes count it in epochs).
TEACHER_WARMUP_SHARE = 0.3
LR_WARMUP_SHARE = 0.1


BASELINE = "random-init"


def method_of(recipe: str) -> str:
    return recipe.split("-")[0]


def backbone_of(recipe: str) -> str | None:
    """The backbone a recipe sets for itself (None: the dataset's ViT, whose random init the baseline cell holds)."""
    overrides = RECIPES.get(recipe, ("", []))[1]
    return next((o.split("=", 1)[1] for o in overrides if o.startswith("model.backbone=")), None)


def throughput_key(recipe: str) -> str:
    """The CPU_IMAGES_PER_SECOND entry of a recipe: its own where its network differs, else its method's."""
    return recipe if backbone_of(recipe) else method_of(recipe)


# ---------------------------------------------------------------------------------------------------- datasets
def dataset_specs(data_root: Path) -> dict[str, dict[str, Any]]:
    """Each dataset: its task (as a suite would give it), the model and view overrides, and its pixel size."""
    kermany_task = {
        "name": "kermany-pneumonia",
        "source": f"folder:{data_root / 'kermany_cxr_224_trainsubset'}",
        "options": {"image_size": 64, "channels": 1, "patient_regex": KERMANY_PATIENT},
        "test_fraction": 0.2,
        "val_fraction": 0.16,
    }
    model_64 = ["model.backbone=vit_tiny_64", "model.img_size=64", "model.pool=token+avg"]
    views_64 = ["pretrain.views.global_crop_size=64", "pretrain.views.local_crop_size=32"]
    return {
        "breastmnist": {
            "task": {"name": "breastmnist", "source": str(ROOT / "data/breastmnist/breastmnist.npz")},
            "overrides": ["model.pool=token+avg"],
            "px": "28",
        },
        "kermany": {
            "task": kermany_task,
            "overrides": [*model_64, "model.in_chans=1", *views_64, "pretrain.views.domain=radiology"],
            "px": "64",
        },
        # Osteosarcoma (TCIA): the only pathology tile set here with labels and patients (NCT-CRC has 9 tiles).
        # Split by patient as configs/suites/osteosarcoma.yaml: test Case-4, val P9, train Case-3 + Case-48.
        "osteosarcoma": {
            "task": {
                "name": "osteosarcoma",
                "source": f"csv:{data_root / 'osteosarcoma_tcia_tiles_60' / 'labels.csv'}",
                "options": {
                    "path_column": "file",
                    "label_column": "label_index",
                    "class_name_column": "label",
                    "patient_column": "source_image_id",
                    "patient_regex": r"^(Case-\d+|P\d+)-",
                    "patient_splits": {"test": ["Case-4"], "val": ["P9"]},
                    "crop_size": 224,
                    "image_size": 64,
                },
            },
            "overrides": [*model_64, "model.in_chans=3", *views_64, "pretrain.views.domain=pathology"],
            "px": "64",
        },
    }


def budget_steps(px: str, recipe: str, minutes: float) -> int:
    return max(1, round(minutes * 60 * CPU_IMAGES_PER_SECOND[px][throughput_key(recipe)] / BATCH))


def plan_cells(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The cells in priority order: the pool cell first (the longest: it starts while the BreastMNIST cells run
    beside it), then every dataset at the smaller budget, then the larger budget."""
    cells: list[dict[str, Any]] = []
    if args.pool:
        pool_minutes = 30  # item 3: pre-training of at most 30 minutes on 2 cores
        steps = args.tiny_steps if args.tiny else budget_steps("64", "simclr", pool_minutes)
        cells.append({"dataset": "kermany-pool", "recipe": "simclr", "minutes": pool_minutes, "steps": steps})
    specs = dataset_specs(args.data_root)
    for minutes in args.budgets:
        for dataset in args.datasets:
            if minutes == args.budgets[0] and any(backbone_of(r) is None for r in args.recipes):
                # Random init of the ViT once per dataset: the ViT recipe cells copy its embeddings and cells (reused
                # by the engine). A recipe with its own network evaluates its own random init in its cell.
                cells.append({"dataset": dataset, "recipe": BASELINE, "minutes": 0, "steps": 0})
            for recipe in args.recipes:
                steps = args.tiny_steps if args.tiny else budget_steps(specs[dataset]["px"], recipe, minutes)
                cells.append({"dataset": dataset, "recipe": recipe, "minutes": minutes, "steps": steps})
    return cells


def kermany_pool(data_root: Path, image_size: int) -> Any:
    """The unlabeled Kermany pool (``kermany_cxr_224_trainrest``) as one grey ImageSet, patients from file names."""
    from medfoundry.data.registry import load_dataset

    splits = load_dataset(
        f"folder:{data_root / 'kermany_cxr_224_trainrest'}",
        image_size=image_size,
        channels=1,
        patient_regex=KERMANY_PATIENT,
    )
    return splits["train"] if "train" in splits else next(iter(splits.values()))


# ---- one cell
def in_memory(images: Any, threads: int) -> Any:
    """The images read once into memory (pre-training reads each image many times)."""
    from medfoundry.data.sample import ArrayImageSet

    with ThreadPoolExecutor(max(1, threads)) as pool:
        arrays = list(pool.map(images.load, range(len(images))))
    return ArrayImageSet(images.name, images.source, np.stack(arrays), list(images.ids), list(images.patient_ids))


def supervised_baseline_on_gpu(device_name: str = "cuda") -> None:
    """Run the engine's from-scratch ResNet-18 on the GPU (medfoundry trains it on the CPU).

    Only the device changes: the network and its head move to CUDA, each batch follows, and the logits come back
    to the CPU (so the loss, the early stopping and the probabilities are computed where the engine expects them).
    """
    import torch

    from medfoundry.adapt import supervised

    if device_name == "cuda" and not torch.cuda.is_available():
        return
    device = torch.device(device_name)
    create = supervised.create_encoder

    def create_on_gpu(*a: Any, **k: Any) -> Any:
        return create(*a, **k).to(device)

    def logits_on_gpu(self: Any, x: Any) -> Any:
        if next(self.head.parameters()).device != device:
            self.head.to(device)  # in place: the optimiser keeps the same parameters
        return self.head(self.encoder(self.encoder.normalize(x.to(device)))).cpu()

    supervised.create_encoder = create_on_gpu
    supervised.SupervisedFromScratch._logits = logits_on_gpu


def run_cell(cell: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Pre-train one recipe, then evaluate it and its random initialisation through the engine."""
    import torch

    from medfoundry.bench.engine import load_task, run_suite
    from medfoundry.bench.run import RANDOM_INIT, run_pretraining, unlabeled
    from medfoundry.config import (
        AdaptConfig,
        ComparisonConfig,
        EmbedConfig,
        EncoderConfig,
        EvaluateConfig,
        ExperimentConfig,
        PretrainConfig,
        SuiteConfig,
        SupervisedBaselineConfig,
        TaskConfig,
        load_config,
    )

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    baseline_cell = cell["recipe"] == BASELINE
    specs = dataset_specs(args.data_root)
    pool_cell = cell["dataset"] == "kermany-pool"
    spec = specs["kermany" if pool_cell else cell["dataset"]]
    recipe_file, recipe_overrides = RECIPES["simclr" if baseline_cell else cell["recipe"]]
    recipe_path = ROOT / "configs" / "pretrain" / recipe_file
    out_dir = Path(cell["out_dir"])
    if pool_cell and not args.tiny:
        args.workers *= 2  # the longest cell: more loader workers (it starts first, beside the short ones)
    overrides = [*spec["overrides"], *recipe_overrides, *step_overrides(recipe_path, cell, spec, args)]
    recipe = load_config(ExperimentConfig, recipe_path, overrides)
    recipe.output_dir = out_dir
    task_config = TaskConfig.model_validate(spec["task"])
    task = load_task(task_config)

    note = ""
    if pool_cell:
        # The unlabelled pool minus every patient of the 600-image subset (train, val and test alike).
        pool_images = kermany_pool(args.data_root, 64)
        subset_patients = set(task.train.patient_ids) | set(task.val.patient_ids) | set(task.test.patient_ids)
        keep = [i for i, p in enumerate(pool_images.patient_ids) if p not in subset_patients]
        removed = len(pool_images) - len(keep)
        if args.tiny:
            keep = keep[: args.tiny_pool]
        assert not set(pool_images.patient_ids[i] for i in keep) & subset_patients
        images = unlabeled(pool_images.subset(keep, name="kermany-pool-minus-subset-patients"))
        note = (
            f"pool {len(pool_images)} images, {removed} of the subset's {len(subset_patients)} patients removed, "
            f"{len(keep)} pre-trained on"
        )
    else:
        images = unlabeled(task.train)  # the task's train split only: no val or test image is pre-trained on
    label = cell["recipe"]
    baseline_dir = Path(cell["baseline_dir"]) if cell.get("baseline_dir") else None
    result = None
    pretrain_seconds = 0.0
    if not baseline_cell:
        images = in_memory(images, args.threads)
        t0 = time.perf_counter()
        result = run_pretraining(recipe, images, resume=True, show_progress=False)
        pretrain_seconds = time.perf_counter() - t0
        if not result.finished:
            raise RuntimeError(f"pre-training stopped at step {result.steps} of {result.total_steps}")
        own_network = backbone_of(cell["recipe"]) is not None  # then the ViT baseline is not its random init
        if baseline_dir is not None and (baseline_dir / "DONE").is_file() and not own_network:
            try:
                copy_baseline(baseline_dir, out_dir)
            except OSError as error:  # then the engine computes the random-init cells itself
                print(f"random-init cells not copied: {error}", file=sys.stderr)
    encoders = [EncoderConfig(name=RANDOM_INIT, model=recipe.model, seed=recipe.seed, finetune=False)]
    if result is not None:
        encoders.insert(0, EncoderConfig(name=label, checkpoint=result.encoder_dir, pool=recipe.model.pool))
    fractions = [0.01, 0.1, 1.0]
    suite = SuiteConfig(
        name=f"recipe-study-{cell['dataset']}-{label}",
        output_dir=out_dir,
        tasks=[task_config],
        encoders=encoders,
        embed=EmbedConfig(batch_size=256, num_workers=min(args.workers, 4)),
        adapt=AdaptConfig(
            adapters=["linear", "knn"],
            label_fractions=fractions,
            seeds=[0, 1, 2],
            **({"selection_folds": 2, "linear_c_grid": [0.01, 1.0, 100.0]} if args.tiny else {}),
        ),  # fmt: skip
        supervised_baseline=(
            SupervisedBaselineConfig(backbone="resnet18", max_steps=args.tiny_steps if args.tiny else 200)
            if pool_cell
            else None
        ),
        evaluate=EvaluateConfig(n_bootstrap=args.n_bootstrap),
        comparisons=ComparisonConfig(
            baseline_encoder=None if baseline_cell else RANDOM_INIT,
            reference_adapter=None,
            n_bootstrap=max(100, args.n_bootstrap),
        ),
    )
    if pool_cell and args.device == "cuda":
        supervised_baseline_on_gpu()
    t0 = time.perf_counter()
    output = run_suite(suite, show_progress=False, echo=lambda _: None, tasks={task.name: task})
    eval_seconds = time.perf_counter() - t0
    if baseline_cell:
        (out_dir / "DONE").write_text("random-init cells finished\n")
    records = [r.__dict__ if hasattr(r, "__dict__") else dict(r) for r in output.results.records]
    metric = task.metrics[0]
    return {
        **{k: v for k, v in cell.items() if k != "out_dir"},
        "method": recipe.pretrain.method,
        "recipe_file": f"configs/pretrain/{recipe_file}",
        "overrides": overrides,
        "pretrain_config": recipe.pretrain.model_dump(mode="json"),
        "steps_done": result.steps if result else 0,
        "pretrain_images": len(images) if result else 0,
        "pretrain_seconds": round(pretrain_seconds, 1),
        "eval_seconds": round(eval_seconds, 1),
        "cell_seconds": round(time.perf_counter() - started, 1),
        "device_images_per_second": round(result.images_per_second, 1) if result else None,
        "collapsed": result.collapsed if result else None,
        "last_monitor": result.monitor[-1] if result and result.monitor else None,
        "metric": metric,
        "summary": summarise(records, metric),
        "comparisons": output.results.metadata.get("comparisons", []),
        "note": note,
        "n_test": len(task.test),
        "n_train": len(task.train),
        "has_max_steps": "max_steps" in PretrainConfig.model_fields,
    }


def copy_baseline(baseline_dir: Path, out_dir: Path) -> None:
    """The random-init embeddings, cells and predictions of the dataset's baseline cell, for the engine to reuse."""
    import shutil

    for path in baseline_dir.rglob("*"):
        rel = path.relative_to(baseline_dir)
        if path.is_file() and (
            rel.parts[:2] == ("embeddings", BASELINE)
            or (len(rel.parts) >= 3 and rel.parts[-1].startswith(BASELINE + "__"))
        ):
            target = out_dir / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)


def step_overrides(
    recipe_path: Path, cell: dict[str, Any], spec: dict[str, Any], args: argparse.Namespace
) -> list[str]:
    """The cell's budget in steps, warm-ups as shares of the run, and the execution settings.

    With the trainer's step budget (``pretrain.max_steps``) the step count is exact; an older trainer takes the
    epochs nearest to it (warm-ups then in whole epochs).
    """
    from medfoundry.config import PretrainConfig

    method = method_of(cell["recipe"])
    out = [
        f"pretrain.num_workers={args.workers}",
        "pretrain.tensorboard=false",
        "pretrain.checkpoint_every_steps=1000000",
        f"pretrain.monitor_every_steps={max(1, min(25, cell['steps']))}",
    ]
    if "max_steps" in PretrainConfig.model_fields:
        out += [
            "pretrain.epochs=null",
            f"pretrain.max_steps={max(1, cell['steps'])}",
            "pretrain.warmup_epochs=null",
            f"pretrain.warmup_fraction={LR_WARMUP_SHARE}",
            f"pretrain.threads={args.threads}",
        ]
        if method in ("dino", "ibot"):
            out += [
                f"pretrain.{method}.warmup_teacher_temp_epochs=null",
                f"pretrain.{method}.freeze_last_layer_epochs=null",
                f"pretrain.{method}.warmup_teacher_temp_fraction={TEACHER_WARMUP_SHARE}",
            ]
        return out
    steps_per_epoch = max(1, math.ceil((cell.get("n_pretrain") or 1) / BATCH))
    epochs = max(1, round(cell["steps"] / steps_per_epoch))
    out += [
        f"pretrain.epochs={epochs}",
        f"pretrain.warmup_epochs={max(1 if epochs > 1 else 0, round(LR_WARMUP_SHARE * epochs))}",
    ]
    if method in ("dino", "ibot"):
        out.append(f"pretrain.{method}.warmup_teacher_temp_epochs={max(1, round(TEACHER_WARMUP_SHARE * epochs))}")
    return out


def summarise(records: list[dict[str, Any]], metric: str) -> dict[str, dict[str, dict[str, float]]]:
    """mean, sd and n over seeds of the headline metric: summary[model][adapter][fraction]."""
    grouped: dict[str, dict[str, dict[str, list[float]]]] = {}
    for r in records:
        if r["metric"] != metric:
            continue
        grouped.setdefault(r["model"], {}).setdefault(r["adapter"], {}).setdefault(str(r["label_fraction"]), []).append(
            r["value"]
        )
    return {
        model: {
            adapter: {
                fraction: {"mean": float(np.mean(v)), "sd": float(np.std(v)), "n": len(v)}
                for fraction, v in by_fraction.items()
            }
            for adapter, by_fraction in by_adapter.items()
        }
        for model, by_adapter in grouped.items()
    }


# ---------------------------------------------------------------------------------------------------- scheduling
def count_pretrain_images(dataset: str, args: argparse.Namespace) -> int:
    """How many images a cell pre-trains on (for the epochs that give its steps), without pre-training."""
    from medfoundry.bench.engine import load_task
    from medfoundry.config import TaskConfig

    specs = dataset_specs(args.data_root)
    task = load_task(TaskConfig.model_validate(specs["kermany" if dataset == "kermany-pool" else dataset]["task"]))
    if dataset != "kermany-pool":
        return len(task.train)
    images = kermany_pool(args.data_root, 64)
    subset = set(task.train.patient_ids) | set(task.val.patient_ids) | set(task.test.patient_ids)
    n = sum(p not in subset for p in images.patient_ids)
    return min(n, args.tiny_pool) if args.tiny else n


class Scheduler:
    """Runs cells as child processes, ``parallel`` at a time, in order, within a global deadline."""

    def __init__(self, cells: list[dict[str, Any]], args: argparse.Namespace) -> None:
        self.cells, self.args = cells, args
        self.start = time.monotonic()
        self.results: list[dict[str, Any]] = []
        self.sec_per_step: dict[str, float] = {}  # per method, measured
        self.eval_seconds: dict[str, float] = {}  # per dataset, measured
        from medfoundry.config import PretrainConfig

        self.step_budget = "max_steps" in PretrainConfig.model_fields  # else epochs from the image count

    def remaining(self) -> float:
        return self.args.deadline - (time.monotonic() - self.start)

    def estimate(self, cell: dict[str, Any]) -> float:
        if cell["recipe"] == BASELINE:
            return 10 + self.eval_seconds.get(cell["dataset"], 30.0)
        method = throughput_key(cell["recipe"])
        per_step = self.sec_per_step.get(method, max(self.sec_per_step.values(), default=self.args.guess_sec_per_step))
        per_step *= 2.0 if cell["dataset"] != "breastmnist" else 1.0
        evaluation = self.eval_seconds.get(cell["dataset"], 30.0 if cell["dataset"] != "kermany-pool" else 60.0)
        return 10 + cell["steps"] * per_step + evaluation

    def log(self, text: str) -> None:
        line = f"[{time.monotonic() - self.start:6.1f}s] {text}"
        print(line, flush=True)
        with (self.args.out / "recipe_study.log").open("a") as f:
            f.write(line + "\n")

    def save(self) -> None:
        payload = {
            "study": "issue 14 item 2 recipe study",
            "device": self.args.device,
            "tiny": self.args.tiny,
            "budget_minutes": list(self.args.budgets),
            "cpu_images_per_second": CPU_IMAGES_PER_SECOND,
            "batch_size": BATCH,
            "deadline_s": self.args.deadline,
            "elapsed_s": round(time.monotonic() - self.start, 1),
            "cells": self.results,
        }
        path = self.args.out / "recipe_study.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(payload, indent=1, default=float))
        tmp.replace(path)
        if self.args.export is not None:  # a second copy (the device machine's $OUT), small files only
            self.args.export.mkdir(parents=True, exist_ok=True)
            for name in ("recipe_study.json", "recipe_study.log"):
                if (self.args.out / name).is_file():
                    (self.args.export / name).write_bytes((self.args.out / name).read_bytes())

    def run(self) -> None:
        pending = list(self.cells)
        running: dict[int, tuple[subprocess.Popen[bytes], dict[str, Any], float, Path]] = {}
        counts: dict[str, int] = {}
        while pending or running:
            while pending and len(running) < self.args.parallel:
                cell = pending[0]
                if not self.step_budget and cell["dataset"] not in counts:
                    counts[cell["dataset"]] = count_pretrain_images(cell["dataset"], self.args)
                cell["n_pretrain"] = counts.get(cell["dataset"])
                need = self.estimate(cell)
                if need > self.remaining():
                    pending.pop(0)
                    self.results.append(
                        {**cell, "status": f"skipped: needs ~{need:.0f}s, {self.remaining():.0f}s left"}
                    )
                    self.log(f"skip {cell['dataset']}/{cell['recipe']}/{cell['minutes']}min (~{need:.0f}s)")
                    self.save()
                    continue
                pending.pop(0)
                tag = f"{cell['dataset']}__{cell['recipe']}__{cell['minutes']}min"
                cell["out_dir"] = str(self.args.out / "cells" / tag)
                cell["baseline_dir"] = str(self.args.out / "cells" / f"{cell['dataset']}__{BASELINE}__0min")
                spec_path = self.args.out / "cells" / f"{tag}.cell.json"
                spec_path.parent.mkdir(parents=True, exist_ok=True)
                spec_path.write_text(json.dumps(cell))
                result_path = spec_path.with_suffix(".result.json")
                command = [sys.executable, str(Path(__file__).resolve()), "--run-cell", str(spec_path),
                           "--result", str(result_path), *self.args.child_args]  # fmt: skip
                env = dict(os.environ, OMP_NUM_THREADS=str(self.args.threads), PYTHONUNBUFFERED="1")
                if self.args.device == "cpu":
                    env["CUDA_VISIBLE_DEVICES"] = ""
                with (self.args.out / f"{tag}.stderr.log").open("wb") as err:
                    proc = subprocess.Popen(command, stdout=err, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)  # fmt: skip
                running[proc.pid] = (proc, cell, time.monotonic(), result_path)
                self.log(f"start {tag}: {cell['steps']} steps (est. {need:.0f}s, {self.remaining():.0f}s left)")
            time.sleep(0.5)
            for pid, (proc, cell, t_start, result_path) in list(running.items()):
                code = proc.poll()
                tag = f"{cell['dataset']}/{cell['recipe']}/{cell['minutes']}min"
                if code is None:
                    if self.remaining() < 0:
                        os.killpg(proc.pid, signal.SIGKILL)  # our own child's process group, by its id
                        proc.wait()
                        del running[pid]
                        self.results.append({**cell, "status": "stopped at the deadline"})
                        self.log(f"stopped {tag} at the deadline")
                        self.save()
                    continue
                del running[pid]
                if code == 0 and result_path.is_file():
                    result = json.loads(result_path.read_text())
                    result["status"] = "done"
                    self.results.append(result)
                    method = throughput_key(cell["recipe"])
                    if cell["recipe"] == BASELINE:
                        method = "_baseline"
                    scale = 1.0 if cell["dataset"] == "breastmnist" else 2.0
                    self.sec_per_step[method] = result["pretrain_seconds"] / max(1, result["steps_done"]) / scale
                    self.eval_seconds[cell["dataset"]] = result["eval_seconds"] + 5
                    self.log(f"done {tag} in {time.monotonic() - t_start:.0f}s "
                             f"(pretrain {result['pretrain_seconds']}s, eval {result['eval_seconds']}s)")  # fmt: skip
                else:
                    err = self.args.out / f"{tag.replace('/', '__')}.stderr.log"
                    tail = err.read_text(errors="replace")[-1500:] if err.is_file() else ""
                    self.results.append({**cell, "status": f"failed (exit {code})", "error_tail": tail})
                    self.log(f"FAILED {tag} (exit {code})")
                self.save()
        self.save()


# ---------------------------------------------------------------------------------------------------- the table
def fmt(stat: dict[str, float] | None) -> str:
    if not stat:
        return "  -  "
    return f"{stat['mean']:.3f}" + (f"±{stat['sd']:.3f}" if stat["n"] > 1 and stat["sd"] > 0 else "")


def table(results: list[dict[str, Any]]) -> str:
    """Markdown: every cell, losers included, with the paired difference against random init (and scratch)."""
    from medfoundry.report.comparisons import difference_with_ci

    lines = [
        "| data | budget | recipe | steps | probe | 1% | 10% | 100% | Δ vs random-init at 1% / 10% / 100% [95% CI] |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    random_rows: dict[str, list[str]] = {}
    skipped = []
    for cell in results:
        if cell.get("status") != "done":
            skipped.append(f"{cell['dataset']} / {cell['minutes']} min / {cell['recipe']}: {cell.get('status')}")
            continue
        name = cell["recipe"]
        summary = cell["summary"]
        data = cell["dataset"]
        if name == BASELINE:
            for adapter in ("linear", "knn"):
                baseline = summary.get(BASELINE, {}).get(adapter, {})
                random_rows[f"{data}/{adapter}"] = [
                    f"| {data} | 0 | random-init | 0 | {adapter} | {fmt(baseline.get('0.01'))} | "
                    f"{fmt(baseline.get('0.1'))} | {fmt(baseline.get('1.0'))} | |"
                ]
            continue
        for adapter in ("linear", "knn"):
            stats = summary.get(name, {}).get(adapter, {})
            diffs = []
            for fraction in ("0.01", "0.1", "1.0"):
                comp = next(
                    (c for c in cell["comparisons"] if c["model_a"] == name and c["adapter_a"] == adapter
                     and c["model_b"] == "random-init" and c["adapter_b"] == adapter
                     and str(c["label_fraction"]) == fraction),
                    None,
                )  # fmt: skip
                diffs.append(difference_with_ci(comp, star="positive"))
            flag = " (collapsed)" if cell.get("collapsed") else ""
            lines.append(
                f"| {data} | {cell['minutes']} min | {name}{flag} | {cell['steps_done']} | {adapter} | "
                f"{fmt(stats.get('0.01'))} | {fmt(stats.get('0.1'))} | {fmt(stats.get('1.0'))} | {' / '.join(diffs)} |"
            )
            baseline = summary.get("random-init", {}).get(adapter, {})
            network = backbone_of(name)
            random_rows.setdefault(f"{data}/{adapter}" + (f"/{network}" if network else ""), [
                f"| {data} | 0 | random-init{f' ({network})' if network else ''} | 0 | {adapter} | "
                f"{fmt(baseline.get('0.01'))} | {fmt(baseline.get('0.1'))} | {fmt(baseline.get('1.0'))} | |"
            ])  # fmt: skip
        for model in summary:
            if model.endswith("-scratch"):
                stats = summary[model].get("supervised", {})
                random_rows.setdefault(f"{data}/{model}", [
                    f"| {data} | n/a | {model} (supervised) | ≤200 | end to end | {fmt(stats.get('0.01'))} | "
                    f"{fmt(stats.get('0.1'))} | {fmt(stats.get('1.0'))} | |"
                ])  # fmt: skip
                diffs = []
                for adapter in ("linear", "knn"):
                    for fraction in ("0.01", "0.1", "1.0"):
                        comp = next(
                            (c for c in cell["comparisons"] if c["model_a"] == name and c["adapter_a"] == adapter
                             and c["model_b"] == model and str(c["label_fraction"]) == fraction),
                            None,
                        )  # fmt: skip
                        if comp is not None:
                            diffs.append(f"{adapter} {fraction}: {difference_with_ci(comp, star='positive')}")
                random_rows[f"{data}/{model}"].append(f"|  |  | {name} − {model} |  |  |  |  |  | {'; '.join(diffs)} |")
    lines += [row for rows in random_rows.values() for row in rows]
    out = "\n".join(lines)
    if skipped:
        out += "\n\nNot run:\n" + "\n".join(f"- {s}" for s in skipped)
    return (
        out
        + "\n\n* = the paired 95% CI excludes 0 (pre-trained better); [no CI] = a single test patient, nothing to"
        + " resample. AUROC on the test split, mean±sd over 3 seeds."
    )


# ---------------------------------------------------------------------------------------------------- calibration
def calibrate(args: argparse.Namespace, steps: int = 60, repeats: int = 2) -> None:
    """Images/s of each recipe against SimCLR on the ViT, interleaved in one run on each dataset's images.

    A recipe's step budget needs its CPU throughput; absolute images/s move with the machine's load, so the ratio to
    the calibrated ViT SimCLR (measured here, beside it) is what carries over: calibrated = ratio x that figure.
    """
    import statistics

    import torch

    from medfoundry.bench.engine import load_task
    from medfoundry.bench.run import run_pretraining, unlabeled
    from medfoundry.config import ExperimentConfig, TaskConfig, load_config

    torch.set_num_threads(args.threads)
    specs = dataset_specs(args.data_root)
    for dataset in args.datasets:
        spec = specs[dataset]
        images = in_memory(unlabeled(load_task(TaskConfig.model_validate(spec["task"])).train), args.threads)
        measured: dict[str, list[float]] = {}
        for repeat in range(repeats):
            for recipe in dict.fromkeys(["simclr", *args.recipes]):
                recipe_file, recipe_overrides = RECIPES[recipe]
                recipe_path = ROOT / "configs" / "pretrain" / recipe_file
                cell = {"recipe": recipe, "steps": steps}
                overrides = [*spec["overrides"], *recipe_overrides, *step_overrides(recipe_path, cell, spec, args),
                             "pretrain.monitor_every_steps=1000000"]  # fmt: skip
                config = load_config(ExperimentConfig, recipe_path, overrides)
                config.output_dir = args.out / "calibration" / f"{dataset}__{recipe}__{repeat}"
                result = run_pretraining(config, images, resume=False, show_progress=False)
                measured.setdefault(recipe, []).append(result.images_per_second)
        reference = statistics.median(measured["simclr"])
        calibrated = CPU_IMAGES_PER_SECOND[spec["px"]]["simclr"]
        for recipe, values in measured.items():
            ratio = statistics.median(values) / reference
            print(
                f"{dataset} ({spec['px']} px) {recipe}: {statistics.median(values):.1f} img/s here, "
                f"{ratio:.2f}x ViT SimCLR -> {ratio * calibrated:.0f} img/s at the calibrated {calibrated}",
                flush=True,
            )


# ---------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="2 datasets x 2 recipes x a few steps, for a smoke test")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--out", type=Path, default=Path("runs/recipe_study"))
    p.add_argument("--export", type=Path, default=None, help="also copy recipe_study.json/.log/.md here")
    p.add_argument("--data-root", type=Path, default=None, help="shared data folder (default ../shared/data)")
    p.add_argument("--datasets", default="breastmnist,kermany,osteosarcoma")
    p.add_argument("--recipes", default=",".join(RECIPES))
    p.add_argument("--budgets", default="5,30", help="CPU minutes, comma-separated")
    p.add_argument("--no-pool", dest="pool", action="store_false", help="leave out the Kermany pool cell")
    p.add_argument("--deadline", type=float, default=1e9, help="seconds from start; later cells are skipped")
    p.add_argument("--parallel", type=int, default=1, help="cells at a time (processes)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per cell")
    p.add_argument("--workers", type=int, default=None, help="data loader workers per cell")
    p.add_argument("--n-bootstrap", type=int, default=1000)
    p.add_argument("--guess-sec-per-step", type=float, default=0.03, help="step time assumed before one is measured")
    p.add_argument("--tiny-steps", type=int, default=3)
    p.add_argument("--tiny-pool", type=int, default=128)
    p.add_argument("--calibrate", action="store_true", help="measure each recipe's images/s against ViT SimCLR")
    p.add_argument("--run-cell", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.child_args = [a for a in (argv if argv is not None else sys.argv[1:])]
    if args.data_root is None:
        shared = ROOT.parent / "shared" / "data"
        args.data_root = shared if shared.is_dir() else ROOT / ".gpucheck_data" / "data"
    args.data_root = args.data_root.resolve()
    if args.tiny:
        args.datasets, args.recipes = "breastmnist,kermany", "simclr,dino-small-sk"
        args.budgets, args.n_bootstrap = "5", min(args.n_bootstrap, 100)
    args.datasets = [d for d in args.datasets.split(",") if d]
    args.recipes = [r for r in args.recipes.split(",") if r]
    args.budgets = [float(b) if "." in b else int(b) for b in args.budgets.split(",") if b]
    cores = os.cpu_count() or 2
    per_cell = max(1, cores // max(1, args.parallel))
    args.threads = args.threads or max(1, min(per_cell, 4))
    args.workers = args.workers if args.workers is not None else (0 if args.tiny else max(0, per_cell - 1))
    unknown = [r for r in args.recipes if r not in RECIPES]
    if unknown:
        p.error(f"unknown recipes {unknown}; known: {list(RECIPES)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.run_cell is not None:  # a child: one cell
        cell = json.loads(args.run_cell.read_text())
        result = run_cell(cell, args)
        args.result.write_text(json.dumps(result, default=float))
        return
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda but no CUDA device is visible")
    args.out.mkdir(parents=True, exist_ok=True)
    args.out = args.out.resolve()
    if args.calibrate:
        calibrate(args)
        return
    cells = plan_cells(args)
    scheduler = Scheduler(cells, args)
    scheduler.log(
        f"{len(cells)} cells on {args.device}, {args.parallel} at a time, {args.threads} threads and {args.workers} "
        f"loader workers each, deadline {args.deadline:.0f}s; data from {args.data_root}"
    )
    for cell in cells:
        scheduler.log(f"  planned {cell['dataset']}/{cell['recipe']}/{cell['minutes']}min: {cell['steps']} steps")
    scheduler.run()
    text = table(scheduler.results)
    (args.out / "recipe_study.md").write_text(text + "\n")
    if args.export is not None:
        (args.export / "recipe_study.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
