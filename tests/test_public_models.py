"""Public foundation models: every registry entry round-trips through its upstream file layout.

For each entry a small variant of the *upstream* module is built with random weights (the real transformers
``ViTModel`` / ``Dinov2Model`` for Hugging Face models, the timm model as the authors' recipe builds it for
timm-native ones, MONAI's SegResEncoder for CT-FM), its weights are written in the upstream format and key
names, loaded back through the registry, and the registry's Encoder must give the upstream embedding.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from threadpoolctl import threadpool_limits
from timm.layers import SwiGLUPacked
from timm.models.vision_transformer import VisionTransformer
from typer.testing import CliRunner

from medfoundry.errors import ModelError
from medfoundry.models.checkpoint import load_encoder, load_encoder_or_build, save_encoder
from medfoundry.models.loading import load_public_encoder
from medfoundry.models.names import parse_public_spec
from medfoundry.models.public import PUBLIC_MODELS, get_public_model


@pytest.fixture(autouse=True, scope="module")
def _one_thread():  # noqa: ANN202 - module-scoped, so the rest of the suite keeps its thread counts
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(threads)


Reference = Callable[[torch.Tensor], torch.Tensor]


def _randomise(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights everywhere (timm's init leaves layer scale at 1e-5, which would hide block mistakes)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict(keep_vars=True).items():
            if tensor.dtype.is_floating_point:
                values = torch.randn(tensor.shape, generator=generator) * 0.2
                tensor.copy_(values.abs() + 0.5 if name.endswith("running_var") else values)
    return module.eval()


def _test_dims(name: str) -> dict:
    return get_public_model(name).build_kwargs("test")


# -- upstream builders: (module, weights path written in the upstream layout, reference embedding) ------------


def _timm_recipe(name: str, timm_name: str, tmp: Path, **recipe) -> tuple[Path, Reference]:
    """A timm-native model as its model card builds it, with the test variant's dimensions."""
    dims = {k: v for k, v in _test_dims(name).items() if k in ("img_size", "embed_dim", "depth", "num_heads")}
    model = _randomise(timm.create_model(timm_name, pretrained=False, num_classes=0, **{**recipe, **dims}), 1)
    return model, dims


def upstream_uni(tmp: Path) -> tuple[Path, Reference]:
    model, _ = _timm_recipe("uni", "vit_large_patch16_224", tmp, patch_size=16, init_values=1e-5, dynamic_img_size=True)
    (tmp / "uni").mkdir()
    torch.save(model.state_dict(), tmp / "uni" / "pytorch_model.bin")  # the hub snapshot layout
    return tmp / "uni", model


def upstream_uni2_h(tmp: Path) -> tuple[Path, Reference]:
    recipe = dict(
        patch_size=14,
        init_values=1e-5,
        mlp_ratio=2.66667 * 2,
        no_embed_class=True,
        mlp_layer=SwiGLUPacked,
        act_layer=torch.nn.SiLU,
        reg_tokens=8,
        dynamic_img_size=True,
    )
    model, _ = _timm_recipe("uni2_h", "vit_giant_patch14_224", tmp, **recipe)
    torch.save(model.state_dict(), tmp / "uni2_h.bin")
    return tmp / "uni2_h.bin", model


