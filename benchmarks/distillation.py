"""Distillation benchmark (issue 17): teacher, distilled student, SSL student at the same budget, random student.

On the Kermany chest X-rays at 64 px (grey), through medfoundry's own API:

1. the teacher: a ViT-S/8 at 64 px pre-trained with SimCLR on the unlabeled Kermany pool
   (``configs/pretrain/simclr_kermany_pool.yaml``, ``--teacher-minutes``), or any ``--teacher`` checkpoint;
2. the distilled student: ``vit_tiny_64`` trained with ``configs/pretrain/distill.yaml`` for ``--minutes``;
3. the SSL student: the same ``vit_tiny_64`` trained with SimCLR (the pool recipe) for the same ``--minutes``
   of wall-clock time (both runs take a ``max_minutes`` budget, so the teacher's forward passes count against
   the distilled student);
4. the random student: the same network at its random initial weights.

Every pre-training run sees the pool with every patient of the labelled 600-image subset removed. The four
encoders are evaluated through the one engine (``run_suite``): a linear probe at 10% and 100% of the subset's
training labels (``--seeds`` label subsets at 10%, 3 by default), test AUROC with patient-bootstrap CIs, and the
engine's paired differences with the distilled student as the baseline. Inference speed: images per second of
teacher and student on ``--threads`` CPU threads (2 by default), batch 64, on test images.

Targets (issue 17): the student keeps >= 95% of the teacher's AUROC at 100% labels, beats the SSL student (paired
CI excludes 0) and runs >= 3x faster per image.

    python benchmarks/distillation.py --tiny                        # smoke test: seconds of training
    python benchmarks/distillation.py --minutes 30 --teacher-minutes 60 --out runs/distillation
    python benchmarks/distillation.py --teacher runs/my-teacher/pretrain/encoder --minutes 30

``--tiny`` takes the same code path with tiny sizes: a ViT-Tiny teacher, a few seconds per run, a small pool,
few bootstrap draws. It writes ``distillation.json`` and prints the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from recipe_study import dataset_specs, in_memory, kermany_pool  # noqa: E402 - the study's task and pool

TEACHER = "teacher"
DISTILLED = "distilled-student"
SSL_STUDENT = "ssl-student"
RANDOM_STUDENT = "random-student"
FRACTIONS = (0.1, 1.0)
STUDENT_BACKBONE = "vit_tiny_64"
# ViT-S with 8 px patches: at 64 px the same 64 tokens as the student (there is no pre-trained ViT-S here).
TEACHER_BACKBONE = "vit_small_patch8_224"


def budget_overrides(minutes: float, args: argparse.Namespace) -> list[str]:
    """A wall-clock budget and the execution settings of every pre-training run."""
    return [
        "pretrain.epochs=null",
        "pretrain.max_steps=null",
        f"pretrain.max_minutes={minutes}",
        f"pretrain.threads={args.threads}",
        f"pretrain.num_workers={args.workers}",
        f"pretrain.batch_size={args.batch_size}",
        "pretrain.tensorboard=false",
        "pretrain.checkpoint_every_steps=1000000",
        "pretrain.monitor_every_steps=25",
    ]


def pool_images(task: Any, args: argparse.Namespace) -> tuple[Any, str]:
    """The unlabeled Kermany pool without any patient of the labelled subset (train, val and test alike)."""
    from medfoundry.bench.run import unlabeled

    images = kermany_pool(args.data_root, 64)
    subset_patients = set(task.train.patient_ids) | set(task.val.patient_ids) | set(task.test.patient_ids)
    keep = [i for i, p in enumerate(images.patient_ids) if p not in subset_patients]
    if args.pool_size is not None:
        keep = keep[: args.pool_size]
    if set(images.patient_ids[i] for i in keep) & subset_patients:
        raise RuntimeError("a patient of the evaluation subset is in the pre-training pool")
    note = f"pool {len(images)} images, {len(images) - len(keep)} left out, {len(keep)} pre-trained on"
    return in_memory(unlabeled(images.subset(keep, name="kermany-pool-minus-subset-patients")), args.threads), note


def pretrain_run(
    name: str, recipe: str, overrides: list[str], images: Any, args: argparse.Namespace
) -> tuple[Any, dict[str, Any]]:
    """One pre-training run through run_pretraining (resumed if its folder holds a state): config and summary."""
    from medfoundry.bench.run import run_pretraining
    from medfoundry.config import ExperimentConfig, load_config

    config = load_config(ExperimentConfig, ROOT / "configs" / "pretrain" / recipe, overrides)
    config.output_dir = args.out / name
    started = time.perf_counter()
    result = run_pretraining(config, images, resume=True, show_progress=False)
    if not result.finished:
        raise RuntimeError(f"{name}: pre-training stopped at step {result.steps} of {result.total_steps}")
    summary = {
        "recipe": f"configs/pretrain/{recipe}",
        "overrides": overrides,
        "backbone": config.model.backbone,
        "steps": result.steps,
        "seconds": round(time.perf_counter() - started, 1),
        "train_images_per_second": round(result.images_per_second, 1),
        "warnings": [w["message"] for w in result.warnings],
    }
    return result, summary


def inference_speed(folder: Path, images: Any, args: argparse.Namespace) -> float:
    """Images per second of one encoder's forward pass on ``args.threads`` CPU threads (batch 64)."""
    import numpy as np
    import torch

    from medfoundry.models.checkpoint import load_encoder

    torch.set_num_threads(args.threads)
    encoder = load_encoder(folder).eval()
    count = min(len(images), 64)
    # ImageSets load channels first: (N, C, H, W).
    x = encoder.normalize(torch.from_numpy(np.stack([images.load(i) for i in range(count)])))
    with torch.inference_mode():
        encoder(x)  # warm-up: allocation and kernel choice
        started, done = time.perf_counter(), 0
        while done < args.speed_images:
            encoder(x)
            done += count
        return done / (time.perf_counter() - started)


