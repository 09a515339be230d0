"""CLIP: an image encoder from the registry and a text tower, linear projections into one space, and a learnable
temperature; trained with the symmetric InfoNCE loss.

The model folder (``save_clip`` / ``load_clip``)::

    clip.json                    format, embedding size, text settings, split, training summary
    image_encoder/               medfoundry checkpoint folder (model.safetensors, config.json, model_card.md)
    text/                        Hugging Face model folder (config.json, model.safetensors) + tokenizer.json
    projections.safetensors      image_projection.weight, text_projection.weight, logit_scale
    train_images.txt             ids of the images seen in training (retrieval warns on overlap)
    model_card.md
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from medfoundry import __version__
from medfoundry.errors import ModelError
from medfoundry.io_utils import atomic_dir
from medfoundry.models.backbones import Encoder
from medfoundry.models.checkpoint import load_encoder, save_encoder
from medfoundry.settings import StrictModel
from medfoundry.vlm.text import TOKENIZER_FILE, TextTokenizer, TextTower, load_text_model, save_text_model

CLIP_FILE = "clip.json"
PROJECTIONS_FILE = "projections.safetensors"
TRAIN_IDS_FILE = "train_images.txt"
FORMAT = "medfoundry-clip/1"


class CLIPConfig(StrictModel):
    """CLIP-style image-text pre-training (medfoundry.vlm, docs/vision-language.md).

    ``data.source`` names image-text pairs (pairs.csv, pairs.json or vqa_rad:PATH); ``model`` is the image
    encoder. The text tower is a small BERT trained from scratch with a tokenizer trained on the training texts,
    or the Hugging Face checkpoint folder ``text_checkpoint`` (which must hold a tokenizer.json).
    """

    embed_dim: int = Field(128, ge=8, description="shared image-text embedding size")
    max_tokens: int = Field(128, ge=8, description="longer texts are truncated (and counted in a warning)")
    # BPE by default: WordPiece training in Hugging Face tokenizers is not deterministic (tokenizers issue #1794),
    # so two runs with the same seed would get different vocabularies.
    tokenizer: Literal["bpe", "wordpiece"] = "bpe"
    vocab_size: int = Field(4000, ge=100)
    min_frequency: int = Field(2, ge=1)
    text_checkpoint: Path | None = Field(None, description="local Hugging Face text model folder instead of scratch")
    text_width: int = 128
    text_layers: int = 2
    text_heads: int = 4
    text_dropout: float = Field(0.1, ge=0.0, lt=1.0)
    text_pooling: Literal["mean", "cls"] = "mean"
    init_temperature: float = Field(0.07, gt=0)
    max_logit_scale: float = Field(100.0, gt=1, description="CLIP clamps exp(logit_scale) at 100")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="held-out images (split by patient/image)")
    split_seed: int = 0
    crop_scale: tuple[float, float] = Field((0.7, 1.0), description="random resized crop area range")


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of matching (image i, text i) pairs; features must be L2-normalised.

    Written here because lightly's NTXentLoss also treats the other images (and the other texts) as negatives
    and has a fixed temperature, which is SimCLR's loss, not CLIP's cross-modal one with a learned temperature.
    """
    logits = logit_scale.exp() * image_features @ text_features.t()
    targets = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2


