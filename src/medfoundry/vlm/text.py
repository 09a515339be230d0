"""Text side of CLIP: a tokenizer trained on the corpus (Hugging Face ``tokenizers``) and a text tower.

The tower is a Hugging Face ``transformers`` model: a small ``BertModel`` built from a config and trained from
scratch, or any local text checkpoint folder (``AutoModel.from_pretrained``, offline) that carries its
``tokenizer.json``. A text's feature is the mean of its token states over the attention mask (``mean``) or the
first token's state (``cls``).
"""

from __future__ import annotations

import logging
import pickle
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from medfoundry.errors import DataError, ModelError
from medfoundry.extras import lazy, require
from medfoundry.io_utils import write_text_atomic

log = logging.getLogger("medfoundry.vlm")

# Imported on first use: the [vlm] extra (``import medfoundry.vlm`` and the CLI work without it).
Tokenizer = lazy("tokenizers", "vlm", "Tokenizer")
decoders, models = lazy("tokenizers.decoders", "vlm"), lazy("tokenizers.models", "vlm")
normalizers, pre_tokenizers = lazy("tokenizers.normalizers", "vlm"), lazy("tokenizers.pre_tokenizers", "vlm")
processors, trainers = lazy("tokenizers.processors", "vlm"), lazy("tokenizers.trainers", "vlm")

TOKENIZER_FILE = "tokenizer.json"
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# Pad tokens of common tokenizer families, tried in this order when a user's checkpoint is loaded.
_PAD_CANDIDATES = ("[PAD]", "<pad>", "<|endoftext|>")


@dataclass
class Encoded:
    input_ids: torch.Tensor  # (N, L) int64
    attention_mask: torch.Tensor  # (N, L) int64
    n_truncated: int


class TextTokenizer:
    """A ``tokenizers.Tokenizer`` with padding and truncation at ``max_tokens``, counting what was truncated."""

    def __init__(self, tokenizer: Tokenizer, max_tokens: int, source: Path | None = None) -> None:
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.source = source
        pad = next((t for t in _PAD_CANDIDATES if tokenizer.token_to_id(t) is not None), None)
        if pad is None:
            raise ModelError(f"tokenizer has no pad token (looked for {', '.join(_PAD_CANDIDATES)})", source)
        self.pad_token, self.pad_id = pad, int(tokenizer.token_to_id(pad))
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_length=max_tokens)
        tokenizer.enable_padding(pad_id=self.pad_id, pad_token=pad)

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.get_vocab_size())

    @classmethod
    def train(
        cls,
        texts: Sequence[str],
        max_tokens: int,
        kind: str = "bpe",
        vocab_size: int = 4000,
        min_frequency: int = 2,
    ) -> TextTokenizer:
        """Train a lower-casing BPE or WordPiece tokenizer on ``texts``.

        BPE gives the same vocabulary for the same texts; WordPiece training does not (hash-map order in
        ``tokenizers``, its issue #1794), which breaks same-seed reproducibility, though not resume (the trained
        tokenizer is saved and reloaded).
        """
        if not texts:
            raise DataError("no texts to train the tokenizer on")
        if kind == "wordpiece":
            tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
            trainer = trainers.WordPieceTrainer(
                vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS
            )
            tokenizer.decoder = decoders.WordPiece()
        elif kind == "bpe":
            tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
            trainer = trainers.BpeTrainer(
                vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS
            )
            tokenizer.decoder = decoders.BPEDecoder()
        else:
            raise ModelError(f"unknown tokenizer kind '{kind}': use wordpiece or bpe")
        # BERT's normaliser and pre-tokeniser: lower case, accents stripped, split on spaces and punctuation.
        tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tokenizer.train_from_iterator(list(texts), trainer)
        tokenizer.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            special_tokens=[("[CLS]", tokenizer.token_to_id("[CLS]")), ("[SEP]", tokenizer.token_to_id("[SEP]"))],
        )
        return cls(tokenizer, max_tokens)

    @classmethod
    def load(cls, path: Path | str, max_tokens: int) -> TextTokenizer:
        """Load ``tokenizer.json`` (a file, or a folder holding one)."""
        path = Path(path)
        file = path / TOKENIZER_FILE if path.is_dir() else path
        if not file.is_file():
            raise ModelError(f"no {TOKENIZER_FILE} found (a text checkpoint needs its fast tokenizer file)", path)
        try:
            tokenizer = Tokenizer.from_file(str(file))
        except Exception as error:  # noqa: BLE001 - the Rust side raises plain Exceptions
            raise ModelError(f"cannot read tokenizer ({error})", file) from None
        return cls(tokenizer, max_tokens, file)

    def save(self, path: Path) -> Path:
        return write_text_atomic(Path(path), self.tokenizer.to_str(pretty=True))

    def encode(self, texts: Sequence[str]) -> Encoded:
        """Token ids and attention masks, padded to the longest text (at most ``max_tokens``)."""
        encodings = self.tokenizer.encode_batch(list(texts))
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.long)
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.long)
        return Encoded(ids, mask, sum(1 for e in encodings if e.overflowing))

    def count_tokens(self, text: str) -> int:
        """Tokens ``text`` would take without truncation (special tokens included)."""
        encoding = self.tokenizer.encode(text)
        return len(encoding.ids) + sum(len(o.ids) for o in encoding.overflowing)