def evaluate(task_config: Any, task: Any, encoders: dict[str, Any], args: argparse.Namespace) -> Any:
    """The four encoders through the one engine: linear probe at 10% and 100% labels, paired differences."""
    from medfoundry.bench.engine import run_suite
    from medfoundry.config import AdaptConfig, ComparisonConfig, EmbedConfig, EvaluateConfig, SuiteConfig

    suite = SuiteConfig(
        name="distillation",
        output_dir=args.out / "suite",
        tasks=[task_config],
        encoders=list(encoders.values()),
        embed=EmbedConfig(batch_size=128),
        adapt=AdaptConfig(
            adapters=["linear"],
            label_fractions=list(FRACTIONS),
            seeds=list(range(args.seeds)),
            **({"selection_folds": 2, "linear_c_grid": [0.01, 1.0, 100.0]} if args.tiny else {}),
        ),  # fmt: skip
        evaluate=EvaluateConfig(n_bootstrap=args.n_bootstrap),
        comparisons=ComparisonConfig(
            baseline_encoder=DISTILLED, reference_adapter=None, n_bootstrap=max(100, args.n_bootstrap)
        ),
    )
    return run_suite(suite, show_progress=False, echo=lambda _: None, tasks={task.name: task})


def summarise(output: Any, metric: str) -> dict[str, Any]:
    """Mean AUROC per encoder and fraction, and the distilled student minus each other encoder (paired CIs)."""
    import numpy as np

    values: dict[str, dict[str, list[float]]] = {}
    for record in output.results.records:
        r = record.__dict__ if hasattr(record, "__dict__") else dict(record)
        if r["metric"] == metric and r["adapter"] == "linear":
            values.setdefault(r["model"], {}).setdefault(str(r["label_fraction"]), []).append(r["value"])
    auroc = {m: {f: float(np.mean(v)) for f, v in by.items()} for m, by in values.items()}
    differences: dict[str, dict[str, dict[str, float]]] = {}
    for c in output.results.metadata.get("comparisons", []):
        if c["model_b"] == DISTILLED and c["metric"] == metric:
            # The engine gives other minus baseline: turned round, so positive means the distilled student is better.
            differences.setdefault(c["model_a"], {})[str(c["label_fraction"])] = {
                "difference": -c["difference"],
                "ci_low": -c["ci_high"],
                "ci_high": -c["ci_low"],
            }
    return {"auroc": auroc, "distilled_minus": differences}


