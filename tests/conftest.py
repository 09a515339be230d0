"""Shared fixtures: real data from ../shared/data (skipped cleanly when absent) and the bundled demo data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MEDFOUNDRY_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
BUNDLED_BREASTMNIST = REPO_ROOT / "data" / "breastmnist" / "breastmnist.npz"

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} is absent")
    return SHARED_DATA


@pytest.fixture(scope="session")
def breastmnist_npz() -> Path:
    """The BreastMNIST 28 px file bundled in the repo (always present)."""
    return BUNDLED_BREASTMNIST


@pytest.fixture(scope="session")
def ct_crops(shared_data: Path):  # noqa: ANN201 - an ImageSet; imported lazily to keep collection light
    """Crops of 28^3 voxels (stride 14) of TotalSegmentator's example CT (3 mm): 42 crops."""
    from medfoundry.data.nifti import load_nifti_crops

    path = shared_data / "totalsegmentator_ct_examples" / "example_ct_sm.nii.gz"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    return load_nifti_crops(path, crop_size=28, stride=14)["train"]


@pytest.fixture(scope="module")
def tcga_table(shared_data: Path) -> Path:
    """The TCGA colorectal survival table (Kather et al. 2019) of ../shared/data."""
    path = shared_data / "tcga_crc_survival" / "TCGA_MEASUREMENTS.csv"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    return path
