"""Zero-shot classification with prompt ensembles: templates x class-name phrasings -> one embedding per class.

Each class's prompts (every template filled with every phrasing) are embedded, averaged and L2-normalised again
(CLIP's prompt ensembling); an image's class probabilities are the softmax of its scaled cosine similarities to
the class embeddings, with the model's learned logit scale. Results go through the common metrics (patient-grouped
bootstrap CIs), predictions CSV, results.json and report.html.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medfoundry.data.registry import load_dataset, resolve_reader
from medfoundry.data.sample import ImageSet
from medfoundry.errors import DataError, MedfoundryError
from medfoundry.evaluate.metrics import MetricValue, compute_metrics
from medfoundry.evaluate.predictions import Predictions, predictions_path, write_predictions
from medfoundry.evaluate.results import ResultsFile, records_from_metrics, run_metadata, write_results
from medfoundry.vlm.clip import CLIPModel, embed_texts, load_clip, model_label
from medfoundry.vlm.pairs import SkipReport
from medfoundry.vlm.text import TextTokenizer

log = logging.getLogger("medfoundry.vlm")

DEFAULT_TEMPLATES = ("{}.", "an image showing {}.", "a radiograph of {}.")
ADAPTER = "zero-shot"


def parse_classes(spec: str) -> dict[str, list[str]]:
    """``"normal=normal chest x-ray|clear lungs;pneumonia=pneumonia|lung opacity"`` -> {class: phrasings}."""
    classes: dict[str, list[str]] = {}
    for part in (p.strip() for p in spec.split(";")):
        if not part:
            continue
        name, sep, phrasings = part.partition("=")
        name = name.strip()
        found = [" ".join(p.split()) for p in phrasings.split("|") if p.strip()] if sep else [name]
        if not name or not found:
            raise MedfoundryError(f"class entry '{part}' needs the form name=phrasing|phrasing")
        if name.lower() in (c.lower() for c in classes):
            raise MedfoundryError(f"class '{name}' is given twice in '{spec}'")
        classes[name] = found
    if len(classes) < 2:
        raise MedfoundryError(f"zero-shot needs at least 2 classes, got {list(classes)} from '{spec}'")
    return classes


def parse_templates(spec: str | None) -> list[str]:
    """``"a chest x-ray showing {}.|{}"`` -> templates; each needs a ``{}`` where the class phrasing goes."""
    if spec is None:
        return list(DEFAULT_TEMPLATES)
    templates = [" ".join(t.split()) for t in spec.split("|") if t.strip()]
    bad = [t for t in templates if "{}" not in t]
    if bad or not templates:
        raise MedfoundryError(f"every template needs '{{}}' for the class phrasing; check: {bad or spec!r}")
    return templates


def class_prompts(classes: dict[str, list[str]], templates: list[str]) -> dict[str, list[str]]:
    # str.replace, not str.format: a template may contain other braces.
    return {name: [t.replace("{}", p) for t in templates for p in phrasings] for name, phrasings in classes.items()}


@torch.no_grad()
def class_embeddings(model: CLIPModel, tokenizer: TextTokenizer, prompts: dict[str, list[str]]) -> torch.Tensor:
    """(K, D): per class, the L2-normalised mean of its L2-normalised prompt embeddings."""
    return torch.stack([F.normalize(embed_texts(model, tokenizer, p).mean(dim=0), dim=0) for p in prompts.values()])


@torch.no_grad()
def zero_shot_proba(model: CLIPModel, image_embeddings: torch.Tensor, class_embeds: torch.Tensor) -> np.ndarray:
    logits = model.logit_scale.exp() * image_embeddings @ class_embeds.t()
    return logits.softmax(dim=1).double().numpy()


@dataclass
class ZeroShotOutput:
    proba: np.ndarray
    labels: np.ndarray
    ids: list[str]
    patient_ids: list[str]
    class_names: list[str]
    prompts: dict[str, list[str]]
    metrics: dict[str, MetricValue]
    skipped: SkipReport
    paths: dict[str, Path] = field(default_factory=dict)


def _open_images(data: str, split: str | None, size: int, channels: int, patient_regex: str | None) -> ImageSet:
    reader, _ = resolve_reader(data)
    kwargs: dict[str, Any] = {}
    if reader.prefix in ("folder", "csv"):
        # These readers resize and convert channels while decoding; others are adapted per batch below.
        kwargs = {"image_size": size, "channels": channels}
        if patient_regex:
            kwargs["patient_regex"] = patient_regex
    elif patient_regex:
        raise MedfoundryError(f"--patient-regex applies to folder and CSV data only, not {reader.prefix}:")
    splits = load_dataset(data, **kwargs)
    if split is None:
        split = next(iter(splits)) if len(splits) == 1 else "test"
    if split not in splits:
        raise DataError(f"no split '{split}' (found {sorted(splits)})", data)
    images = splits[split]
    if images.labels is None or images.labels.ndim != 1:
        raise DataError(f"split '{split}' needs one class label per image for zero-shot evaluation", data)
    return images


def _class_order(images: ImageSet, classes: dict[str, list[str]], data: str) -> list[int]:
    """For each dataset label index, the position of its class in ``classes`` (matched by name, any case)."""
    names = getattr(images, "class_names", None)
    given = list(classes)
    if names is None:
        n_labels = int(images.labels.max()) + 1  # type: ignore[union-attr]
        if n_labels > len(given):
            raise DataError(f"labels run 0..{n_labels - 1} but {len(given)} classes were given (in label order)", data)
        return list(range(len(given)))
    lower = {c.lower(): i for i, c in enumerate(given)}
    missing = [n for n in names if n.lower() not in lower]
    extra = [c for c in given if c.lower() not in {n.lower() for n in names}]
    if missing or extra:
        raise DataError(f"classes {given} do not match the data's classes {names} (unmatched: {missing + extra})", data)
    return [lower[n.lower()] for n in names]


def _to_model_input(batch: torch.Tensor, size: int, channels: int) -> torch.Tensor:
    if batch.shape[1] != channels:
        batch = batch.float().mean(dim=1, keepdim=True) if channels == 1 else batch.float().expand(-1, channels, -1, -1)
    if tuple(batch.shape[-2:]) != (size, size):
        batch = F.interpolate(batch.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return batch.round().clamp(0, 255).to(torch.uint8) if batch.dtype != torch.uint8 else batch


@torch.no_grad()
def run_zero_shot(
    model_dir: Path | str,
    data: str,
    classes: str | dict[str, list[str]],
    templates: str | list[str] | None,
    out_dir: Path | str,
    split: str | None = None,
    patient_regex: str | None = None,
    metrics: tuple[str, ...] = ("auroc", "balanced_accuracy"),
    n_bootstrap: int = 1000,
    batch_size: int = 128,
    task: str | None = None,
) -> ZeroShotOutput:
    """Classify ``data`` zero-shot and write predictions, ``results.json`` and ``report.html`` into ``out_dir``."""
    from medfoundry.evaluate.report import render_report

    class_map = parse_classes(classes) if isinstance(classes, str) else classes
    template_list = parse_templates(templates) if templates is None or isinstance(templates, str) else templates
    loaded = load_clip(model_dir)
    model, encoder = loaded.model, loaded.model.image_encoder
    size, channels = loaded.image_size, encoder.in_chans
    images = _open_images(data, split, size, channels, patient_regex)
    order = _class_order(images, class_map, data)
    prompts = class_prompts(class_map, template_list)
    class_embeds = class_embeddings(model, loaded.tokenizer, prompts)

    skipped, kept, chunks, batch = SkipReport(), [], [], []
    for i in range(len(images)):
        try:
            batch.append(torch.from_numpy(np.asarray(images.load(i))))
            kept.append(i)
        except DataError as error:
            skipped.add(getattr(images, "paths", [images.source] * len(images))[i], "unreadable image", str(error))
        if len(batch) == batch_size or (i == len(images) - 1 and batch):
            chunks.append(model.encode_image(_to_model_input(torch.stack(batch), size, channels)))
            batch = []
    if not kept:
        raise DataError(f"no readable images ({skipped.summary('images')})", data)
    if len(skipped):
        log.warning(skipped.summary("images"))
    proba = zero_shot_proba(model, torch.cat(chunks), class_embeds)
    labels = np.asarray([order[int(images.labels[i])] for i in kept], dtype=np.int64)  # type: ignore[index]
    ids = [images.ids[i] for i in kept]
    patients = [images.patient_ids[i] for i in kept]
    values = compute_metrics(labels, proba, patients, metrics, n_bootstrap)

    out_dir = Path(out_dir)
    name, task = model_label(model_dir), task or Path(str(resolve_reader(data)[1])).name
    records = records_from_metrics(
        values,
        task=task,
        model=name,
        adapter=ADAPTER,
        label_fraction=1.0,
        seed=0,
        n_train=0,
        n_test=len(kept),
        trainable_params=0,
    )
    meta = run_metadata(
        model_dir=str(model_dir),
        data=data,
        classes=class_map,
        templates=template_list,
        n_prompts_per_class={k: len(v) for k, v in prompts.items()},
        skipped=skipped.summary("images"),
        note="zero-shot: no labels used (n_train 0); label_fraction 1.0 is a placeholder the schema requires",
    )
    output = ZeroShotOutput(proba, labels, ids, patients, list(class_map), prompts, values, skipped)
    pred_path = predictions_path(out_dir / "predictions", name, ADAPTER, 1.0, 0)
    output.paths["predictions"] = write_predictions(pred_path, Predictions(ids, patients, labels, proba))
    results = ResultsFile(records, meta)
    output.paths["results"] = write_results(out_dir / "results.json", results)
    output.paths["report"] = render_report(results, out_dir / "report.html", title="medfoundry zero-shot")
    return output