class CLIPModel(nn.Module):
    def __init__(
        self,
        image_encoder: Encoder,
        text_tower: TextTower,
        embed_dim: int = 128,
        init_temperature: float = 0.07,
        max_logit_scale: float = 100.0,
    ) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.text_tower = text_tower
        self.image_projection = nn.Linear(image_encoder.embed_dim, embed_dim, bias=False)
        self.text_projection = nn.Linear(text_tower.width, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))
        self.max_logit_scale = max_logit_scale

    @property
    def embed_dim(self) -> int:
        return int(self.image_projection.out_features)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 or 0-1 float images (B, C, H, W) to L2-normalised embeddings."""
        features = self.image_encoder(self.image_encoder.normalize(images))
        return F.normalize(self.image_projection(features), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_projection(self.text_tower(input_ids, attention_mask)), dim=-1)

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return clip_loss(self.encode_image(images), self.encode_text(input_ids, attention_mask), self.logit_scale)

    def clamp_logit_scale(self) -> None:
        # CLIP clips the learned scale at 100 so the softmax cannot become arbitrarily sharp.
        with torch.no_grad():
            self.logit_scale.clamp_(0.0, math.log(self.max_logit_scale))


@dataclass
class LoadedCLIP:
    model: CLIPModel
    tokenizer: TextTokenizer
    info: dict[str, Any]
    folder: Path

    @property
    def image_size(self) -> int:
        """The side images were trained at (CNN encoders take any size, so the checkpoint cannot tell)."""
        return int(self.info.get("image_size") or self.model.image_encoder.img_size or 224)

    @property
    def train_ids(self) -> set[str]:
        path = self.folder / TRAIN_IDS_FILE
        return set(path.read_text().split("\n")) - {""} if path.is_file() else set()


def save_clip(
    model: CLIPModel,
    tokenizer: TextTokenizer,
    folder: Path,
    info: dict[str, Any],
    train_ids: list[str] | None = None,
    encoder_extra: dict[str, Any] | None = None,
) -> Path:
    """Write the model folder atomically (see the module docstring)."""
    info = {
        "format": FORMAT,
        "embed_dim": model.embed_dim,
        "max_tokens": tokenizer.max_tokens,
        "text_pooling": model.text_tower.pooling,
        "logit_scale": float(model.logit_scale.detach()),
        "max_logit_scale": model.max_logit_scale,
        "medfoundry_version": __version__,
        **info,
    }
    with atomic_dir(Path(folder)) as tmp:
        save_encoder(model.image_encoder, tmp / "image_encoder", extra={"ssl_method": "clip", **(encoder_extra or {})})
        save_text_model(model.text_tower.model, tmp / "text")
        tokenizer.save(tmp / "text" / TOKENIZER_FILE)
        save_file(
            {
                "image_projection.weight": model.image_projection.weight.detach().contiguous(),
                "text_projection.weight": model.text_projection.weight.detach().contiguous(),
                "logit_scale": model.logit_scale.detach().reshape(1).contiguous(),
            },
            str(tmp / PROJECTIONS_FILE),
        )
        (tmp / CLIP_FILE).write_text(json.dumps(info, indent=2, default=str) + "\n")
        (tmp / TRAIN_IDS_FILE).write_text("\n".join(train_ids or []) + "\n")
        (tmp / "model_card.md").write_text(_model_card(info))
    return Path(folder)


def _model_card(info: dict[str, Any]) -> str:
    return "\n".join(
        [
            "# CLIP (medfoundry)",
            "",
            f"- Image encoder: `image_encoder/` ({info.get('image_backbone', '?')}), a medfoundry checkpoint folder",
            f"- Text tower: `text/`, Hugging Face {info.get('text_source', 'BERT trained from scratch')}, "
            f"{info.get('text_pooling')} pooling, at most {info.get('max_tokens')} tokens",
            f"- Shared embedding: {info.get('embed_dim')} dimensions; logit scale {info.get('logit_scale'):.3f}",
            f"- Data seen: {info.get('data', 'unknown')}",
            f"- Training: {info.get('steps', '?')} steps, loss {info.get('loss_start', float('nan')):.3f} -> "
            f"{info.get('loss_end', float('nan')):.3f}",
            "- Intended use: research on medical vision-language pre-training; not for clinical use.",
            "",
        ]
    )


def load_clip(folder: Path | str) -> LoadedCLIP:
    """Load a model folder written by ``save_clip`` (safetensors only, no pickle)."""
    folder = Path(folder)
    info_path = folder / CLIP_FILE
    if not info_path.is_file():
        raise ModelError(f"not a CLIP model folder (no {CLIP_FILE})", folder)
    try:
        info = json.loads(info_path.read_text())
    except json.JSONDecodeError as error:
        raise ModelError(f"clip.json is not valid JSON ({error.msg})", info_path) from None
    if info.get("format") != FORMAT:
        raise ModelError(f"unsupported format {info.get('format')!r}, expected {FORMAT}", info_path)
    encoder = load_encoder(folder / "image_encoder")
    tower = TextTower(load_text_model(folder / "text"), info["text_pooling"])
    tokenizer = TextTokenizer.load(folder / "text", int(info["max_tokens"]))
    model = CLIPModel(encoder, tower, int(info["embed_dim"]), max_logit_scale=float(info["max_logit_scale"]))
    try:
        state = load_file(str(folder / PROJECTIONS_FILE))
        model.image_projection.weight.data.copy_(state["image_projection.weight"])
        model.text_projection.weight.data.copy_(state["text_projection.weight"])
        model.logit_scale.data.copy_(state["logit_scale"].reshape(()))
    except (SafetensorError, OSError, KeyError, RuntimeError) as error:
        raise ModelError(f"cannot read projections ({error})", folder / PROJECTIONS_FILE) from None
    model.eval()
    return LoadedCLIP(model, tokenizer, info, folder)


@torch.no_grad()
def embed_texts(model: CLIPModel, tokenizer: TextTokenizer, texts: list[str], batch_size: int = 256) -> torch.Tensor:
    """L2-normalised text embeddings (N, D); truncation of over-long texts is warned about once."""
    from medfoundry.vlm.text import warn_truncated

    model.eval()
    chunks, truncated = [], 0
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer.encode(texts[start : start + batch_size])
        truncated += encoded.n_truncated
        chunks.append(model.encode_text(encoded.input_ids, encoded.attention_mask))
    warn_truncated(truncated, len(texts), tokenizer.max_tokens)
    return torch.cat(chunks) if chunks else torch.empty(0, model.embed_dim)


@torch.no_grad()
def embed_images(model: CLIPModel, images: Any, batch_size: int = 128) -> torch.Tensor:
    """L2-normalised image embeddings (N, D) of a uint8 array or tensor (N, C, H, W) at the encoder's size."""
    model.eval()
    images = torch.as_tensor(images)
    return torch.cat([model.encode_image(images[s : s + batch_size]) for s in range(0, images.shape[0], batch_size)])


def model_label(folder: Path | str) -> str:
    """A short model name for results: the folder's name, or ``<run>-clip`` for ``<run>/pretrain/clip``."""
    path = Path(folder).resolve()
    if path.name == "clip" and path.parent.name == "pretrain":
        return f"{path.parent.parent.name}-clip"
    return path.name
