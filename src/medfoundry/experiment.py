"""The spine as one Python call: SSL pre-training, embeddings, adapters, baselines, results, report.

Each stage writes into ``output_dir`` and is skipped or resumed when its output is already there:
``pretrain/`` (training state and the encoder folder), ``embeddings/<model>/<split>.h5`` (hash-keyed cache),
``cells/`` (one JSON per finished adapter cell), ``results.json`` and ``report.html``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import medfoundry.ssl.methods  # noqa: F401  (registers the methods)
from medfoundry.adapt.embed import Embeddings, embed
from medfoundry.adapt.finetune import FineTuner
from medfoundry.adapt.registry import create_adapter
from medfoundry.adapt.supervised import SupervisedFromScratch
from medfoundry.config import ExperimentConfig, dump_config
from medfoundry.data.mixture import MixedImageSet, MixtureSource
from medfoundry.data.registry import load_dataset
from medfoundry.data.sample import ImageSet, Splits
from medfoundry.data.splits import label_fraction_indices
from medfoundry.errors import DataError, MedfoundryError
from medfoundry.evaluate.cells import CellKey, CellOutput, CellStore, evaluate_cell
from medfoundry.evaluate.report import format_summary_text, render_report, summarise_table
from medfoundry.evaluate.results import ResultRecord, ResultsFile, run_metadata, write_results
from medfoundry.io_utils import ensure_writable_dir, hash_json
from medfoundry.models.backbones import Encoder, encoder_from_config, resolve_backbone
from medfoundry.models.checkpoint import load_encoder, weights_hash
from medfoundry.ssl.trainer import PretrainResult, pretrain

log = logging.getLogger("medfoundry.experiment")


@dataclass
class ExperimentOutput:
    output_dir: Path
    results_path: Path
    report_path: Path
    results: ResultsFile
    durations: dict[str, float] = field(default_factory=dict)


def _labelled(images: ImageSet, split: str) -> np.ndarray:
    if images.labels is None:
        raise DataError(
            f"split '{split}' has no labels; adaptation needs labelled train, val and test splits",
            images.source,
        )
    return np.asarray(images.labels)


def load_splits(config: ExperimentConfig) -> Splits:
    splits = load_dataset(config.data.source)
    needed = {"train", config.evaluate.val_split, config.evaluate.eval_split}
    if not config.data.pretrain_sources:
        needed.add(config.data.pretrain_split)
    missing = sorted(needed - set(splits))
    if missing:
        raise DataError(f"dataset lacks split(s) {missing}; found {sorted(splits)}", config.data.source)
    return splits


def build_encoder(config: ExperimentConfig) -> Encoder:
    return encoder_from_config(config.model, config.seed)


def unlabeled(images: ImageSet) -> ImageSet:
    # Pre-training sees images only: labels are dropped so no label can leak into the SSL stage.
    unlabeled = images.subset(np.arange(len(images)), name=f"{images.name}-unlabeled")
    unlabeled.labels = None
    return unlabeled


def pretrain_images(config: ExperimentConfig, splits: Splits | None = None) -> tuple[ImageSet, str]:
    """The unlabeled images pre-training uses, and a description for the model card.

    Either ``data.pretrain_split`` of ``data.source`` (from ``splits`` when given), or the weighted mixture of
    ``data.pretrain_sources``. Only the splits used here need to exist, so a folder of unlabeled images or a slide
    can be pre-trained on alone.
    """
    data = config.data
    if data.pretrain_sources:
        sources = []
        for entry in data.pretrain_sources:
            found = load_dataset(entry.source, **entry.options)
            if entry.split not in found:
                raise DataError(f"no split '{entry.split}' (found {sorted(found)})", entry.source)
            sources.append(MixtureSource(unlabeled(found[entry.split]), entry.weight, f"{entry.source}:{entry.split}"))
        mixture = MixedImageSet(sources, channels=config.model.in_chans, name="pretrain-mixture")
        return mixture, f"mixture of {mixture.describe()}; labels unused"
    splits = splits if splits is not None else load_dataset(data.source)
    if data.pretrain_split not in splits:
        raise DataError(f"no split '{data.pretrain_split}' to pre-train on (found {sorted(splits)})", data.source)
    images = splits[data.pretrain_split]
    return unlabeled(images), f"{data.source} split '{data.pretrain_split}' ({len(images)} images, labels unused)"


def run_pretraining(
    config: ExperimentConfig, splits: Splits | None = None, resume: bool = True, show_progress: bool = True
) -> PretrainResult:
    if config.pretrain.method == "clip":  # image-text pairs, not images: its own trainer (docs/vision-language.md)
        from medfoundry.vlm.train import run_clip_pretraining

        return run_clip_pretraining(config, resume=resume, show_progress=show_progress)
    images, description = pretrain_images(config, splits)
    return pretrain(
        images,
        build_encoder(config),
        config.pretrain,
        config.output_dir / "pretrain",
        resume=resume,
        data_description=description,
        show_progress=show_progress,
    )


def _evaluate_cell(
    config: ExperimentConfig, key: dict[str, Any], inputs_hash: str, compute: Callable[[], CellOutput], test: ImageSet
) -> list[ResultRecord]:
    records, _ = evaluate_cell(
        CellStore(config.output_dir), CellKey(**key), config.data.task, inputs_hash, compute, test, config.evaluate
    )
    return records


def _probe_records(
    config: ExperimentConfig,
    encoders: dict[str, Encoder],
    embeddings: dict[str, dict[str, Embeddings]],
    data: tuple[ImageSet, ImageSet, ImageSet],
    n_classes: int,
) -> list[ResultRecord]:
    """Every (encoder, adapter, label fraction, seed) cell on cached embeddings."""
    train, val, test = data
    y_train, y_val = np.asarray(train.labels), np.asarray(val.labels)
    records: list[ResultRecord] = []
    for name, features in embeddings.items():
        encoder = encoders[name]
        inputs_hash = hash_json(
            [
                weights_hash(encoder.backbone),
                encoder.pool,
                train.fingerprint(),
                val.fingerprint(),
                test.fingerprint(),
                config.adapt.model_dump(mode="json"),
            ]
        )
        for adapter_name in config.adapt.adapters:
            for fraction in config.adapt.label_fractions:
                for seed in config.adapt.seeds:
                    subset = label_fraction_indices(y_train, fraction, seed, config.adapt.min_per_class)

                    def fit_predict(
                        subset: np.ndarray = subset,
                        adapter_name: str = adapter_name,
                        features: dict[str, Embeddings] = features,
                        seed: int = seed,
                    ) -> CellOutput:
                        adapter = create_adapter(adapter_name, config.adapt, seed, n_classes)
                        adapter.fit(
                            features["train"].features[subset], y_train[subset], features["val"].features, y_val
                        )
                        proba = adapter.predict_proba(features["test"].features)
                        return CellOutput(proba, len(subset), adapter.trainable_parameters_)

                    key = {"model": name, "adapter": adapter_name, "label_fraction": fraction, "seed": seed}
                    records += _evaluate_cell(config, key, inputs_hash, fit_predict, test)
    return records


def _scratch_records(
    config: ExperimentConfig, data: tuple[ImageSet, ImageSet, ImageSet], n_classes: int
) -> list[ResultRecord]:
    """The supervised-from-scratch baseline on the same label subsets as the probes."""
    train, val, test = data
    baseline = config.supervised_baseline
    y_train = np.asarray(train.labels)
    data_hash = hash_json(
        [train.fingerprint(), val.fingerprint(), test.fingerprint(), baseline.model_dump(mode="json")]
    )
    records: list[ResultRecord] = []
    for fraction in config.adapt.label_fractions:
        for seed in config.adapt.seeds:
            subset = label_fraction_indices(y_train, fraction, seed, config.adapt.min_per_class)

            def train_predict(subset: np.ndarray = subset, seed: int = seed) -> CellOutput:
                model = SupervisedFromScratch(baseline, train.num_channels, n_classes, seed)
                model.fit(train.subset(subset), val)
                return CellOutput(model.predict_proba(test), len(subset), model.trainable_parameters_)

            key = {
                "model": f"{baseline.backbone}-scratch",
                "adapter": "supervised",
                "label_fraction": fraction,
                "seed": seed,
            }
            records += _evaluate_cell(config, key, data_hash, train_predict, test)
    return records


def _finetune_records(
    config: ExperimentConfig, encoder_dir: Path, data: tuple[ImageSet, ImageSet, ImageSet], n_classes: int
) -> list[ResultRecord]:
    """The pre-trained encoder fine-tuned end to end (``full``) or with LoRA, on the probes' label subsets."""
    train, val, test = data
    tune = config.finetune
    y_train = np.asarray(train.labels)
    encoder = load_encoder(encoder_dir, pool=config.model.pool)
    data_hash = hash_json(
        [weights_hash(encoder.backbone), train.fingerprint(), val.fingerprint(), test.fingerprint(), tune.model_dump()]
    )
    records: list[ResultRecord] = []
    for mode in tune.modes:
        for fraction in config.adapt.label_fractions:
            for seed in config.adapt.seeds:
                subset = label_fraction_indices(y_train, fraction, seed, config.adapt.min_per_class)

                def train_predict(subset: np.ndarray = subset, seed: int = seed, mode: str = mode) -> CellOutput:
                    settings = tune.model_dump(exclude={"modes"})
                    tuner = FineTuner(encoder, n_classes, mode=mode, seed=seed, **settings)
                    tuner.fit(train.subset(subset), val)
                    return CellOutput(tuner.predict_proba(test), len(subset), tuner.trainable_parameters_)

                key = {
                    "model": config.pretrain.method,
                    "adapter": f"finetune-{mode}",
                    "label_fraction": fraction,
                    "seed": seed,
                }
                records += _evaluate_cell(config, key, data_hash, train_predict, test)
    return records


