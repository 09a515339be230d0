"""Output folders of run / eval: one job at a time, and a failed first attempt leaves no empty folder behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from medfoundry.io_utils import output_lock

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_a_second_job_into_a_busy_folder_is_refused_in_one_line(breastmnist_npz: Path, tmp_path: Path) -> None:
    out = tmp_path / "suite"
    suite = tmp_path / "suite.yaml"
    suite.write_text(
        yaml.safe_dump(
            {
                "output_dir": str(out),
                "tasks": [{"name": "breast", "source": str(breastmnist_npz)}],
                "encoders": [{"name": "vit", "backbone": "vit_tiny_28", "in_chans": 1, "img_size": 28}],
            }
        )
    )
    with output_lock(out, "a suite already running"):
        result = subprocess.run(
            [sys.executable, "-m", "medfoundry.cli", "eval", str(suite)],
            cwd=REPO_ROOT,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert result.returncode == 1
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and "is in use by pid" in lines[0] and str(os.getpid()) in lines[0], lines
    assert not (out / "results.json").exists()


def test_a_run_that_fails_before_writing_leaves_no_folder(tmp_path: Path) -> None:
    out = tmp_path / "never"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "medfoundry.cli",
            "run",
            "-s",
            f"data.source={tmp_path / 'missing.npz'}",
            "-o",
            str(out),
        ],
        cwd=REPO_ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1, result.stderr
    assert not out.exists()