def warn_truncated(n_truncated: int, n_texts: int, max_tokens: int, what: str = "texts") -> None:
    if n_truncated:
        log.warning(
            "%d of %d %s are longer than %d tokens and were truncated (raise clip.max_tokens to keep more)",
            n_truncated,
            n_texts,
            what,
            max_tokens,
        )


class TextTower(nn.Module):
    """A Hugging Face text model plus pooling to one vector per text."""

    def __init__(self, model: nn.Module, pooling: str = "mean") -> None:
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ModelError(f"unknown text pooling '{pooling}': use mean or cls")
        self.model = model
        self.pooling = pooling

    @property
    def width(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def max_positions(self) -> int | None:
        value = getattr(self.model.config, "max_position_embeddings", None)
        return int(value) if value is not None else None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        states = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "cls":
            return states[:, 0]
        weights = attention_mask.unsqueeze(-1).to(states.dtype)
        return (states * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def build_text_model(
    vocab_size: int, max_tokens: int, width: int, layers: int, heads: int, dropout: float, pad_id: int
) -> nn.Module:
    """A small BERT encoder with random weights (the library class, so ``save_pretrained`` just works)."""
    require("transformers", "vlm", "text models")
    from transformers import BertConfig, BertModel  # here: transformers takes seconds to import

    if width % heads:
        raise ModelError(f"text width {width} must be divisible by the number of heads {heads}")
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * width,
        max_position_embeddings=max_tokens,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        pad_token_id=pad_id,
    )
    # BERT's pooler stays although the tower pools itself: without it, AutoModel would re-create it at load time
    # with random weights and report them as missing. It gets no gradient, so it costs only its weights.
    return BertModel(config)


def load_text_model(folder: Path | str) -> nn.Module:
    """A local Hugging Face text checkpoint (never downloads; safetensors or weights_only loading by transformers)."""
    require("transformers", "vlm", "text models")
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per small model folder is noise in a CLI log
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ModelError("not a Hugging Face model folder (no config.json)", folder)
    try:
        # trust_remote_code=False: a folder whose config names its own Python code (auto_map) is refused, never
        # run, and never prompts (transformers asks interactively when this is left unset).
        model = AutoModel.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except pickle.UnpicklingError:
        # transformers reads .bin files with torch.load(weights_only=True), which refuses pickled Python objects.
        raise ModelError(
            "refused: the weights file pickles Python objects besides tensors, and medfoundry never unpickles "
            "arbitrary code; save the model with safe_serialization=True (model.safetensors) on a trusted machine",
            folder,
        ) from None
    except (OSError, ValueError, RuntimeError, KeyError, EOFError) as error:
        first = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", str(error)).split())[:300]  # no terminal colour codes
        raise ModelError(f"cannot load text model ({type(error).__name__}: {first})", folder) from None
    if not hasattr(model.config, "hidden_size"):
        raise ModelError("text model config has no hidden_size; only encoder text models are supported", folder)
    return model


def save_text_model(model: nn.Module, folder: Path) -> None:
    """``save_pretrained`` (config.json + model.safetensors) into ``folder``."""
    require("transformers", "vlm", "text models")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model.save_pretrained(str(folder), safe_serialization=True)