def upstream_virchow2(tmp: Path) -> tuple[Path, Reference]:
    recipe = dict(
        init_values=1e-5,
        mlp_ratio=5.3375,
        reg_tokens=4,
        global_pool="",
        dynamic_img_size=True,
        mlp_layer=SwiGLUPacked,
        act_layer=torch.nn.SiLU,
    )
    model, _ = _timm_recipe("virchow2", "vit_huge_patch14_224", tmp, **recipe)
    folder = tmp / "virchow2"
    folder.mkdir()
    save_file(model.state_dict(), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(
        json.dumps({"architecture": "vit_huge_patch14_224", "model_args": recipe | {}}, default=str)
    )

    def reference(x: torch.Tensor) -> torch.Tensor:  # the model card's embedding: CLS + mean of patch tokens
        tokens = model(x)
        return torch.cat([tokens[:, 0], tokens[:, 5:].mean(dim=1)], dim=-1)

    return folder, reference


def upstream_h_optimus_0(tmp: Path) -> tuple[Path, Reference]:
    model, _ = _timm_recipe(
        "h_optimus_0", "vit_giant_patch14_reg4_dinov2", tmp, init_values=1e-5, dynamic_img_size=False
    )
    save_file(model.state_dict(), str(tmp / "h_optimus_0.safetensors"))
    return tmp / "h_optimus_0.safetensors", model


def upstream_prov_gigapath(tmp: Path) -> tuple[Path, Reference]:
    recipe = dict(patch_size=16, in_chans=3, init_values=1e-5, mlp_ratio=5.33334)
    model, _ = _timm_recipe("prov_gigapath", "vit_giant_patch14_dinov2", tmp, **recipe)
    (tmp / "gigapath").mkdir()
    torch.save(model.state_dict(), tmp / "gigapath" / "pytorch_model.bin")
    return tmp / "gigapath", model


def _hf_vit_config(name: str, **extra):
    from transformers import ViTConfig

    dims = _test_dims(name)
    return ViTConfig(
        hidden_size=dims["embed_dim"],
        num_hidden_layers=dims["depth"],
        num_attention_heads=dims["num_heads"],
        intermediate_size=4 * dims["embed_dim"],
        image_size=dims["img_size"],
        patch_size=dims.get("patch_size", 16),
        layer_norm_eps=1e-12,  # Phikon's published config
        **extra,
    )


def upstream_phikon(tmp: Path) -> tuple[Path, Reference]:
    from transformers import ViTModel

    model = _randomise(ViTModel(_hf_vit_config("phikon")), 2)
    model.save_pretrained(tmp / "phikon")  # config.json + model.safetensors, Hub key names
    return tmp / "phikon", lambda x: model(pixel_values=x).last_hidden_state[:, 0]


def _hf_dinov2(name: str, tmp: Path, patch_size: int = 14, swiglu: bool = False) -> tuple[Path, Reference]:
    from transformers import Dinov2Config, Dinov2Model

    dims = _test_dims(name)
    config = Dinov2Config(
        hidden_size=dims["embed_dim"],
        num_hidden_layers=dims["depth"],
        num_attention_heads=dims["num_heads"],
        image_size=dims["img_size"],
        patch_size=patch_size,
        mlp_ratio=4,
        use_swiglu_ffn=swiglu,
    )
    model = _randomise(Dinov2Model(config), 3)
    model.save_pretrained(tmp / name)
    return tmp / name, lambda x: model(pixel_values=x).pooler_output  # layernorm(CLS)


def upstream_phikon_v2(tmp: Path) -> tuple[Path, Reference]:
    return _hf_dinov2("phikon_v2", tmp, patch_size=16)


def upstream_rad_dino(tmp: Path) -> tuple[Path, Reference]:
    return _hf_dinov2("rad_dino", tmp)


def upstream_dinov2_vits14(tmp: Path) -> tuple[Path, Reference]:
    return _hf_dinov2("dinov2_vits14", tmp)


def upstream_dinov2_vitb14(tmp: Path) -> tuple[Path, Reference]:
    return _hf_dinov2("dinov2_vitb14", tmp)


def upstream_dinov2_vitl14(tmp: Path) -> tuple[Path, Reference]:
    return _hf_dinov2("dinov2_vitl14", tmp)


def upstream_dinov2_vitg14(tmp: Path) -> tuple[Path, Reference]:
    return _hf_dinov2("dinov2_vitg14", tmp, swiglu=True)


def upstream_dinov2_vitg14_original(tmp: Path) -> tuple[Path, Reference]:
    """facebookresearch/dinov2's own .pth layout for the giant: SwiGLU as mlp.w12 / mlp.w3, a mask token."""
    model, _ = _timm_recipe("dinov2_vitg14", "vit_giant_patch14_dinov2", tmp)
    state = {
        k.replace(".mlp.fc1.", ".mlp.w12.").replace(".mlp.fc2.", ".mlp.w3."): v for k, v in model.state_dict().items()
    }
    state["mask_token"] = torch.zeros(1, model.embed_dim)
    torch.save(state, tmp / "dinov2_vitg14_pretrain.pth")
    return tmp / "dinov2_vitg14_pretrain.pth", model


def upstream_retfound_dinov2(tmp: Path) -> tuple[Path, Reference]:
    """RETFound's DINOv2 training file: a 'teacher' dict, 'backbone.' prefixes, chunked blocks, DINO/iBOT heads."""
    model, _ = _timm_recipe("retfound_dinov2", "vit_large_patch14_dinov2", tmp)
    teacher = {}
    for key, value in model.state_dict().items():
        if key.startswith("blocks."):
            index = int(key.split(".")[1])
            key = f"blocks.{index}.{key[len('blocks.') :]}"  # block_chunks == depth: chunk i holds block i
        teacher[f"backbone.{key}"] = value
    teacher["backbone.mask_token"] = torch.zeros(1, model.embed_dim)
    teacher["dino_head.mlp.0.weight"] = torch.zeros(8, model.embed_dim)
    teacher["ibot_head.last_layer.weight_g"] = torch.zeros(8, 1)
    torch.save({"teacher": teacher, "iteration": torch.tensor(10)}, tmp / "RETFound_dinov2_meh.pth")
    return tmp / "RETFound_dinov2_meh.pth", model


def upstream_retfound_mae(tmp: Path) -> tuple[Path, Reference]:
    """MAE pre-training file: {'model': encoder + decoder + mask token, 'epoch': ...}; feature = mean patch token."""
    model, dims = _timm_recipe("retfound_mae", "vit_large_patch16_224", tmp, patch_size=16)
    state = dict(model.state_dict())
    state["mask_token"] = torch.zeros(1, 1, dims["embed_dim"])
    state["decoder_embed.weight"] = torch.zeros(16, dims["embed_dim"])
    state["decoder_blocks.0.norm1.weight"] = torch.ones(16)
    state["decoder_pred.weight"] = torch.zeros(768, 16)
    torch.save({"model": state, "epoch": 799}, tmp / "RETFound_mae_natureCFP.pth")
    return tmp / "RETFound_mae_natureCFP.pth", lambda x: model.forward_features(x)[:, 1:].mean(dim=1)


def upstream_conch(tmp: Path) -> tuple[Path, Reference]:
    """CONCH's CoCa: a plain timm VisionTransformer trunk (coca_model.py) under visual.trunk., plus other towers."""
    dims = _test_dims("conch")
    trunk = VisionTransformer(
        embed_dim=dims["embed_dim"],
        depth=dims["depth"],
        num_heads=dims["num_heads"],
        mlp_ratio=4,
        img_size=dims["img_size"],
        patch_size=16,
        num_classes=0,
        dynamic_img_size=True,
    )
    trunk = _randomise(trunk, 4)
    state = {f"visual.trunk.{k}": v for k, v in trunk.state_dict().items()}
    state["visual.attn_pool_contrast.query"] = torch.zeros(1, 16)
    state["visual.ln_contrast.weight"] = torch.ones(16)
    state["text.token_embedding.weight"] = torch.zeros(10, 16)
    state["logit_scale"] = torch.tensor(1.0)
    (tmp / "conch").mkdir()
    torch.save(state, tmp / "conch" / "pytorch_model.bin")
    return tmp / "conch", lambda x: trunk.forward_features(x)[:, 0]


def upstream_biomedclip(tmp: Path) -> tuple[Path, Reference]:
    """open_clip TimmModel: trunk = timm vit_base_patch16_224 with its classifier reset, linear proj under head."""
    dims = {k: v for k, v in _test_dims("biomedclip").items() if k != "dynamic_img_size"}
    trunk = timm.create_model("vit_base_patch16_224", pretrained=False, **dims)
    trunk.reset_classifier(0)
    trunk = _randomise(trunk, 5)
    state = {f"visual.trunk.{k}": v for k, v in trunk.state_dict().items()}
    state["visual.head.proj.weight"] = torch.zeros(16, dims["embed_dim"])
    state["text.transformer.embeddings.word_embeddings.weight"] = torch.zeros(10, 16)
    folder = tmp / "biomedclip"
    folder.mkdir()
    torch.save(state, folder / "open_clip_pytorch_model.bin")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"embed_dim": 16}}))
    return folder, trunk


