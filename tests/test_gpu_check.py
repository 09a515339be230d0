"""benchmarks/gpu_check.py in its tiny CPU mode: every stage runs through the public API and prints a ratio.

The GPU figures themselves come from running the script on a GPU (docs/distributed.md, "GPU check"); here the
test guards the script against the API moving under it, and the gloo DDP launch against breaking.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "benchmarks" / "gpu_check.py"
# As tests/conftest.py finds the shared data folder.
SHARED_DATA = Path(os.environ.get("MEDFOUNDRY_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
STAGES = {"bf16_fwd", "bf16_fwdbwd", "pretrain", "embed", "finetune_full", "finetune_lora", "ddp"}
WSI_STAGES = {"wsi_embed", "wsi_tile_embed"}
RESULT = re.compile(r"^RESULT stage=(\S+) img_s=(\S+) ratio=(\S+)$", re.MULTILINE)


@pytest.mark.slow
def test_tiny_cpu_run_prints_a_finite_positive_ratio_per_stage(tmp_path: Path) -> None:
    slide = SHARED_DATA / "wsi_samples" / "CMU-1-Small-Region.svs"
    stages = "bare,pretrain,embed,finetune,ddp" + (",wsi" if slide.is_file() else "")
    command = [sys.executable, str(SCRIPT), "--tiny", "--device", "cpu", "--stages", stages, "--work", str(tmp_path)]
    if slide.is_file():
        command += ["--slide", str(slide)]
    # torchrun's two gloo ranks each import medfoundry: most of the time on a loaded 2-core machine.
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    found = {stage: (float(speed), float(ratio)) for stage, speed, ratio in RESULT.findall(done.stdout)}
    expected = STAGES | (WSI_STAGES if slide.is_file() else set())
    assert expected <= set(found), f"missing {expected - set(found)}:\n{done.stdout[-3000:]}"
    for stage, (speed, ratio) in found.items():
        assert math.isfinite(speed) and speed > 0, stage
        assert math.isfinite(ratio) and ratio > 0, stage
    assert "FAILED" not in done.stdout
