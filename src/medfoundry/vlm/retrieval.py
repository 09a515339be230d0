"""Image-to-text and text-to-image retrieval: Recall@K with bootstrap CIs over images, and exact chance levels.

An image may own several texts. Image-to-text: a hit when any of the image's own texts is among the top K of all
texts. Text-to-image: a hit when the text's image is among the top K images. Chance is the expected recall of a
random ranking: ``1 - C(T - n_i, K) / C(T, K)`` for an image with ``n_i`` of ``T`` texts, and ``K / N`` images.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medfoundry.errors import DataError
from medfoundry.evaluate.results import ResultRecord, ResultsFile, run_metadata, write_results
from medfoundry.io_utils import write_json_atomic
from medfoundry.vlm.clip import embed_images, embed_texts, load_clip, model_label
from medfoundry.vlm.pairs import PairSet, load_pair_images, load_pairs, split_pairs

log = logging.getLogger("medfoundry.vlm")

KS = (1, 5, 10)
DIRECTIONS = ("image_to_text", "text_to_image")


def hits_at_k(similarity: np.ndarray, text_owner: np.ndarray, ks: tuple[int, ...] = KS) -> dict[str, np.ndarray]:
    """Per-query 0/1 hits: ``image_to_text@K`` (one per image) and ``text_to_image@K`` (one per text).

    ``similarity`` is (n_images, n_texts); ties are broken in favour of the lower index (a stable sort), which
    is as likely to help as to hurt a query.
    """
    n_images, n_texts = similarity.shape
    if text_owner.shape != (n_texts,):
        raise ValueError(f"text_owner must have {n_texts} entries, got {text_owner.shape}")
    own = text_owner[None, :] == np.arange(n_images)[:, None]
    # Rank of an image's best-ranked own text: how many texts score strictly higher than it.
    best_own = np.where(own, similarity, -np.inf).max(axis=1)
    i2t_rank = (similarity > best_own[:, None]).sum(axis=1)
    true_score = similarity[text_owner, np.arange(n_texts)]
    t2i_rank = (similarity > true_score[None, :]).sum(axis=0)
    out: dict[str, np.ndarray] = {}
    for k in ks:
        out[f"image_to_text@{k}"] = (i2t_rank < k).astype(np.float64)
        out[f"text_to_image@{k}"] = (t2i_rank < k).astype(np.float64)
    return out


def chance_recall(text_owner: np.ndarray, n_images: int, ks: tuple[int, ...] = KS) -> dict[str, float]:
    """Expected Recall@K of a random ranking, per direction (exact, see the module docstring)."""
    n_texts = text_owner.shape[0]
    per_image = np.bincount(text_owner, minlength=n_images)
    out: dict[str, float] = {}
    for k in ks:
        k_texts = min(k, n_texts)
        miss = [math.comb(n_texts - m, k_texts) / math.comb(n_texts, k_texts) for m in per_image]
        out[f"image_to_text@{k}"] = float(1.0 - np.mean(miss))
        out[f"text_to_image@{k}"] = min(k, n_images) / n_images
    return out


@dataclass
class RecallValue:
    value: float
    ci_low: float
    ci_high: float
    chance: float


@dataclass
class RetrievalOutput:
    recalls: dict[str, RecallValue]
    n_images: int
    n_texts: int
    seen_in_training: int = 0
    skipped: str = ""
    paths: dict[str, Path] = field(default_factory=dict)


def recall_with_ci(
    hits: dict[str, np.ndarray],
    text_owner: np.ndarray,
    n_images: int,
    chance: dict[str, float],
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, RecallValue]:
    """Recall with a percentile bootstrap CI that resamples images (an image's texts go with it)."""
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(n_images, np.full(n_images, 1.0 / n_images), size=n_bootstrap).astype(np.float64)
    alpha = (1.0 - confidence) / 2
    out = {}
    for name, h in hits.items():
        if name.startswith("image_to_text"):
            per_image_hits, per_image_n = h, np.ones(n_images)
        else:
            per_image_hits = np.bincount(text_owner, weights=h, minlength=n_images)
            per_image_n = np.bincount(text_owner, minlength=n_images).astype(np.float64)
        resampled = (draws @ per_image_hits) / np.maximum(draws @ per_image_n, 1e-12)
        low, high = np.quantile(resampled, [alpha, 1 - alpha]) if n_bootstrap else (np.nan, np.nan)
        out[name] = RecallValue(float(h.mean()), float(low), float(high), chance[name])
    return out


@torch.no_grad()
def evaluate_retrieval(
    model_dir: Path | str,
    pairs: PairSet,
    n_bootstrap: int = 1000,
    seed: int = 0,
    ks: tuple[int, ...] = KS,
) -> RetrievalOutput:
    """Recall@K both ways on ``pairs`` (unreadable images are skipped and counted)."""
    loaded = load_clip(model_dir)
    encoder = loaded.model.image_encoder
    images, pairs = load_pair_images(pairs, loaded.image_size, encoder.in_chans)
    if len(pairs) < 2:
        raise DataError(f"retrieval needs at least 2 images, got {len(pairs)}", pairs.source)
    texts, owner = pairs.texts()
    similarity = (embed_images(loaded.model, images) @ embed_texts(loaded.model, loaded.tokenizer, texts).t()).numpy()
    chance = chance_recall(owner, len(pairs), ks)
    recalls = recall_with_ci(hits_at_k(similarity, owner, ks), owner, len(pairs), chance, n_bootstrap, seed=seed)
    seen = len(set(pairs.image_ids) & loaded.train_ids)
    if seen:
        log.warning("%d of %d evaluated images were seen in training: recall is not held-out", seen, len(pairs))
    return RetrievalOutput(recalls, len(pairs), len(texts), seen, pairs.skipped.summary())


def run_retrieval(
    model_dir: Path | str,
    pairs_spec: str,
    out_dir: Path | str,
    split: str = "test",
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> RetrievalOutput:
    """Evaluate on ``split`` of the pairs (split as in training, from the model's clip.json; ``all`` for every
    image) and write ``retrieval.json``, ``results.json`` (model and chance rows) and ``report.html``."""
    from medfoundry.report import render_report

    loaded_info = load_clip(model_dir).info
    pairs = load_pairs(pairs_spec)
    if split != "all":
        settings = loaded_info.get("split", {})
        splits = split_pairs(pairs, settings.get("test_fraction", 0.2), settings.get("split_seed", 0))
        if split not in splits:
            raise DataError(f"no split '{split}' in the pairs (found {sorted(splits)}, or use 'all')", pairs_spec)
        pairs = splits[split]
    output = evaluate_retrieval(model_dir, pairs, n_bootstrap, seed)
    out_dir = Path(out_dir)
    task, model_name = f"{pairs.name}-retrieval", model_label(model_dir)
    records = []
    for name, rv in output.recalls.items():
        metric = f"recall@{name.split('@')[1]} {name.split('@')[0].replace('_', '-')}"
        for model, value, low, high in (
            (model_name, rv.value, rv.ci_low, rv.ci_high),
            ("chance", rv.chance, rv.chance, rv.chance),
        ):
            records.append(
                ResultRecord(task, model, "retrieval", 1.0, seed, metric, value, low, high, 0, output.n_images)
            )
    meta = run_metadata(
        model_dir=str(model_dir),
        pairs=pairs_spec,
        split=split,
        n_images=output.n_images,
        n_texts=output.n_texts,
        seen_in_training=output.seen_in_training,
        skipped=output.skipped,
        note="chance rows: expected recall of a random ranking; CIs resample images",
    )
    payload: dict[str, Any] = {
        "model": str(model_dir),
        "pairs": pairs_spec,
        "split": split,
        "n_images": output.n_images,
        "n_texts": output.n_texts,
        "seen_in_training": output.seen_in_training,
        "skipped": output.skipped,
        "recall": {k: vars(v) for k, v in output.recalls.items()},
    }
    output.paths["retrieval"] = write_json_atomic(out_dir / "retrieval.json", payload)
    output.paths["results"] = write_results(out_dir / "results.json", ResultsFile(records, meta))
    output.paths["report"] = render_report(
        ResultsFile(records, meta), out_dir / "report.html", title="medfoundry retrieval"
    )
    return output