def upstream_ct_fm(tmp: Path) -> tuple[Path, Reference]:
    """CT-FM's extractor as its code builds it: MONAI SegResEncoder + average pool of the last level."""
    from monai.networks.nets.segresnet_ds import SegResEncoder

    dims = _test_dims("ct_fm")
    model = SegResEncoder(
        init_filters=dims["init_filters"],
        blocks_down=tuple(dims["blocks_down"]),
        head_module=lambda x: torch.nn.functional.adaptive_avg_pool3d(x[-1], 1).flatten(start_dim=1),
    )
    model = _randomise(model, 6)
    folder = tmp / "ct_fm"
    folder.mkdir()
    save_file(model.state_dict(), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"blocks_down": dims["blocks_down"], "init_filters": 4}))
    return folder, model


UPSTREAM: dict[str, Callable[[Path], tuple[Path, Reference]]] = {
    "uni": upstream_uni,
    "uni2_h": upstream_uni2_h,
    "virchow2": upstream_virchow2,
    "phikon": upstream_phikon,
    "phikon_v2": upstream_phikon_v2,
    "h_optimus_0": upstream_h_optimus_0,
    "prov_gigapath": upstream_prov_gigapath,
    "conch": upstream_conch,
    "retfound_mae": upstream_retfound_mae,
    "retfound_dinov2": upstream_retfound_dinov2,
    "rad_dino": upstream_rad_dino,
    "ct_fm": upstream_ct_fm,
    "biomedclip": upstream_biomedclip,
    "dinov2_vits14": upstream_dinov2_vits14,
    "dinov2_vitb14": upstream_dinov2_vitb14,
    "dinov2_vitl14": upstream_dinov2_vitl14,
    "dinov2_vitg14": upstream_dinov2_vitg14,
}
CASES = [(name, name) for name in UPSTREAM] + [("dinov2_vitg14", "dinov2_vitg14_original")]
BUILDERS = {**UPSTREAM, "dinov2_vitg14_original": upstream_dinov2_vitg14_original}


