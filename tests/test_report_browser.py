"""The HTML report as a browser shows it: headless Chromium screenshots a rendered suite report.

Skipped where Chromium is not installed (.ci/run installs it in CI).
"""

from __future__ import annotations

import base64
import io
import math
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medfoundry.evaluate.results import ResultRecord, ResultsFile
from medfoundry.report import render_report

CHROMIUM = Path("/usr/bin/chromium")
WINDOW = (1400, 3000)
# The first model's colour in every plot and table swatch (medfoundry.report.plots._MODEL_COLOURS[0]).
FIRST_MODEL_RGB = (0x00, 0x72, 0xB2)
ADAPTERS = {"knn": (0, 0.004), "linear": (769, 0.9), "finetune-lora": (1_200_000, 310.0)}


def _results() -> ResultsFile:
    records = []
    for task in ("breastmnist", "pneumoniamnist"):
        for m_i, model in enumerate(("dino", "random-init")):
            for a_i, (adapter, (params, seconds)) in enumerate(ADAPTERS.items()):
                for fraction in (0.01, 0.1, 1.0):
                    for seed in range(2):
                        for metric in ("auroc", "accuracy", "ece"):
                            value = 0.55 + 0.05 * a_i - 0.1 * m_i + 0.1 * math.log10(fraction * 100) + 0.005 * seed
                            if metric == "ece":
                                value = 0.35 - value / 3
                            records.append(
                                ResultRecord(
                                    task,
                                    model,
                                    adapter,
                                    fraction,
                                    seed,
                                    metric,
                                    value,
                                    value - 0.04,
                                    value + 0.04,
                                    round(500 * fraction),
                                    120,
                                    trainable_params=params,
                                    fit_seconds=seconds,
                                )
                            )
    comparisons = [
        {
            "task": task,
            "metric": "auroc",
            "label_fraction": fraction,
            "model_a": "dino",
            "adapter_a": "linear",
            "model_b": "random-init",
            "adapter_b": "linear",
            "value_a": 0.8,
            "value_b": 0.7,
            "difference": 0.1 if fraction > 0.01 else 0.01,
            "ci_low": 0.05 if fraction > 0.01 else -0.03,
            "ci_high": 0.15 if fraction > 0.01 else 0.05,
            "share_opposite": 0.001,
            "n_seeds": 2,
            "confidence": 0.95,
        }
        for task in ("breastmnist", "pneumoniamnist")
        for fraction in (0.01, 0.1, 1.0)
    ]
    return ResultsFile(records=records, metadata={"dataset": "MedMNIST", "comparisons": comparisons})


def _screenshot(html: Path, png: Path, profile: Path) -> subprocess.CompletedProcess[str]:
    command = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",  # CI runs as root, where Chromium refuses to start sandboxed
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        f"--screenshot={png}",
        html.as_uri(),
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return render_report(_results(), tmp_path_factory.mktemp("report") / "report.html", title="Browser check")


def test_embedded_plots_decode_to_real_images(rendered: Path) -> None:
    encoded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', rendered.read_text(encoding="utf-8"))
    # Per task: AUROC and accuracy curves plus the adaptation ladder.
    assert len(encoded) == 2 * 3
    for data in encoded:
        with Image.open(io.BytesIO(base64.b64decode(data))) as img:
            img.load()
            assert img.width > 400 and img.height > 300
            # A blank or single-colour image would mean nothing was drawn.
            colours = img.convert("RGB").getcolors(maxcolors=1_000_000)
            assert colours is not None and len(colours) > 50


@pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(rendered: Path, tmp_path: Path) -> None:
    png = tmp_path / "report.png"
    try:
        proc = _screenshot(rendered, png, tmp_path / "profile")
    except subprocess.TimeoutExpired:
        pytest.fail("chromium did not finish the screenshot within 60 s")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert png.exists(), proc.stderr[-2000:]

    with Image.open(png) as shot:
        assert shot.size == WINDOW
        pixels = np.asarray(shot.convert("RGB"), dtype=np.int16)
    flat = pixels.reshape(-1, 3)
    colours, counts = np.unique(flat, axis=0, return_counts=True)
    background = colours[counts.argmax()]
    not_background = int(np.any(flat != background, axis=1).sum())
    assert not_background > 0.05 * len(flat), "the screenshot is (nearly) blank"
    # Plot lines, markers and table swatches of the first model: only drawn if the images decoded and laid out.
    first_model = np.all(np.abs(pixels - np.array(FIRST_MODEL_RGB)) <= 12, axis=2)
    assert first_model.sum() > 2000, f"only {first_model.sum()} pixels of the first model's colour"
    # The upper half holds the summary and the first plots, so the colour must be there too (layout, not a fluke).
    assert first_model[: WINDOW[1] // 2].sum() > 500
