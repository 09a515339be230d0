"""The one evaluation engine: tasks x encoders x adapters x label fractions x seeds, resumable, as one Python call.

``medfoundry eval suite.yaml``, ``medfoundry run recipe.yaml`` (pre-training, then a one-task suite) and
``medfoundry probe`` all end here, so the same inputs give the same numbers whichever door a user takes.

Layout of ``output_dir``::

    encoders/<encoder>/           pre-training state and exported encoder (recipe encoders only)
    embeddings/<encoder>/<task>/  one HDF5 per split, keyed by the encoder's weights and the images
    tasks/<task>/cells/           one JSON per finished cell (its records and a fingerprint of its inputs)
    tasks/<task>/predictions/     per-case test predictions of every cell (for ``medfoundry compare``)
    results.json, report.html

Every stage reuses what is already there when its inputs are unchanged, so a suite killed midway picks up at the
first unfinished cell. Embeddings are computed once per (encoder, task) and shared by every probe, fraction and seed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from medfoundry.bench.kinds import TASK_KINDS, BenchTask, EngineContext, kind_for
from medfoundry.bench.tasks import Task
from medfoundry.config import EncoderConfig, ExperimentConfig, SuiteConfig, TaskConfig, dump_config, load_config
from medfoundry.errors import MedfoundryError
from medfoundry.evaluate.cells import CellStore, evaluate_cell
from medfoundry.evaluate.results import ResultRecord, ResultsFile, run_metadata, write_results
from medfoundry.io_utils import hash_json, output_folder
from medfoundry.models.backbones import Encoder, create_encoder, encoder_from_config
from medfoundry.models.checkpoint import load_encoder, load_encoder_or_build
from medfoundry.models.features import Embeddings, embed
from medfoundry.report import format_summary_text, render_report, summarise_table

Echo = Callable[[str], None]
# The one "encoder" of a task given as feature files: its features were extracted before, by whatever model.
PRECOMPUTED = EncoderConfig(name="features", backbone="precomputed", finetune=False)


@dataclass
class SuiteOutput:
    output_dir: Path
    results_path: Path
    report_path: Path
    results: ResultsFile
    cells_computed: int
    cells_reused: int
    durations: dict[str, float]


def load_task(config: TaskConfig) -> BenchTask:
    """Open, split and check one task as its kind does (the same for run, eval and probe)."""
    return kind_for(config).load(config)


def load_tasks(config: SuiteConfig) -> dict[str, BenchTask]:
    return {spec.name: load_task(spec) for spec in config.tasks}


def prepare_encoder(
    config: SuiteConfig, spec: EncoderConfig, tasks: dict[str, BenchTask], show_progress: bool, echo: Echo
) -> Encoder:
    """Load, build or pre-train (once; resumed when interrupted) the encoder ``spec`` names."""
    if spec.checkpoint is not None:
        if spec.checkpoint.is_dir():
            return load_encoder(spec.checkpoint, pool=spec.pool)
        # A public model from local weights ("public:NAME:PATH") or a 2.5D wrapping ("2.5d:..."): its own pool.
        return load_encoder_or_build(str(spec.checkpoint), spec.in_chans, spec.img_size, spec.seed)
    if spec.backbone is not None:
        return create_encoder(
            spec.backbone, in_chans=spec.in_chans, img_size=spec.img_size, pool=spec.pool or "default", seed=spec.seed
        )
    if spec.model is not None:
        encoder = encoder_from_config(spec.model, spec.seed)
        encoder.pool = spec.pool or spec.model.pool
        return encoder
    assert spec.recipe is not None  # the config validator guarantees exactly one source
    from medfoundry.bench.run import evaluation_patients, run_pretraining, unlabeled  # the run's first stage

    recipe = load_config(ExperimentConfig, spec.recipe, spec.overrides)
    pool = spec.pool or recipe.model.pool
    if spec.untrained:
        encoder = encoder_from_config(recipe.model, recipe.seed)
        encoder.pool = pool
        return encoder
    recipe.output_dir = config.output_dir / "encoders" / spec.name
    images = None
    if spec.pretrain_task is not None:
        source = tasks[spec.pretrain_task]
        if not isinstance(source, Task) or source.precomputed:
            raise MedfoundryError(f"encoder '{spec.name}': pretrain_task '{spec.pretrain_task}' holds no images")
        images = unlabeled(source.train)
        echo(f"  pre-training {spec.name} ({recipe.pretrain.method}) on {spec.pretrain_task}'s train split")
    else:
        echo(f"  pre-training {spec.name} ({recipe.pretrain.method}) on the recipe's data")
    held_out = evaluation_patients([t for t in tasks.values() if isinstance(t, Task) and not t.precomputed])
    result = run_pretraining(recipe, images, resume=True, show_progress=show_progress, held_out=held_out)
    if not result.finished:
        raise MedfoundryError(
            f"pre-training of encoder '{spec.name}' stopped at step {result.steps} of {result.total_steps}",
            result.output_dir,
        )
    return load_encoder(result.encoder_dir, pool=pool)


def _warn_old_layout(output_dir: Path, echo: Echo) -> None:
    # `medfoundry run` before the one engine kept cells/, predictions/ and embeddings/<model>/<split>.h5 at the top.
    if (output_dir / "cells").is_dir() or (output_dir / "predictions").is_dir():
        echo(
            f"note: {output_dir} holds cells from an older medfoundry layout (cells/ at the top); they are not "
            "reused, every cell is recomputed under tasks/<task>/"
        )


class _Embedder:
    """Embeds each (encoder, task) once; precomputed feature tasks are passed through as they are."""

    def __init__(self, config: SuiteConfig, echo: Echo, durations: dict[str, float]) -> None:
        self.config, self.echo, self.durations = config, echo, durations

    def __call__(self, name: str, encoder: Encoder, task: Task) -> dict[str, Embeddings]:
        if task.precomputed:
            return {
                role: Embeddings(
                    images.images,
                    list(images.ids),
                    list(images.patient_ids),
                    images.labels,
                    images.source,
                    True,  # type: ignore[attr-defined]
                )
                for role, images in (("train", task.train), ("val", task.val), ("test", task.test))
            }
        started = time.perf_counter()
        folder = self.config.output_dir / "embeddings" / name / task.name
        features = {
            role: embed(
                encoder, images, folder / f"{role}.h5", self.config.embed.batch_size, self.config.embed.num_workers
            )
            for role, images in (("train", task.train), ("val", task.val), ("test", task.test))
        }
        self.durations[f"{task.name}/embed/{name}"] = time.perf_counter() - started
        reused = all(f.reused for f in features.values())
        self.echo(f"[{task.name}] {name}: embeddings {'reused' if reused else 'computed'}")
        return features


# Below this many test patients a patient bootstrap has too few units to resample for its interval to mean much.
MIN_TEST_PATIENTS = 5


def few_test_patients_warnings(task: BenchTask) -> list[str]:
    """A line when the test split has so few patients that every confidence interval is degenerate or too narrow."""
    test = getattr(task, "test", None)
    patients = getattr(test, "patient_ids", None)
    if patients is None or len(patients) == 0:
        return []
    n = len(set(map(str, patients)))
    if n >= MIN_TEST_PATIENTS:
        return []
    effect = "equals its point estimate" if n == 1 else "is too narrow to trust"
    return [
        f"{task.name}: the test split holds {n} patient(s); the patient bootstrap resamples patients, so every "
        f"confidence interval {effect}: read the numbers as about these patients only, or move more patients "
        f"into the test split"
    ]


def task_entry(task: BenchTask, warnings: list[str]) -> dict[str, Any]:
    """The task's metadata in results.json, with its warnings when it has any."""
    return {**task.metadata(), **({"warnings": warnings} if warnings else {})}