def _input(name: str, n: int = 2) -> torch.Tensor:
    entry = get_public_model(name)
    generator = torch.Generator().manual_seed(0)
    if name == "ct_fm":
        return torch.randn(n, 1, 16, 16, 16, generator=generator)
    size = entry.build_kwargs("test")["img_size"]
    return torch.randn(n, entry.in_chans, size, size, generator=generator)


def test_every_registry_entry_has_a_round_trip_case() -> None:
    assert set(PUBLIC_MODELS) == set(UPSTREAM)


@pytest.mark.parametrize(("name", "case"), CASES, ids=[case for _, case in CASES])
@torch.inference_mode()
def test_round_trip_matches_the_upstream_module(name: str, case: str, tmp_path: Path) -> None:
    weights, reference = BUILDERS[case](tmp_path)
    encoder = load_public_encoder(name, weights, variant="test").eval()
    x = _input(name)
    expected = reference(x)
    got = encoder(x)
    assert got.shape == expected.shape == (x.shape[0], encoder.embed_dim)
    # Phikon: HF's LayerNorm eps is 1e-12, timm's 1e-6 (documented in the entry); all others are exact.
    tolerance = 1e-4 if name == "phikon" else 1e-5
    assert torch.allclose(got, expected, atol=tolerance, rtol=1e-4), (got - expected).abs().max()
    entry = get_public_model(name)
    assert encoder.pool == entry.pool
    assert encoder.mean.flatten().tolist() == pytest.approx(list(entry.mean))


