"""Every bundled recipe validates against the typed configs (a typo or a stale key fails here, not mid-run)."""

from __future__ import annotations

from pathlib import Path

import pytest

from medfoundry.config import ExperimentConfig, SuiteConfig, load_config

REPO_ROOT = Path(__file__).resolve().parents[1]
SUITES = sorted((REPO_ROOT / "configs" / "suites").glob("*.yaml"))
SEGMENT = sorted((REPO_ROOT / "configs" / "segment").glob("*.yaml"))
RECIPES = sorted(set((REPO_ROOT / "configs").rglob("*.yaml")) - set(SUITES) - set(SEGMENT))


def test_there_is_a_recipe_per_method() -> None:
    names = {path.stem for path in RECIPES}
    assert {"dino", "ibot", "simclr", "mocov3", "byol", "mae", "mae3d_ct", "simclr3d_ct"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda path: str(path.relative_to(REPO_ROOT)))
def test_recipe_validates(recipe: Path) -> None:
    config = load_config(ExperimentConfig, recipe)
    budget = [
        value for value in (config.pretrain.epochs, config.pretrain.max_steps, config.pretrain.max_minutes) if value
    ]
    assert len(budget) == 1 and budget[0] > 0 and config.output_dir.parts[0] == "runs"


def test_there_is_a_suite_per_domain() -> None:
    assert {"breastmnist", "kermany", "idrid", "osteosarcoma"} <= {path.stem for path in SUITES}


@pytest.mark.parametrize("suite", SUITES, ids=lambda path: str(path.relative_to(REPO_ROOT)))
def test_suite_validates(suite: Path) -> None:
    config = load_config(SuiteConfig, suite)
    assert config.output_dir.parts[0] == "runs"
    for encoder in config.encoders:
        if encoder.recipe is not None:
            assert (REPO_ROOT / encoder.recipe).is_file(), encoder.recipe


@pytest.mark.parametrize("recipe", SEGMENT, ids=lambda path: str(path.relative_to(REPO_ROOT)))
def test_segment_recipe_validates(recipe: Path) -> None:
    from medfoundry.segment.config import SegmentProbeConfig

    config = load_config(SegmentProbeConfig, recipe)
    assert config.output_dir.parts[0] == "runs" and len(config.images) == len(config.labels) > 0
