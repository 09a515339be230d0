"""The one registry style: suggestions for unknown names, refused duplicates, lazy member imports, config checks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from medfoundry.config import ExperimentConfig, PretrainConfig, load_config
from medfoundry.errors import MedfoundryError, ModelError
from medfoundry.models.backbones import BACKBONE_PRESETS, create_encoder
from medfoundry.models.names import parse_model_name
from medfoundry.registry import Registry, UnknownNameError, suggest


def test_unknown_name_suggests_close_names_not_unrelated_ones() -> None:
    assert suggest("vit_tiny_46", BACKBONE_PRESETS.names())[0] == "vit_tiny_64"
    assert "resnet18" not in suggest("vit_tiny_46", BACKBONE_PRESETS.names())
    with pytest.raises(ModelError, match="did you mean 'vit_tiny_64'"):
        create_encoder("vit_tiny_46", in_chans=1)


def test_shared_prefix_is_suggested() -> None:
    registry: Registry[int] = Registry("thing")
    for i, name in enumerate(("dinov2_vits14", "dinov2_vitb14", "uni")):
        registry.add(name, i)
    with pytest.raises(UnknownNameError, match=r"did you mean 'dinov2_vitb14' or 'dinov2_vits14'\?"):
        registry.get("dinov2")


def test_duplicate_names_are_refused() -> None:
    registry: Registry[object] = Registry("thing")

    @registry.register("a", note="first")
    class A: ...

    with pytest.raises(ValueError, match="thing 'a' is already registered"):
        registry.register("a")(object)
    assert registry.get("a") is A and registry.metadata("a") == {"note": "first"}
    assert list(registry) == ["a"] and "a" in registry and len(registry) == 1


def test_unknown_name_is_a_value_error_and_a_medfoundry_error() -> None:
    with pytest.raises(UnknownNameError) as info:
        Registry("thing").get("x")
    assert isinstance(info.value, ValueError) and isinstance(info.value, MedfoundryError)


def test_lookup_imports_the_member_modules_in_a_fresh_process() -> None:
    # Only the trainer is imported: the lookup itself must bring the methods and adapters in.
    code = (
        "import sys, medfoundry.ssl.trainer as t\n"
        "from medfoundry.ssl.base import SSL_METHODS\n"
        "assert SSL_METHODS.get('dino').__name__ == 'DINO'\n"
        "assert set(SSL_METHODS) == {'byol', 'dino', 'distill', 'ibot', 'mae', 'mocov3', 'simclr'}\n"
        "from medfoundry.adapt.registry import ADAPTERS\n"
        "assert set(ADAPTERS) == {'fewshot', 'knn', 'linear', 'mlp'}\n"
        "from medfoundry.models.backbones import ARCHITECTURES\n"
        "assert 'medfoundry.ctfm_segresencoder' in ARCHITECTURES and 'medfoundry.slices2d' in ARCHITECTURES\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


def test_a_registry_imports_its_modules_only_on_lookup() -> None:
    registry: Registry[int] = Registry("thing", modules=("medfoundry_no_such_module",))
    registry.add("early", 1)  # registering never imports
    with pytest.raises(ModuleNotFoundError):
        registry.get("early")


def test_config_checks_names_against_the_registries() -> None:
    with pytest.raises(ValueError, match="unknown pre-training method 'dion'; did you mean 'dino'"):
        PretrainConfig(method="dion")
    assert PretrainConfig(method="clip").method == "clip"
    with pytest.raises(MedfoundryError, match="adapt.adapters: unknown adapter 'lienar'; did you mean 'linear'"):
        load_config(ExperimentConfig, None, ["adapt.adapters=[linear, lienar]"])


def test_unknown_key_suggests_the_field(tmp_path: Path) -> None:
    with pytest.raises(MedfoundryError, match=r"pretrain.epoch: unknown key; did you mean 'pretrain.epochs'\?"):
        load_config(ExperimentConfig, None, ["pretrain.epoch=3"])
    with pytest.raises(
        MedfoundryError, match=r"pretrain.dino.out_dimm: unknown key; did you mean 'pretrain.dino.out_dim'"
    ):
        load_config(ExperimentConfig, None, ["pretrain.dino.out_dimm=3"])


def test_invalid_yaml_is_one_line_with_its_position(tmp_path: Path) -> None:
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("pretrain:\n  epochs: 3\n  lr: [1, 2\n")
    with pytest.raises(MedfoundryError) as info:
        load_config(ExperimentConfig, recipe)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{recipe}: not valid YAML: line 4, column 1")


def test_one_grammar_of_model_names(tmp_path: Path) -> None:
    assert parse_model_name("vit_tiny_28").kind == "backbone"
    public = parse_model_name("public:uni@test:/w/uni.bin")
    assert (public.kind, public.name, public.variant, public.path) == ("public", "uni", "test", Path("/w/uni.bin"))
    folder = parse_model_name(str(tmp_path))
    assert folder.kind == "folder" and folder.loads_weights
    wrapped = parse_model_name(f"2.5d-attention:{tmp_path}")
    assert (wrapped.kind, wrapped.aggregate, wrapped.inner.kind) == ("slices", "attention", "folder")
    assert not parse_model_name("2.5d:resnet18").loads_weights
    with pytest.raises(ModelError, match="not another 2.5D one"):
        parse_model_name("2.5d:2.5d:resnet18")
    with pytest.raises(ModelError, match="needs a local weights path"):
        parse_model_name("public:uni")