def run_experiment(
    config: ExperimentConfig,
    resume: bool = True,
    show_progress: bool = True,
    echo: Callable[[str], None] = print,
) -> ExperimentOutput:
    """Run the whole spine and return where results.json and report.html are."""
    torch.manual_seed(config.seed)
    ensure_writable_dir(config.output_dir)
    durations: dict[str, float] = {}
    started = time.perf_counter()
    splits = load_splits(config)
    train, val, test = splits["train"], splits[config.evaluate.val_split], splits[config.evaluate.eval_split]
    y_train, y_val, y_test = _labelled(train, "train"), _labelled(val, "val"), _labelled(test, "test")
    n_classes = int(max(y_train.max(), y_val.max(), y_test.max()) + 1)
    # Model problems (unknown names, bad arguments) must fail before minutes of pre-training, not after.
    random_init = build_encoder(config)
    if config.supervised_baseline.enabled:
        resolve_backbone(config.supervised_baseline.backbone)

    if config.data.pretrain_sources:
        where = f"a mixture of {len(config.data.pretrain_sources)} sources"
    else:
        where = f"{len(splits[config.data.pretrain_split])} unlabeled images"
    echo(f"[1/4] {config.pretrain.method} pre-training on {where}")
    t0 = time.perf_counter()
    pretrained = run_pretraining(config, splits, resume=resume, show_progress=show_progress)
    durations["pretrain"] = time.perf_counter() - t0
    if not pretrained.finished:
        raise MedfoundryError(
            f"pre-training stopped at step {pretrained.steps} of {pretrained.total_steps}"
            f"{' (collapse monitor)' if pretrained.collapsed else ''}; see log.jsonl",
            pretrained.output_dir,
        )
    encoders: dict[str, Encoder] = {
        config.pretrain.method: load_encoder(pretrained.encoder_dir, pool=config.model.pool)
    }
    if config.random_init_baseline:
        encoders["random-init"] = random_init

    echo("[2/4] embedding train / val / test with " + ", ".join(encoders))
    t0 = time.perf_counter()
    embeddings: dict[str, dict[str, Embeddings]] = {}
    for name, encoder in encoders.items():
        embeddings[name] = {
            split: embed(
                encoder,
                images,
                config.output_dir / "embeddings" / name / f"{split}.h5",
                config.embed.batch_size,
                config.embed.num_workers,
            )
            for split, images in (("train", train), ("val", val), ("test", test))
        }
    durations["embed"] = time.perf_counter() - t0

    echo(
        f"[3/4] adapters {config.adapt.adapters} x fractions {config.adapt.label_fractions}"
        f" x seeds {config.adapt.seeds}"
    )
    t0 = time.perf_counter()
    records = _probe_records(config, encoders, embeddings, (train, val, test), n_classes)
    durations["adapt"] = time.perf_counter() - t0
    if config.supervised_baseline.enabled:
        echo(f"[4/4] supervised {config.supervised_baseline.backbone} from scratch on the same label budgets")
        t0 = time.perf_counter()
        records += _scratch_records(config, (train, val, test), n_classes)
        durations["supervised_baseline"] = time.perf_counter() - t0
    if config.finetune.modes:
        echo(f"[+] fine-tuning {config.pretrain.method} ({', '.join(config.finetune.modes)}) on the same label budgets")
        t0 = time.perf_counter()
        records += _finetune_records(config, pretrained.encoder_dir, (train, val, test), n_classes)
        durations["finetune"] = time.perf_counter() - t0
    durations["total"] = time.perf_counter() - started

    results = ResultsFile(
        records=records,
        metadata=run_metadata(
            config=dump_config(config),
            durations=durations,
            dataset=config.data.task,
            pretrain={
                "steps": pretrained.steps,
                "images_per_second": round(pretrained.images_per_second, 1),
                "collapsed": pretrained.collapsed,
                "last_monitor": pretrained.monitor[-1] if pretrained.monitor else None,
            },
            splits={"train": len(train), "val": len(val), "test": len(test)},
        ),
    )
    results_path = write_results(config.output_dir / "results.json", results)
    report_path = render_report(results, config.output_dir / "report.html", title=f"medfoundry: {config.name}")
    echo(format_summary_text(summarise_table(results)))
    return ExperimentOutput(config.output_dir, results_path, report_path, results, durations)
