"""The public foundation models medfoundry can load from local files, one frozen entry each.

Every entry names the exact timm architecture (builder name plus keyword arguments, JSON-serialisable so a
saved copy's ``config.json`` stays readable by timm), the preprocessing the authors used, the token the
encoder exposes, the licence and where the weights are published. Weights are never fetched: the user brings
the files (see docs/models.md). ``test_kwargs`` is a narrow, shallow variant with the same structure, used by
the round-trip tests where the real model is too large for a laptop.

Sources for each architecture are the models' published ``config.json`` files and model cards; details that
could not be checked against a published config are said so in ``notes``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from medfoundry.errors import ModelError
from medfoundry.models.public.ctfm import CTFM_ARCHITECTURE
from medfoundry.registry import Registry, UnknownModelError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

#: Exposed token -> Encoder pool. "cls" uses timm's own token pooling (after the final norm).
TOKEN_POOLS = {"cls": "default", "mean": "avg", "cls+mean": "token+avg", "pooled": "default"}


@dataclass(frozen=True)
class PublicModel:
    """One public foundation model: architecture, preprocessing, exposed token, licence and provenance."""

    name: str
    title: str
    domain: str
    timm_name: str
    timm_kwargs: MappingProxyType[str, Any]
    input_size: int | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    token: str
    licence: str
    weights: str
    key_format: str
    architecture: str
    test_kwargs: MappingProxyType[str, Any]
    notes: str = ""
    weight_files: tuple[str, ...] = field(default=())

    @property
    def in_chans(self) -> int:
        return len(self.mean)

    @property
    def pool(self) -> str:
        return TOKEN_POOLS[self.token]

    def build_kwargs(self, variant: str = "full") -> dict[str, Any]:
        """The timm keyword arguments of the real model (``full``) or of its small ``test`` variant."""
        if variant == "full":
            return dict(self.timm_kwargs)
        if variant == "test":
            return {**self.timm_kwargs, **self.test_kwargs}
        raise ModelError(f"unknown variant '{variant}' for public model '{self.name}': use 'full' or 'test'")


# Every entry is registered below, in this file: the registry needs no modules to import.
PUBLIC_MODELS: Registry[PublicModel] = Registry("public model", error=UnknownModelError)


def register_public(name: str, *, timm_kwargs: dict[str, Any], test_kwargs: dict[str, Any], **fields: Any) -> None:
    """Register one entry (a value, hence no decorator); the mappings are frozen so an entry cannot drift."""
    if fields["token"] not in TOKEN_POOLS:
        raise ValueError(f"token must be one of {sorted(TOKEN_POOLS)}")
    PUBLIC_MODELS.add(
        name,
        PublicModel(
            name=name, timm_kwargs=MappingProxyType(timm_kwargs), test_kwargs=MappingProxyType(test_kwargs), **fields
        ),
    )


def get_public_model(name: str) -> PublicModel:
    """The entry for ``name``, in any case and with - for _ ("UNI2-h" is uni2_h)."""
    return PUBLIC_MODELS.get(name.strip().lower().replace("-", "_"))


def list_public_models() -> list[PublicModel]:
    return [entry for _, entry in PUBLIC_MODELS.items()]


# Test variants: same builder and same structural switches (registers, layer scale, SwiGLU, mlp ratio,
# patch size), only narrower (embed_dim), shallower (depth) and smaller (img_size).
_TEST_VIT16 = {"img_size": 32, "embed_dim": 32, "depth": 2, "num_heads": 2}
_TEST_VIT14 = {"img_size": 42, "embed_dim": 48, "depth": 2, "num_heads": 2}

# -- pathology ------------------------------------------------------------------------------------------------
register_public(
    "uni",
    title="UNI",
    domain="pathology",
    timm_name="vit_large_patch16_224",
    timm_kwargs={"img_size": 224, "patch_size": 16, "init_values": 1e-5, "dynamic_img_size": True},
    input_size=224,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    token="cls",
    licence="CC-BY-NC-ND-4.0 (gated, non-commercial research)",
    weights="huggingface.co/MahmoodLab/UNI (pytorch_model.bin, timm keys)",
    key_format="timm",
    architecture="ViT-L/16, 1024 wide, 24 blocks, 16 heads, layer scale 1e-5, 224 px",
    test_kwargs=_TEST_VIT16,
    weight_files=("pytorch_model.bin",),
)
register_public(
    "uni2_h",
    title="UNI2-h",
    domain="pathology",
    # timm's vit_giant_patch14_dinov2 builder supplies mlp_layer=SwiGLUPacked and act_layer=SiLU, which the
    # model card passes as Python objects; naming the builder keeps these kwargs JSON-serialisable.
    timm_name="vit_giant_patch14_dinov2",
    timm_kwargs={
        "img_size": 224,
        "patch_size": 14,
        "embed_dim": 1536,
        "depth": 24,
        "num_heads": 24,
        "init_values": 1e-5,
        "mlp_ratio": 2.66667 * 2,
        "no_embed_class": True,
        "reg_tokens": 8,
        "dynamic_img_size": True,
    },
    input_size=224,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    token="cls",
    licence="CC-BY-NC-ND-4.0 (gated, non-commercial research)",
    weights="huggingface.co/MahmoodLab/UNI2-h (pytorch_model.bin, timm keys)",
    key_format="timm",
    architecture="ViT-H/14-like: 1536 wide, 24 blocks, 24 heads, SwiGLU (packed, mlp ratio 5.33), "
    "8 register tokens, no position embedding on prefix tokens, layer scale 1e-5, 224 px",
    test_kwargs=_TEST_VIT14,
    notes="Model card builds timm 'vit_giant_patch14_224' with mlp_layer=SwiGLUPacked, act_layer=SiLU; "
    "same module tree and keys as the builder used here (checked by the round-trip test).",
    weight_files=("pytorch_model.bin",),
)
register_public(
    "virchow2",
    title="Virchow2",
    domain="pathology",
    timm_name="vit_giant_patch14_dinov2",
    timm_kwargs={
        "img_size": 224,
        "patch_size": 14,
        "embed_dim": 1280,
        "depth": 32,
        "num_heads": 16,
        "init_values": 1e-5,
        "mlp_ratio": 5.3375,
        "no_embed_class": False,
        "reg_tokens": 4,
        "dynamic_img_size": True,
    },
    input_size=224,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    token="cls+mean",
    licence="CC-BY-NC-ND-4.0 (gated, non-commercial research)",
    weights="huggingface.co/paige-ai/Virchow2 (model.safetensors / pytorch_model.bin, timm keys)",
    key_format="timm",
    architecture="ViT-H/14: 1280 wide, 32 blocks, 16 heads, SwiGLU (packed, mlp ratio 5.3375), 4 register "
    "tokens, layer scale 1e-5, 224 px; embedding = CLS concatenated with the mean of patch tokens (2560)",
    test_kwargs=_TEST_VIT14,
    notes="Published as timm 'vit_huge_patch14_224' + mlp_layer=SwiGLUPacked, act_layer=SiLU (model card). "
    "mlp_ratio 5.3375 and reg_tokens 4 are from the hub config.json as quoted by users; the config file itself "
    "could not be opened here. The mean skips the CLS and the 4 registers (output[:, 5:]), as the card does.",
    weight_files=("model.safetensors", "pytorch_model.bin"),
)
register_public(
    "phikon",
    title="Phikon",
    domain="pathology",
    timm_name="vit_base_patch16_224",
    timm_kwargs={"img_size": 224, "patch_size": 16, "dynamic_img_size": True},
    input_size=224,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    token="cls",
    licence="Owkin non-commercial licence (hub tag 'other'); read the model card",
    weights="huggingface.co/owkin/phikon (transformers ViTModel: config.json + pytorch_model.bin/safetensors)",
    key_format="hf-vit",
    architecture="ViT-B/16 (iBOT), 768 wide, 12 blocks, 12 heads, no layer scale, 224 px; CLS of last_hidden_state",
    test_kwargs=_TEST_VIT16,
    notes="HF config uses layer_norm_eps 1e-12; timm's ViT uses 1e-6 (outputs differ by about 1e-6 relative). "
    "The HF pooler (dense + tanh) is not part of Phikon's embedding and is dropped.",
    weight_files=("model.safetensors", "pytorch_model.bin"),
)
register_public(
    "phikon_v2",
    title="Phikon-v2",
    domain="pathology",
    timm_name="vit_large_patch16_224",
    timm_kwargs={"img_size": 224, "patch_size": 16, "init_values": 1e-5, "dynamic_img_size": True},
    input_size=224,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    token="cls",
    licence="Owkin non-commercial licence (hub tag 'other'); read the model card",
    weights="huggingface.co/owkin/phikon-v2 (transformers Dinov2Model)",
    key_format="dinov2",
    architecture="ViT-L/16 (DINOv2), 1024 wide, 24 blocks, 16 heads, layer scale, 224 px; CLS",
    test_kwargs=_TEST_VIT16,
    notes="Dinov2Model with patch 16 at 224 px per its users' descriptions; the hub config.json could not be "
    "opened here, and a loaded config.json is checked against these dimensions. init_values only sets the "
    "initial layer scale; the loaded weights replace it.",
    weight_files=("model.safetensors", "pytorch_model.bin"),
)
register_public(
    "h_optimus_0",
    title="H-optimus-0",
    domain="pathology",
    timm_name="vit_giant_patch14_reg4_dinov2",
    timm_kwargs={"img_size": 224, "init_values": 1e-5, "dynamic_img_size": False},
    input_size=224,
    mean=(0.707223, 0.578729, 0.703617),
    std=(0.211883, 0.230117, 0.177517),
    token="cls",
    licence="Apache-2.0",
    weights="huggingface.co/bioptimus/H-optimus-0 (timm config.json + model.safetensors)",
    key_format="timm",
    architecture="ViT-g/14 (DINOv2): 1536 wide, 40 blocks, 24 heads, SwiGLU, 4 register tokens, "
    "layer scale 1e-5, 224 px",
    test_kwargs=_TEST_VIT14,
    weight_files=("model.safetensors", "pytorch_model.bin"),
)
register_public(
    "prov_gigapath",
    title="Prov-GigaPath (tile encoder)",
    domain="pathology",
    timm_name="vit_giant_patch14_dinov2",
    timm_kwargs={
        "img_size": 224,
        "patch_size": 16,
        "embed_dim": 1536,
        "depth": 40,
        "num_heads": 24,
        "init_values": 1e-5,
        "mlp_ratio": 5.33334,
        "dynamic_img_size": True,
    },
    input_size=224,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    token="cls",
    licence="Prov-GigaPath licence (hub tag apache-2.0, gated; research use per the model card)",
    weights="huggingface.co/prov-gigapath/prov-gigapath (pytorch_model.bin, timm keys)",
    key_format="timm",
    architecture="ViT-g/16 (DINOv2 recipe): 1536 wide, 40 blocks, 24 heads, SwiGLU, layer scale 1e-5, 224 px",
    test_kwargs={**_TEST_VIT16, "embed_dim": 48},
    notes="hub config.json: architecture vit_giant_patch14_dinov2 with model_args patch_size 16, img_size 224, "
    "mlp_ratio 5.33334 (recalled; the file could not be opened here). Only the tile encoder; the slide encoder "
    "(LongNet) is not included.",
    weight_files=("pytorch_model.bin",),
)
register_public(
    "conch",
    title="CONCH (vision tower)",
    domain="pathology",
    timm_name="vit_base_patch16_224",
    timm_kwargs={"img_size": 448, "patch_size": 16, "dynamic_img_size": True},
    input_size=448,
    mean=OPENAI_CLIP_MEAN,
    std=OPENAI_CLIP_STD,
    token="cls",
    licence="CC-BY-NC-ND-4.0 (gated, non-commercial research)",
    weights="huggingface.co/MahmoodLab/CONCH (pytorch_model.bin, CoCa keys; image trunk under visual.trunk.)",
    key_format="open_clip-trunk",
    architecture="CoCa image trunk: timm ViT-B/16, 768 wide, 12 blocks, 12 heads, 448 px; CLS of the trunk",
    test_kwargs=_TEST_VIT16,
    notes="CONCH's own image embedding (encode_image, 512-d) is the attentional pooler attn_pool_contrast + "
    "ln_contrast on the trunk tokens; those weights are dropped and the trunk's CLS token (768-d) is exposed "
    "instead. open_clip is not a dependency here; the trunk is a plain timm VisionTransformer "
    "(conch/open_clip_custom/coca_model.py).",
    weight_files=("pytorch_model.bin",),
)
# -- ophthalmology --------------------------------------------------------------------------------------------
register_public(
    "retfound_mae",
    title="RETFound (MAE)",
    domain="ophthalmology",
    timm_name="vit_large_patch16_224",
    timm_kwargs={"img_size": 224, "patch_size": 16, "dynamic_img_size": True},
    input_size=224,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    token="mean",
    licence="CC-BY-NC-4.0",
    weights="github.com/rmaphoh/RETFound_MAE; huggingface.co/YukunZhou/RETFound_mae_natureCFP and "
    "RETFound_mae_natureOCT (.pth with a 'model' sub-dict of MAE keys)",
    key_format="mae",
    architecture="ViT-L/16 (MAE), 1024 wide, 24 blocks, 16 heads, no layer scale, 224 px; mean of patch tokens",
    test_kwargs=_TEST_VIT16,
    notes="RETFound fine-tunes with global_pool (mean of patch tokens, then a freshly initialised fc_norm); the "
    "pre-trained file has the MAE encoder's final norm instead, so the exposed feature is the mean of the "
    "final-normed patch tokens. MAE checkpoints that also pickle argparse 'args' are refused by "
    "weights_only loading; see docs/models.md for converting them.",
    weight_files=(),
)
register_public(
    "retfound_dinov2",
    title="RETFound (DINOv2)",
    domain="ophthalmology",
    timm_name="vit_large_patch14_dinov2",
    timm_kwargs={"img_size": 224, "dynamic_img_size": True},
    input_size=224,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    token="cls",
    licence="CC-BY-NC-4.0",
    weights="huggingface.co/YukunZhou/RETFound_dinov2_meh and RETFound_dinov2_shanghai (.pth with a 'teacher' "
    "sub-dict, 'backbone.' prefix)",
    key_format="dinov2",
    architecture="ViT-L/14 (DINOv2), 1024 wide, 24 blocks, 16 heads, layer scale, 224 px; CLS",
    test_kwargs=_TEST_VIT14,
    notes="RETFound's main_finetune.py builds timm vit_large_patch14_dinov2 at img_size 224, takes "
    "checkpoint['teacher'], strips 'backbone.' and renames mlp.w12/w3; position embeddings of another grid are "
    "resampled (as RETFound does).",
    weight_files=(),
)
# -- radiology ------------------------------------------------------------------------------------------------
register_public(
    "rad_dino",
    title="RAD-DINO",
    domain="radiology (chest X-ray)",
    timm_name="vit_base_patch14_dinov2",
    timm_kwargs={"img_size": 518, "dynamic_img_size": True},
    input_size=518,
    mean=(0.5307, 0.5307, 0.5307),
    std=(0.2583, 0.2583, 0.2583),
    token="cls",
    licence="MSRLA (Microsoft Research Licence Agreement); later model-card revisions say MIT",
    weights="huggingface.co/microsoft/rad-dino (transformers Dinov2Model; also an original-DINOv2 checkpoint)",
    key_format="dinov2",
    architecture="ViT-B/14 (DINOv2), 768 wide, 12 blocks, 12 heads, layer scale, 518 px; CLS",
    test_kwargs=_TEST_VIT14,
    notes="Normalisation from the hub preprocessor_config.json as recalled (mean 0.5307, std 0.2583, grey "
    "replicated to 3 channels); could not be re-checked here. Images are resized/cropped to 518 px.",
    weight_files=("model.safetensors",),
)
register_public(
    "ct_fm",
    title="CT-FM (feature extractor)",
    domain="radiology (3D CT)",
    timm_name=CTFM_ARCHITECTURE,
    timm_kwargs={"in_chans": 1, "init_filters": 32, "blocks_down": [1, 2, 2, 4, 4], "act": "relu", "norm": "batch"},
    input_size=None,
    mean=(0.0,),
    std=(1.0,),
    token="pooled",
    licence="see the project-lighter model card (not verified here)",
    weights="huggingface.co/project-lighter/ct_fm_feature_extractor (model.safetensors, MONAI SegResEncoder keys)",
    key_format="monai",
    architecture="MONAI SegResEncoder (3D), 32 initial filters, blocks_down (1, 2, 2, 4, 4), batch norm, ReLU; "
    "global average of the deepest level (512)",
    test_kwargs={"init_filters": 4, "blocks_down": [1, 1, 2]},
    notes="Input: CT in HU clipped to [-1024, 2048] and scaled to 0..1 (ScaleIntensityRange), orientation SPL, "
    "so the encoder's own mean/std are the identity. Fully convolutional: any volume size. act/norm are "
    "MONAI's defaults, which CT-FM's code does not override.",
    weight_files=("model.safetensors",),
)
register_public(
    "biomedclip",
    title="BiomedCLIP (vision tower)",
    domain="biomedical (PMC figures)",
    timm_name="vit_base_patch16_224",
    timm_kwargs={"img_size": 224, "patch_size": 16, "dynamic_img_size": True},
    input_size=224,
    mean=OPENAI_CLIP_MEAN,
    std=OPENAI_CLIP_STD,
    token="cls",
    licence="MIT",
    weights="huggingface.co/microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224 "
    "(open_clip_pytorch_model.bin; image trunk under visual.trunk.)",
    key_format="open_clip-trunk",
    architecture="open_clip TimmModel over timm vit_base_patch16_224 (768 wide, 12 blocks), 224 px; CLS of the trunk",
    test_kwargs=_TEST_VIT16,
    notes="open_clip_config.json: timm_pool '' (trunk keeps its CLS pooling), timm_proj 'linear' (768 -> 512, "
    "visual.head.proj). The CLIP embedding is that projection of the CLS; the projection is dropped and the "
    "768-d CLS exposed.",
    weight_files=("open_clip_pytorch_model.bin",),
)
# -- general-purpose DINOv2 -----------------------------------------------------------------------------------
_DINOV2 = (
    ("dinov2_vits14", "DINOv2 ViT-S/14", "vit_small_patch14_dinov2", "small", "384 wide, 12 blocks, 6 heads"),
    ("dinov2_vitb14", "DINOv2 ViT-B/14", "vit_base_patch14_dinov2", "base", "768 wide, 12 blocks, 12 heads"),
    ("dinov2_vitl14", "DINOv2 ViT-L/14", "vit_large_patch14_dinov2", "large", "1024 wide, 24 blocks, 16 heads"),
    ("dinov2_vitg14", "DINOv2 ViT-g/14", "vit_giant_patch14_dinov2", "giant", "1536 wide, 40 blocks, 24 heads, SwiGLU"),
)
for _name, _title, _timm, _hf, _dims in _DINOV2:
    register_public(
        _name,
        title=_title,
        domain="natural images (baseline)",
        timm_name=_timm,
        timm_kwargs={"img_size": 224, "dynamic_img_size": True},
        input_size=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        token="cls",
        licence="Apache-2.0",
        weights=f"huggingface.co/facebook/dinov2-{_hf} (transformers Dinov2Model) or dl.fbaipublicfiles.com/dinov2/"
        f"{_name}/{_name}_pretrain.pth (original keys)",
        key_format="dinov2",
        architecture=f"ViT (DINOv2), {_dims}, layer scale, patch 14; weights at 518 px, used at 224 px; CLS",
        test_kwargs=_TEST_VIT14,
        notes="Position embeddings are trained for 518 px (37x37 patches) and resampled to the 224 px grid at "
        "load (bicubic, timm); pass a 518 px variant through timm_kwargs to keep them. The DINOv2 paper's "
        "linear probes concatenate CLS and mean patch tokens; the exposed token here is the CLS (HF pooler).",
        weight_files=("model.safetensors", "pytorch_model.bin"),
    )
