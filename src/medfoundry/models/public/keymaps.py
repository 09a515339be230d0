"""Upstream parameter names to timm's, one function per published layout.

Each mapper takes the tensors as read from the file (after a ``model`` / ``teacher`` / ``state_dict`` sub-dict
was picked) and returns them under timm's names. Keys that only training or another tower uses (MAE decoder,
DINO heads, CLIP text tower, HF pooler) are dropped here on purpose; anything else left over is reported as
unexpected by the loader, so a wrong file never loads silently.

Own code rather than ``timm``'s ``checkpoint_filter_fn``: timm's filters convert the original DINOv2 / MAE
layouts but not Hugging Face's ``ViTModel`` / ``Dinov2Model`` layouts, and they drop unknown keys silently.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

StateDict = dict[str, torch.Tensor]
KeyMapper = Callable[[StateDict], StateDict]


def strip_prefix(state: StateDict, *prefixes: str) -> StateDict:
    """Remove the first matching prefix from every key (DDP's ``module.``, Lightning's ``model.``...)."""
    out: StateDict = {}
    for key, value in state.items():
        for prefix in prefixes:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                break
        out[key] = value
    return out


def _drop(state: StateDict, *prefixes: str) -> StateDict:
    return {k: v for k, v in state.items() if not k.startswith(prefixes)}


def timm_native(state: StateDict) -> StateDict:
    """Weights already saved from a timm model (UNI, UNI2-h, Virchow2, H-optimus-0, Prov-GigaPath)."""
    return _drop(strip_prefix(state, "module."), "head.")


# Hugging Face ViTModel / Dinov2Model as written on the Hub (transformers 4 names; transformers 5 writes the
# same names back when saving). Order matters: the first matching pattern wins.
_HF_RENAMES: tuple[tuple[str, str], ...] = (
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.register_tokens$", "reg_token"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layer\.(\d+)\.layernorm_before\.", r"blocks.\1.norm1."),
    (r"^encoder\.layer\.(\d+)\.layernorm_after\.", r"blocks.\1.norm2."),
    (r"^encoder\.layer\.(\d+)\.intermediate\.dense\.", r"blocks.\1.mlp.fc1."),
    (r"^encoder\.layer\.(\d+)\.output\.dense\.", r"blocks.\1.mlp.fc2."),
    (r"^encoder\.layer\.(\d+)\.norm([12])\.", r"blocks.\1.norm\2."),
    (r"^encoder\.layer\.(\d+)\.layer_scale([12])\.lambda1$", r"blocks.\1.ls\2.gamma"),
    (r"^encoder\.layer\.(\d+)\.mlp\.(fc[12])\.", r"blocks.\1.mlp.\2."),
    (r"^encoder\.layer\.(\d+)\.mlp\.weights_in\.", r"blocks.\1.mlp.fc1."),
    (r"^encoder\.layer\.(\d+)\.mlp\.weights_out\.", r"blocks.\1.mlp.fc2."),
    (r"^layernorm\.", "norm."),
)
_HF_QKV = re.compile(r"^encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)$")


def hf_vit(state: StateDict) -> StateDict:
    """transformers ``ViTModel`` / ``Dinov2Model`` keys to timm; separate q, k, v fused into ``attn.qkv``."""
    state = strip_prefix(state, "module.", "vit.", "dinov2.")
    state = _drop(state, "pooler.", "classifier.", "embeddings.mask_token")
    out: StateDict = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        match = _HF_QKV.match(key)
        if match:
            block, part, kind = match.groups()
            qkv.setdefault((block, kind), {})[part] = value
            continue
        for pattern, replacement in _HF_RENAMES:
            new, hits = re.subn(pattern, replacement, key)
            if hits:
                key = new
                break
        out[key] = value
    for (block, kind), parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            # Leave the incomplete parts under their own names so the loader reports them as unexpected.
            out.update({f"encoder.layer.{block}.attention.attention.{p}.{kind}": v for p, v in parts.items()})
            continue
        # timm's qkv Linear stacks q, k, v along the output dimension, in that order.
        out[f"blocks.{block}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
    return out


_CHUNKED_BLOCK = re.compile(r"^blocks\.\d+\.(\d+)\.")


def dinov2_original(state: StateDict) -> StateDict:
    """facebookresearch/dinov2 keys (hub ``.pth`` or a training ``teacher`` dict) to timm.

    Training checkpoints nest blocks in chunks (``blocks.<chunk>.<index>``, the index being global) and carry
    ``backbone.`` prefixes and DINO/iBOT heads; the giant model's SwiGLU is ``mlp.w12`` / ``mlp.w3``.
    """
    state = strip_prefix(state, "module.", "backbone.")
    state = _drop(state, "dino_head.", "ibot_head.", "mask_token", "head.")
    out: StateDict = {}
    for key, value in state.items():
        key = _CHUNKED_BLOCK.sub(r"blocks.\1.", key)
        key = key.replace(".mlp.w12.", ".mlp.fc1.").replace(".mlp.w3.", ".mlp.fc2.")
        key = "reg_token" if key == "register_tokens" else key
        out[key] = value
    return out


def dinov2_any(state: StateDict) -> StateDict:
    """DINOv2 weights in either published layout: Hugging Face ``Dinov2Model`` or the original repository's."""
    hf_like = any(k.split(".", 1)[0] in ("embeddings", "encoder", "dinov2") for k in state)
    return hf_vit(state) if hf_like else dinov2_original(state)


def mae(state: StateDict) -> StateDict:
    """MAE pre-training checkpoints (RETFound-MAE): encoder keys are timm's; the decoder is dropped."""
    state = strip_prefix(state, "module.")
    return _drop(state, "decoder_", "mask_token", "head.")


def open_clip_visual_trunk(state: StateDict) -> StateDict:
    """open_clip-style CLIP/CoCa checkpoints whose image tower is a timm model under ``visual.trunk.``.

    The projection head, attentional poolers and the text tower are dropped (they are not the image encoder's
    token); a file that already holds only the trunk is taken as it is.
    """
    state = strip_prefix(state, "module.")
    if any(k.startswith("visual.trunk.") for k in state):
        state = {k[len("visual.trunk.") :]: v for k, v in state.items() if k.startswith("visual.trunk.")}
    return _drop(state, "head.")


def monai_native(state: StateDict) -> StateDict:
    """MONAI networks saved directly (CT-FM's hub ``model.safetensors``) or from Lightning (``model.`` prefix)."""
    return strip_prefix(state, "module.", "model.", "backbone.")


KEY_MAPPERS: dict[str, KeyMapper] = {
    "timm": timm_native,
    "hf-vit": hf_vit,
    "dinov2": dinov2_any,
    "mae": mae,
    "open_clip-trunk": open_clip_visual_trunk,
    "monai": monai_native,
}
