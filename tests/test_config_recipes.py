"""Every bundled recipe validates against the typed configs (a typo or a stale key fails here, not mid-run)."""

from __future__ import annotations

from pathlib import Path

import pytest

from medfoundry.config import ExperimentConfig, load_config

REPO_ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO_ROOT / "configs").rglob("*.yaml"))


def test_there_is_a_recipe_per_method() -> None:
    names = {path.stem for path in RECIPES}
    assert {"dino", "ibot", "simclr", "mocov3", "byol", "mae", "mae3d_ct", "simclr3d_ct"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda path: str(path.relative_to(REPO_ROOT)))
def test_recipe_validates(recipe: Path) -> None:
    config = load_config(ExperimentConfig, recipe)
    assert config.pretrain.epochs > 0 and config.output_dir.parts[0] == "runs"
