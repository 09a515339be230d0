"""The recipes ship inside the package: one copy (the checkout's configs/ links to it), found from any folder."""

from __future__ import annotations

import fnmatch
import tomllib
from pathlib import Path

import pytest

from medfoundry.config import ExperimentConfig, SuiteConfig, load_config
from medfoundry.packaged import PACKAGE_CONFIGS, resolve_config_path

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_the_checkouts_configs_is_the_package_copy() -> None:
    assert (REPO_ROOT / "configs").resolve() == PACKAGE_CONFIGS
    assert sorted(PACKAGE_CONFIGS.glob("suites/*.yaml")) and sorted(PACKAGE_CONFIGS.glob("pretrain/*.yaml"))


def test_every_recipe_is_package_data() -> None:
    with (REPO_ROOT / "pyproject.toml").open("rb") as handle:
        patterns = tomllib.load(handle)["tool"]["setuptools"]["package-data"]["medfoundry"]
    package = PACKAGE_CONFIGS.parent
    recipes = [p.relative_to(package).as_posix() for p in PACKAGE_CONFIGS.rglob("*") if p.is_file()]
    assert recipes
    missing = [r for r in recipes if not any(fnmatch.fnmatch(r, pattern) for pattern in patterns)]
    assert not missing, f"not shipped in the wheel: {missing}"


def test_suites_resolve_their_recipes_outside_a_checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # as after `pip install medfoundry`: no configs/ in the working folder
    suite = load_config(SuiteConfig, Path("configs/suites/breastmnist.yaml"))
    recipes = {encoder.recipe for encoder in suite.encoders if encoder.recipe is not None}
    assert recipes == {Path("configs/pretrain/simclr.yaml")}
    for recipe in recipes:
        assert resolve_config_path(recipe) == PACKAGE_CONFIGS / "pretrain" / "simclr.yaml"
        assert load_config(ExperimentConfig, recipe).pretrain.method == "simclr"


def test_a_local_file_wins_and_other_paths_are_left_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    local = tmp_path / "configs" / "pretrain" / "simclr.yaml"
    local.parent.mkdir(parents=True)
    local.write_text("name: mine\n")
    assert resolve_config_path("configs/pretrain/simclr.yaml") == Path("configs/pretrain/simclr.yaml")
    assert resolve_config_path("configs/pretrain/none_such.yaml") == Path("configs/pretrain/none_such.yaml")
    assert resolve_config_path("recipes/simclr.yaml") == Path("recipes/simclr.yaml")