def verdict(summary: dict[str, Any], speed: dict[str, float]) -> dict[str, Any]:
    """The issue's three targets, each with its measured value."""
    full = str(FRACTIONS[-1])
    auroc, diffs = summary["auroc"], summary["distilled_minus"]
    retention = auroc[DISTILLED][full] / auroc[TEACHER][full] if auroc.get(TEACHER, {}).get(full) else float("nan")
    vs_ssl = diffs.get(SSL_STUDENT, {}).get(full, {})
    ratio = speed[DISTILLED] / speed[TEACHER]
    return {
        "retention_at_100": retention,
        "retention_target_met": retention >= 0.95,
        "beats_ssl_student_at_100": bool(vs_ssl and vs_ssl["ci_low"] > 0),
        "speedup": ratio,
        "speedup_target_met": ratio >= 3.0,
    }


def table(report: dict[str, Any]) -> str:
    from medfoundry.report.comparisons import difference_with_ci

    summary, speed = report["summary"], report["inference_images_per_second"]
    lines = [
        "| encoder | AUROC 10% | AUROC 100% | distilled − it, 10% | distilled − it, 100% | img/s |",
        "|---|---|---|---|---|---|",
    ]
    for name in (TEACHER, DISTILLED, SSL_STUDENT, RANDOM_STUDENT):
        cells = [f"{summary['auroc'].get(name, {}).get(str(f), float('nan')):.3f}" for f in FRACTIONS]
        for f in FRACTIONS:
            d = summary["distilled_minus"].get(name, {}).get(str(f))
            cells.append(difference_with_ci(d) if d else "")
        rate = speed.get(name)
        cells.append(f"{rate:.0f}" if rate else "")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    v = report["verdict"]
    lines.append("")
    lines.append(
        f"retention at 100% labels {v['retention_at_100']:.1%} (target >= 95%); beats the SSL student at 100%: "
        f"{v['beats_ssl_student_at_100']}; speed-up {v['speedup']:.1f}x on {report['threads']} threads (target >= 3x)"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import torch

    threads = torch.get_num_threads()
    try:
        return run(parse_args(argv))
    finally:
        torch.set_num_threads(threads)  # the run sets its own; a caller (a test) gets its setting back


def run(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import torch

    from medfoundry.bench.engine import load_task
    from medfoundry.bench.run import RANDOM_INIT
    from medfoundry.config import EncoderConfig, TaskConfig

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    task_config = TaskConfig.model_validate(dataset_specs(args.data_root)["kermany"]["task"])
    task = load_task(task_config)
    if args.task_stride > 1:
        # Every n-th case of each split: fewer cases to embed and probe, the splits still patient-disjoint.
        task = dataclasses.replace(
            task,
            **{
                role: task.split(role).subset(np.arange(0, len(task.split(role)), args.task_stride))
                for role in ("train", "val", "test")
            },
        )
    images, note = pool_images(task, args)
    runs: dict[str, dict[str, Any]] = {}

    teacher_dir = args.teacher
    if teacher_dir is None:
        overrides = [
            f"model.backbone={args.teacher_backbone}",
            "model.pool=token+avg",  # the recipe's network is a ResNet-18; the ViT teacher reads CLS + mean patch
            "pretrain.lr=0.0005",
            *budget_overrides(args.teacher_minutes, args),
        ]
        result, runs[TEACHER] = pretrain_run(TEACHER, "simclr_kermany_pool.yaml", overrides, images, args)
        teacher_dir = result.encoder_dir
    student = [f"model.backbone={STUDENT_BACKBONE}", "model.pool=token+avg", *budget_overrides(args.minutes, args)]
    distilled, runs[DISTILLED] = pretrain_run(
        DISTILLED,
        "distill.yaml",
        [*student, f"pretrain.distill.teacher={json.dumps(str(Path(teacher_dir).resolve()))}"],
        images,
        args,
    )
    if args.ssl_student is None:
        ssl, runs[SSL_STUDENT] = pretrain_run(SSL_STUDENT, "simclr_kermany_pool.yaml", student, images, args)
        ssl_dir = ssl.encoder_dir
    else:
        ssl_dir = args.ssl_student

    from medfoundry.config import ExperimentConfig, load_config

    student_model = load_config(ExperimentConfig, ROOT / "configs" / "pretrain" / "distill.yaml", student).model
    encoders = {
        TEACHER: EncoderConfig(name=TEACHER, checkpoint=Path(teacher_dir)),
        DISTILLED: EncoderConfig(name=DISTILLED, checkpoint=distilled.encoder_dir),
        SSL_STUDENT: EncoderConfig(name=SSL_STUDENT, checkpoint=Path(ssl_dir)),
        # The same network and seed as both students start from (bench/run.py's random-init baseline).
        RANDOM_STUDENT: EncoderConfig(name=RANDOM_STUDENT, model=student_model, seed=0, finetune=False),
    }
    assert RANDOM_INIT != RANDOM_STUDENT  # the engine's own name is left to `medfoundry run`
    output = evaluate(task_config, task, encoders, args)
    summary = summarise(output, task.metrics[0])
    speed = {
        name: inference_speed(folder, task.test, args)
        for name, folder in ((TEACHER, Path(teacher_dir)), (DISTILLED, distilled.encoder_dir))
    }
    report = {
        "tiny": args.tiny,
        "minutes": args.minutes,
        "teacher_minutes": None if args.teacher else args.teacher_minutes,
        "teacher": "given" if args.teacher else f"{args.teacher_backbone} SimCLR on the pool",
        "ssl_student": "given" if args.ssl_student else f"{STUDENT_BACKBONE} SimCLR on the pool",
        "threads": args.threads,
        "pool": note,
        "task": {"name": task.name, **{role: len(task.split(role)) for role in ("train", "val", "test")}},
        "metric": task.metrics[0],
        "runs": runs,
        "summary": summary,
        "inference_images_per_second": speed,
        "verdict": verdict(summary, speed),
        "seconds": round(time.perf_counter() - started, 1),
    }
    (args.out / "distillation.json").write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    print(f"written: {args.out / 'distillation.json'} ({report['seconds']} s)")
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="the same runs at tiny sizes, for a smoke test")
    p.add_argument("--minutes", type=float, default=30.0, help="wall-clock budget of each student's pre-training")
    p.add_argument("--teacher-minutes", type=float, default=60.0, help="the teacher's SimCLR budget")
    p.add_argument("--teacher", type=Path, default=None, help="a teacher checkpoint folder (skips its pre-training)")
    p.add_argument(
        "--ssl-student", type=Path, default=None,
        help="a finished SSL student checkpoint folder (skips its pre-training; give one of the same --minutes)",
    )  # fmt: skip
    p.add_argument("--teacher-backbone", default=None, help=f"the teacher's network (default {TEACHER_BACKBONE})")
    p.add_argument("--out", type=Path, default=Path("runs/distillation"))
    p.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--threads", type=int, default=2, help="torch threads for training and the speed measurement")
    p.add_argument("--workers", type=int, default=1, help="data loader workers in pre-training")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--pool-size", type=int, default=None, help="pre-train on the first N pool images only")
    p.add_argument("--n-bootstrap", type=int, default=1000)
    p.add_argument("--speed-images", type=int, default=1024, help="images timed per encoder")
    p.add_argument("--seeds", type=int, default=3, help="label-subset seeds at 10%% labels")
    p.add_argument("--task-stride", type=int, default=1, help="keep every n-th case of each task split")
    args = p.parse_args(argv)
    if args.tiny:
        # Sizes only: every stage runs as in the full benchmark.
        args.minutes = min(args.minutes, 0.03)
        args.teacher_minutes = min(args.teacher_minutes, 0.03)
        args.teacher_backbone = args.teacher_backbone or STUDENT_BACKBONE
        args.pool_size = args.pool_size or 48
        args.batch_size = min(args.batch_size, 16)
        args.workers = 0
        args.n_bootstrap = min(args.n_bootstrap, 100)
        args.speed_images = min(args.speed_images, 64)
        args.task_stride = max(args.task_stride, 4)
        args.seeds = 1
        if args.out == Path("runs/distillation"):
            args.out = Path("runs/distillation-tiny")
    args.teacher_backbone = args.teacher_backbone or TEACHER_BACKBONE
    return args


if __name__ == "__main__":
    main()