@torch.inference_mode()
def test_spec_loads_everywhere_encoders_are_used_and_saves_as_a_checkpoint(tmp_path: Path) -> None:
    weights, reference = upstream_virchow2(tmp_path)
    spec = f"public:virchow2@test:{weights}"
    assert parse_public_spec(spec) == ("virchow2", "test", weights)
    encoder = load_encoder_or_build(spec, in_chans=3, img_size=None).eval()
    x = _input("virchow2")
    assert torch.allclose(encoder(x), reference(x), atol=1e-5)
    # A loaded public model is an ordinary Encoder: it saves and reloads as a medfoundry checkpoint.
    reloaded = load_encoder(save_encoder(encoder, tmp_path / "ckpt")).eval()
    assert reloaded.pool == "token+avg" and torch.equal(reloaded(x), encoder(x))
    # A suite names it in an encoder's checkpoint field, and a 2.5D wrapping of it takes CT volumes.
    from medfoundry.bench.engine import prepare_encoder
    from medfoundry.config import EncoderConfig

    in_suite = prepare_encoder(None, EncoderConfig(name="virchow2", checkpoint=spec), {}, False, print).eval()
    assert torch.equal(in_suite(x), encoder(x))
    over_slices = load_encoder_or_build(f"2.5d:{spec}", in_chans=1, img_size=None).eval()
    size = x.shape[-1]
    assert over_slices.is_3d and over_slices(torch.rand(1, 1, 3, size, size)).shape == (1, encoder.embed_dim)


def test_ct_fm_is_a_3d_encoder_and_reloads_from_a_checkpoint(tmp_path: Path) -> None:
    weights, _ = upstream_ct_fm(tmp_path)
    encoder = load_public_encoder("ct_fm", weights, variant="test").eval()
    assert encoder.is_3d and encoder.in_chans == 1 and encoder.embed_dim == 16
    reloaded = load_encoder(save_encoder(encoder, tmp_path / "ckpt")).eval()
    x = _input("ct_fm")
    with torch.inference_mode():
        assert torch.equal(reloaded(x), encoder(x))


# -- errors ----------------------------------------------------------------------------------------------------


def _uni_state(tmp: Path) -> dict[str, torch.Tensor]:
    model, _ = _timm_recipe("uni", "vit_large_patch16_224", tmp, patch_size=16, init_values=1e-5)
    return dict(model.state_dict())


def test_missing_and_unexpected_keys_are_listed_with_the_file(tmp_path: Path) -> None:
    state = _uni_state(tmp_path)
    del state["blocks.1.attn.qkv.weight"]
    state["blocks.9.extra.weight"] = torch.zeros(2)
    path = tmp_path / "uni_broken.safetensors"
    save_file(state, str(path))
    with pytest.raises(ModelError, match=r"1 missing \['blocks\.1\.attn\.qkv\.weight'\]") as info:
        load_public_encoder("uni", path, variant="test")
    assert "uni_broken.safetensors" in str(info.value)
    assert "1 unexpected ['blocks.9.extra.weight']" in str(info.value)


def test_wrong_shape_is_named(tmp_path: Path) -> None:
    state = _uni_state(tmp_path)
    state["blocks.0.mlp.fc1.weight"] = torch.zeros(7, 32)
    path = tmp_path / "uni_shape.safetensors"
    save_file(state, str(path))
    with pytest.raises(ModelError, match=r"blocks\.0\.mlp\.fc1\.weight is \(7, 32\), expected \(128, 32\)"):
        load_public_encoder("uni", path, variant="test")


