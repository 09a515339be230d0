"""Continued pre-training (issue 14, item 5): does starting SSL from an encoder pre-trained on another data set beat
starting from random weights, at the same budget on the target data?

Stage A pre-trains SimCLR on one unlabelled data set (the Kermany chest X-ray pool, at the target's 28 px and one
channel). Stage B pre-trains on the target's unlabelled train images (BreastMNIST ultrasound) twice, with the same
recipe, seed and step budget: once continuing from stage A's encoder (``pretrain.init_from``, fresh heads), once from
random weights. A fourth encoder is stage A's alone (no target images) and a fifth the random initialisation itself.
All five are evaluated through the one engine (``run_suite``): linear probe and kNN AUROC at 1%, 10% and 100% of the
target's labels (3 seeds at the low fractions), with paired patient-bootstrap differences against the
random-start stage-B encoder, so the comparison that matters is "continued" against "target only".

    python benchmarks/continued_pretraining.py --tiny                    # a smoke test: about a minute
    python benchmarks/continued_pretraining.py --out runs/continued      # the measurement: about 20 min on 2 cores

Every number goes to OUT/continued_pretraining.json and a table on stdout; the suite's report.html is in OUT/suite.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from recipe_study import in_memory, kermany_pool, summarise  # noqa: E402  (beside this script)

RECIPE = ROOT / "configs" / "demo" / "breastmnist_simclr.yaml"
# The network docs/pretraining.md's figures were measured with; the demo itself now trains a ResNet-18.
MODEL = ["model.backbone=vit_tiny_28", "model.pool=token+avg"]
CONTINUED, TARGET_ONLY, SOURCE_ONLY = "continued-pool-then-breastmnist", "breastmnist-only", "pool-only"


def pretrain_stage(
    name: str, out: Path, images: Any, steps: int, args: argparse.Namespace, init_from: Path | None = None
) -> tuple[Path, dict[str, Any]]:
    """One SimCLR run of the demo recipe at ``steps`` steps; the encoder folder and what the run measured."""
    from medfoundry.bench.run import run_pretraining
    from medfoundry.config import ExperimentConfig, load_config

    overrides = [
        *MODEL,
        f"pretrain.max_steps={steps}",
        f"pretrain.threads={args.threads}",
        "pretrain.num_workers=0",
        "pretrain.tensorboard=false",
        f"pretrain.monitor_every_steps={max(1, min(25, steps))}",
    ]
    if init_from is not None:
        overrides.append(f"pretrain.init_from={init_from}")
    recipe = load_config(ExperimentConfig, RECIPE, overrides)
    recipe.output_dir = out / name
    started = time.perf_counter()
    result = run_pretraining(recipe, images, resume=True, show_progress=False)
    if not result.finished:
        raise RuntimeError(f"{name}: pre-training stopped at step {result.steps} of {result.total_steps}")
    return Path(result.encoder_dir), {
        "steps": result.steps,
        "images": len(images),
        "seconds": round(time.perf_counter() - started, 1),
        "collapsed": result.collapsed,
        "init_from": init_from.name if init_from else None,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "continued_pretraining")
    parser.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--source-steps", type=int, default=600, help="stage A steps on the pool")
    parser.add_argument("--target-steps", type=int, default=300, help="stage B steps on the target, both starts")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n-bootstrap", type=int, default=1000)
    parser.add_argument("--tiny", action="store_true", help="a smoke test: a few steps, 200 pool images")
    args = parser.parse_args(argv)
    if args.tiny:
        args.source_steps, args.target_steps, args.n_bootstrap = 3, 3, 50

    import torch

    from medfoundry.bench.engine import load_task, run_suite
    from medfoundry.bench.run import RANDOM_INIT, unlabeled
    from medfoundry.config import (
        AdaptConfig,
        ComparisonConfig,
        EmbedConfig,
        EncoderConfig,
        EvaluateConfig,
        ExperimentConfig,
        SuiteConfig,
        TaskConfig,
        load_config,
    )

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    task_config = TaskConfig(name="breastmnist", source=str(ROOT / "data" / "breastmnist" / "breastmnist.npz"))
    task = load_task(task_config)
    pool = kermany_pool(args.data_root, 28)
    if args.tiny:
        pool = pool.subset(list(range(200)), name="kermany-pool-tiny")
    pool_images = in_memory(unlabeled(pool), args.threads)
    target_images = unlabeled(task.train)  # the target's train split only: no val or test image is pre-trained on

    stages: dict[str, dict[str, Any]] = {}
    source_dir, stages[SOURCE_ONLY] = pretrain_stage("pool", args.out, pool_images, args.source_steps, args)
    continued_dir, stages[CONTINUED] = pretrain_stage(
        "continued", args.out, target_images, args.target_steps, args, init_from=source_dir
    )
    target_dir, stages[TARGET_ONLY] = pretrain_stage("target-only", args.out, target_images, args.target_steps, args)

    model = load_config(ExperimentConfig, RECIPE, MODEL).model
    suite = SuiteConfig(
        name="continued-pretraining",
        output_dir=args.out / "suite",
        tasks=[task_config],
        encoders=[
            EncoderConfig(name=CONTINUED, checkpoint=continued_dir, pool=model.pool),
            EncoderConfig(name=TARGET_ONLY, checkpoint=target_dir, pool=model.pool),
            EncoderConfig(name=SOURCE_ONLY, checkpoint=source_dir, pool=model.pool),
            EncoderConfig(name=RANDOM_INIT, model=model, seed=0, finetune=False),
        ],
        embed=EmbedConfig(batch_size=256, num_workers=0),
        adapt=AdaptConfig(
            adapters=["linear", "knn"],
            label_fractions=[0.01, 0.1, 1.0],
            seeds=[0, 1, 2],
            **({"selection_folds": 2, "linear_c_grid": [0.01, 1.0, 100.0]} if args.tiny else {}),
        ),  # fmt: skip
        evaluate=EvaluateConfig(n_bootstrap=args.n_bootstrap),
        comparisons=ComparisonConfig(
            baseline_encoder=TARGET_ONLY, reference_adapter=None, n_bootstrap=max(100, args.n_bootstrap)
        ),
    )
    started = time.perf_counter()
    output = run_suite(suite, show_progress=False, echo=lambda _: None, tasks={task.name: task})
    records = [r.__dict__ if hasattr(r, "__dict__") else dict(r) for r in output.results.records]
    metric = task.metrics[0]
    result = {
        "recipe": str(RECIPE.relative_to(ROOT)),
        "stages": stages,
        "eval_seconds": round(time.perf_counter() - started, 1),
        "metric": metric,
        "summary": summarise(records, metric),
        "comparisons": output.results.metadata.get("comparisons", []),
    }
    (args.out / "continued_pretraining.json").write_text(json.dumps(result, indent=2, default=str))
    print(table(result))


def table(result: dict[str, Any]) -> str:
    """Markdown: mean AUROC per encoder, adapter and label fraction, then each paired difference to target-only."""
    from medfoundry.report.comparisons import difference_with_ci

    lines = ["| encoder | adapter | 1% | 10% | 100% |", "|---|---|---|---|---|"]
    for model, adapters in result["summary"].items():
        for adapter, fractions in adapters.items():
            cells = [f"{fractions[f]['mean']:.3f}" if f in fractions else "" for f in ("0.01", "0.1", "1.0")]
            lines.append(f"| {model} | {adapter} | " + " | ".join(cells) + " |")
    lines += ["", "Paired differences against breastmnist-only (CI excludes 0: *):"]
    for c in result["comparisons"]:
        if (
            c.get("model_b") != TARGET_ONLY
            or c.get("adapter_a") != c.get("adapter_b")
            or c.get("metric")
            not in (
                None,
                result["metric"],
            )
        ):
            continue
        lines.append(
            f"- {c['model_a']} + {c['adapter_a']} at {float(c['label_fraction']):.0%}: {difference_with_ci(c)}"
        )
    for name, stage in result["stages"].items():
        lines.append(f"- stage {name}: {stage['steps']} steps on {stage['images']} images, {stage['seconds']} s")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
