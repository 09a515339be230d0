"""Zero-shot classification with prompt ensembles: templates x class-name phrasings -> one embedding per class.

Each class's prompts (every template filled with every phrasing) are embedded, averaged and L2-normalised again
(CLIP's prompt ensembling); an image's class probabilities are the softmax of its scaled cosine similarities to
the class embeddings, with the model's learned logit scale. Scoring, results and report are the evaluation
engine's: a ``zero-shot`` task (:mod:`medfoundry.bench.zeroshot`) names a CLIP folder and its classes here
(:class:`ZeroShotConfig`), and ``medfoundry zero-shot`` runs a one-task suite of it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator

from medfoundry.data.registry import load_dataset, resolve_reader
from medfoundry.data.sample import ImageSet
from medfoundry.errors import DataError, MedfoundryError
from medfoundry.settings import StrictModel
from medfoundry.vlm.clip import CLIPModel, LoadedCLIP, embed_texts
from medfoundry.vlm.text import TextTokenizer

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
        found = [p for p in phrasings.split("|") if p.strip()] if sep else [name]
        if not name or not found:
            raise MedfoundryError(f"class entry '{part}' needs the form name=phrasing|phrasing")
        if name.lower() in (c.lower() for c in classes):
            raise MedfoundryError(f"class '{name}' is given twice in '{spec}'")
        classes[name] = found
    return check_classes(classes, spec)


def check_classes(classes: dict[str, list[str]], given: Any = None) -> dict[str, list[str]]:
    """Classes with whitespace-normalised phrasings; at least two, each with a phrasing, no name twice (any case)."""
    checked: dict[str, list[str]] = {}
    for name, phrasings in classes.items():
        name = " ".join(str(name).split())
        found = [" ".join(p.split()) for p in phrasings if p.strip()]
        if not name or not found:
            raise MedfoundryError(f"class {name!r} needs at least one phrasing")
        if name.lower() in (c.lower() for c in checked):
            raise MedfoundryError(f"class '{name}' is given twice")
        checked[name] = found
    if len(checked) < 2:
        raise MedfoundryError(f"zero-shot needs at least 2 classes, got {list(checked)} from {given or classes!r}")
    return checked


def parse_templates(spec: str | None) -> list[str]:
    """``"a chest x-ray showing {}.|{}"`` -> templates; each needs a ``{}`` where the class phrasing goes."""
    if spec is None:
        return list(DEFAULT_TEMPLATES)
    return check_templates(spec.split("|"), spec)


def check_templates(templates: list[str], given: Any = None) -> list[str]:
    found = [" ".join(t.split()) for t in templates if t.strip()]
    bad = [t for t in found if "{}" not in t]
    if bad or not found:
        raise MedfoundryError(f"every template needs '{{}}' for the class phrasing; check: {bad or given!r}")
    return found


class ZeroShotConfig(StrictModel):
    """A ``zero-shot`` task's model and prompts (a suite task's ``zero_shot:`` section)."""

    checkpoint: Path = Field(description="CLIP model folder (medfoundry pretrain --method clip: <run>/pretrain/clip)")
    classes: dict[str, list[str]] = Field(
        description="class name -> phrasings, or one string 'name=phrasing|phrasing;name=...'; matched to the "
        "data's class names (any case), or in label order when the data has none"
    )
    templates: list[str] = Field(
        default_factory=lambda: list(DEFAULT_TEMPLATES), description="prompt templates, each with {} for a phrasing"
    )
    batch_size: int = Field(128, ge=1)

    @field_validator("classes", mode="before")
    @classmethod
    def _classes(cls, value: Any) -> Any:
        try:
            if isinstance(value, str):
                return parse_classes(value)
            if isinstance(value, dict):
                # A single phrasing may be written as a plain string.
                return check_classes({k: [v] if isinstance(v, str) else list(v) for k, v in value.items()})
        except MedfoundryError as error:
            raise ValueError(str(error)) from None
        return value

    @field_validator("templates", mode="before")
    @classmethod
    def _templates(cls, value: Any) -> Any:
        try:
            if isinstance(value, str):
                return parse_templates(value)
            if isinstance(value, list):
                return check_templates([str(t) for t in value], value)
        except MedfoundryError as error:
            raise ValueError(str(error)) from None
        return value


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


def open_images(source: str, options: dict[str, Any], split: str, size: int, channels: int) -> ImageSet:
    """The labelled images to classify: ``split`` of ``source``, or its only split.

    Folder and CSV readers resize and convert channels while decoding (to the CLIP encoder's, unless ``options``
    say otherwise); other readers' images are adapted per batch (:func:`zero_shot_proba_of`).
    """
    reader, _ = resolve_reader(source)
    kwargs = dict(options)
    if reader.prefix in ("folder", "csv"):
        kwargs.setdefault("image_size", size)
        kwargs.setdefault("channels", channels)
    splits = load_dataset(source, **kwargs)
    wanted = split if split in splits or len(splits) != 1 else next(iter(splits))
    if wanted not in splits:
        raise DataError(f"no split '{wanted}' (found {sorted(splits)})", source)
    images = splits[wanted]
    if images.labels is None or np.asarray(images.labels).ndim != 1:
        raise DataError(f"split '{wanted}' needs one class label per image for zero-shot evaluation", source)
    return images


def classes_in_label_order(images: ImageSet, classes: dict[str, list[str]], source: str) -> dict[str, list[str]]:
    """``classes`` reordered so that position k is the data's label k (matched by name, any case).

    Without class names in the data, the classes are taken to be given in label order.
    """
    names = getattr(images, "class_names", None)
    given = list(classes)
    if names is None:
        n_labels = int(np.asarray(images.labels).max()) + 1
        if n_labels > len(given):
            raise DataError(
                f"labels run 0..{n_labels - 1} but {len(given)} classes were given (in label order)", source
            )
        return classes
    lower = {c.lower(): c for c in given}
    missing = [n for n in names if n.lower() not in lower]
    extra = [c for c in given if c.lower() not in {n.lower() for n in names}]
    if missing or extra:
        unmatched = missing + extra
        raise DataError(f"classes {given} do not match the data's classes {names} (unmatched: {unmatched})", source)
    return {lower[n.lower()]: classes[lower[n.lower()]] for n in names}


def _to_model_input(batch: torch.Tensor, size: int, channels: int) -> torch.Tensor:
    if batch.shape[1] != channels:
        batch = batch.float().mean(dim=1, keepdim=True) if channels == 1 else batch.float().expand(-1, channels, -1, -1)
    if tuple(batch.shape[-2:]) != (size, size):
        batch = F.interpolate(batch.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return batch.round().clamp(0, 255).to(torch.uint8) if batch.dtype != torch.uint8 else batch


@torch.no_grad()
def zero_shot_proba_of(
    loaded: LoadedCLIP, images: ImageSet, prompts: dict[str, list[str]], batch_size: int = 128
) -> np.ndarray:
    """(N, K) class probabilities of every image, the classes in ``prompts``' order."""
    model = loaded.model
    size, channels = loaded.image_size, model.image_encoder.in_chans
    class_embeds = class_embeddings(model, loaded.tokenizer, prompts)
    chunks = []
    for start in range(0, len(images), batch_size):
        stop = min(start + batch_size, len(images))
        batch = torch.stack([torch.from_numpy(np.asarray(images.load(i))) for i in range(start, stop)])
        chunks.append(model.encode_image(_to_model_input(batch, size, channels)))
    return zero_shot_proba(model, torch.cat(chunks), class_embeds)