@torch.inference_mode()
def test_position_embeddings_of_another_grid_are_resampled_as_timm_does(tmp_path: Path) -> None:
    """DINOv2 weights come at 518 px; a 224 px model resamples them (as timm and RETFound do)."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    dims = {**_test_dims("dinov2_vits14"), "img_size": 70}  # 5x5 patch grid in the file, 3x3 in the model
    source = _randomise(timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, **dims), 7)
    torch.save(dict(source.state_dict()), tmp_path / "dinov2_vits14_pretrain.pth")
    encoder = load_public_encoder("dinov2_vits14", tmp_path / "dinov2_vits14_pretrain.pth", variant="test").eval()
    target = timm.create_model(
        "vit_small_patch14_dinov2", pretrained=False, num_classes=0, **_test_dims("dinov2_vits14")
    )
    target.load_state_dict(checkpoint_filter_fn(dict(source.state_dict()), target))
    x = _input("dinov2_vits14")
    assert torch.allclose(encoder(x), target.eval()(x), atol=1e-6)


def test_pickled_python_objects_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "mae_with_args.pth"
    torch.save({"model": _uni_state(tmp_path), "args": argparse.Namespace(lr=1e-3)}, path)
    with pytest.raises(ModelError, match="refused: torch.load\\(weights_only=True\\)") as info:
        load_public_encoder("retfound_mae", path, variant="test")
    assert "mae_with_args.pth" in str(info.value)


def test_snapshot_config_of_another_model_is_named(tmp_path: Path) -> None:
    folder, _ = upstream_phikon(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 12}))
    with pytest.raises(ModelError, match=r"config\.json: this snapshot is not Phikon.*num_hidden_layers 12"):
        load_public_encoder("phikon", folder, variant="test")


def test_bad_specs_and_names() -> None:
    with pytest.raises(ModelError, match="needs a local weights path"):
        load_encoder_or_build("public:uni", in_chans=3, img_size=None)
    with pytest.raises(ModelError, match="unknown public model 'unknown'"):
        load_encoder_or_build("public:unknown:/nowhere", in_chans=3, img_size=None)
    with pytest.raises(ModelError, match="does not exist"):
        load_encoder_or_build("public:uni:/nowhere/uni.bin", in_chans=3, img_size=None)
    assert get_public_model("UNI2-h").name == "uni2_h"


# -- export and CLI -----------------------------------------------------------------------------------------


def test_export_is_loadable_by_timm_and_cli_lists_shows_exports(tmp_path: Path) -> None:
    from medfoundry.cli import app
    from medfoundry.models.backbones import create_encoder

    encoder = create_encoder("vit_tiny_28", in_chans=1, seed=0)
    ckpt = save_encoder(encoder, tmp_path / "ckpt", extra={"ssl_method": "dino", "data": "BreastMNIST train"})
    runner = CliRunner()
    result = runner.invoke(app, ["models", "export", str(ckpt), str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "vit_tiny_patch16_224" and config["num_features"] == 192
    assert config["pretrained_cfg"]["input_size"] == [1, 28, 28] and config["pretrained_cfg"]["mean"] == [0.5]
    card = (out / "README.md").read_text()
    for section in ("## Data", "BreastMNIST train", "## Method", "dino", "## Intended use", "## Licence"):
        assert section in card
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.inference_mode():
        assert torch.equal(model(x), encoder.eval()(x))
    listed = runner.invoke(app, ["models", "list"])
    assert listed.exit_code == 0 and "uni2_h" in listed.output and "vit_tiny_28" in listed.output
    shown = runner.invoke(app, ["models", "show", "h-optimus-0"])
    assert shown.exit_code == 0 and "0.707223" in shown.output and "Apache-2.0" in shown.output


# -- text towers: never remote code, never a pickle --------------------------------------------------------------


def _tiny_bert_folder(folder: Path) -> Path:
    from transformers import BertConfig

    BertConfig(
        vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16
    ).save_pretrained(folder)
    return folder


def test_text_loader_refuses_remote_code_explicitly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    from medfoundry.vlm.text import load_text_model

    folder = _tiny_bert_folder(tmp_path / "text")
    seen: dict = {}

    def from_pretrained(path: str, **kwargs: object) -> object:
        seen.update(kwargs)
        raise ValueError("stop here")

    # Left unset, transformers prompts on a terminal for a folder whose config has auto_map: False must be passed.
    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", from_pretrained)
    with pytest.raises(ModelError, match="cannot load text model"):
        load_text_model(folder)
    assert seen.get("trust_remote_code") is False and seen.get("local_files_only") is True


def test_text_loader_turns_a_pickled_checkpoint_into_one_line(tmp_path: Path) -> None:
    from medfoundry.vlm.text import load_text_model

    folder = _tiny_bert_folder(tmp_path / "text")
    torch.save({"args": argparse.Namespace(lr=0.1), "weight": torch.zeros(2)}, folder / "pytorch_model.bin")
    with pytest.raises(ModelError, match="refused: the weights file pickles Python objects") as info:
        load_text_model(folder)
    assert str(folder) in str(info.value) and "\n" not in str(info.value)