def run_suite(
    config: SuiteConfig,
    show_progress: bool = True,
    echo: Echo = print,
    metadata: dict[str, Any] | None = None,
    title: str | None = None,
    tasks: dict[str, BenchTask] | None = None,
) -> SuiteOutput:
    """Run every cell of the suite (reusing finished ones) and write results.json and report.html.

    ``metadata`` is added to results.json (``run`` adds its pre-training summary); ``title`` heads the report;
    ``tasks`` are the suite's tasks already loaded (``run`` loads its task before pre-training).
    """
    with output_folder(config.output_dir, f"medfoundry eval {config.name}"):
        return _run_suite(config, show_progress, echo, metadata, title, tasks)


def _run_suite(
    config: SuiteConfig,
    show_progress: bool,
    echo: Echo,
    metadata: dict[str, Any] | None,
    title: str | None,
    tasks: dict[str, BenchTask] | None,
) -> SuiteOutput:
    torch.manual_seed(0)
    _warn_old_layout(config.output_dir, echo)
    started = time.perf_counter()
    durations: dict[str, float] = {}
    tasks = tasks if tasks is not None else load_tasks(config)
    needs_encoder = [name for name, task in tasks.items() if not task.precomputed]
    if needs_encoder and not config.encoders:
        raise MedfoundryError(f"task(s) {needs_encoder} hold images: the suite needs at least one encoder")
    task_warnings = {name: few_test_patients_warnings(task) for name, task in tasks.items()}
    for task in tasks.values():
        echo(f"task {task.describe()}")
        for warning in task_warnings[task.name]:
            echo(f"  ⚠ {warning}")
        skipped = TASK_KINDS.get(task.kind).skipped_adapters(list(config.adapt.adapters))
        if skipped:
            echo(f"  {', '.join(skipped)} skipped on {task.name}: prototypes need one class per case")
    encoders: dict[str, Encoder] = {}
    for spec in config.encoders:
        if all(tasks[name].precomputed for name in (spec.tasks or tasks)):
            continue  # features given as files: no encoder runs
        t0 = time.perf_counter()
        echo(f"encoder {spec.name}")
        encoders[spec.name] = prepare_encoder(config, spec, tasks, show_progress, echo)
        durations[f"encoder/{spec.name}"] = time.perf_counter() - t0

    ctx = EngineContext(config, echo, _Embedder(config, echo, durations), durations)
    records: list[ResultRecord] = []
    comparisons: list[dict[str, Any]] = []
    computed = reused = 0
    evaluate_settings = config.evaluate.model_dump(mode="json")
    for task in tasks.values():
        kind = TASK_KINDS.get(task.kind)
        store = CellStore(config.output_dir / "tasks" / task.name)
        scorer = kind.scorer(task, config.evaluate)
        data_hash = task.fingerprint()
        task_started = time.perf_counter()
        task_records: list[ResultRecord] = []
        groups = [(spec.name, kind.encoder_cells(ctx, task, spec, encoders.get(spec.name))) for spec in config.encoders
                  if spec.tasks is None or task.name in spec.tasks]  # fmt: skip
        if task.precomputed:
            groups = [("features", kind.encoder_cells(ctx, task, PRECOMPUTED, None))]
        groups.append(("baselines", kind.baseline_cells(ctx, task)))
        for group, cells in groups:
            t0 = time.perf_counter()
            n_before = computed + reused
            for cell in cells:
                cell_records, was_reused = evaluate_cell(
                    store, cell.key, task.name, hash_json([data_hash, *cell.inputs]), cell.compute, scorer,
                    evaluate_settings,
                )  # fmt: skip
                task_records += cell_records
                reused += was_reused
                computed += not was_reused
            if computed + reused > n_before:
                durations[f"{task.name}/cells/{group}"] = time.perf_counter() - t0
                echo(f"[{task.name}] {group}: {computed} cells computed, {reused} reused so far")
        comparisons += kind.comparisons(ctx, task, task_records)
        durations[f"task/{task.name}"] = time.perf_counter() - task_started
        records += task_records
    durations["total"] = time.perf_counter() - started

    results = ResultsFile(
        records=records,
        metadata=run_metadata(
            config=dump_config(config),
            durations=durations,
            dataset=config.name,
            primary_metric={task.name: task.metrics[0] for task in tasks.values()},
            tasks={name: task_entry(task, task_warnings[name]) for name, task in tasks.items()},
            comparisons=comparisons,
            cells={"computed": computed, "reused": reused},
            **(metadata or {}),
        ),
    )
    results_path = write_results(config.output_dir / "results.json", results)
    report_path = render_report(
        results, config.output_dir / "report.html", title=title or f"medfoundry suite: {config.name}"
    )
    echo(format_summary_text(summarise_table(results)))
    return SuiteOutput(config.output_dir, results_path, report_path, results, computed, reused, durations)
