"""The real ``medfoundry`` command in subprocesses: one-line errors for bad input, and the everyday commands.

Every command starts a fresh Python that imports torch and timm (seconds each), so the independent commands
run concurrently from one module fixture and the tests then check their outputs.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest

from medfoundry.evaluate.results import ResultRecord, ResultsFile, run_metadata, write_results

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLED = REPO_ROOT / "data" / "breastmnist" / "breastmnist.npz"
# A console 80 columns wide, as when the output is piped: long messages must still be one line.
ENV = {**os.environ, "COLUMNS": "80", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
ENV.pop("FORCE_COLOR", None)


def _cli(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "medfoundry.cli", *map(str, args)],
        cwd=REPO_ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _embed_args(data: Path, out: Path) -> list[str | Path]:
    return ["embed", "--model", "vit_tiny_28", "--data", data, "--split", "test", "--out", out]


def _flat(text: str) -> str:
    return " ".join(text.split())


def _write_npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def _images(n: int, seed: int, dtype: type = np.uint8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 28, 28)).astype(dtype)


def _labels(n: int) -> np.ndarray:
    return (np.arange(n) % 2).reshape(n, 1)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("cli")
    _write_npz(tmp / "wrong_keys.npz", x=_images(4, 0), y=_labels(4))
    _write_npz(
        tmp / "lengths.npz",
        train_images=_images(10, 0),
        train_labels=_labels(9),
        val_images=_images(4, 1),
        val_labels=_labels(4),
        test_images=_images(4, 2),
        test_labels=_labels(4),
    )
    nan_val = _images(6, 1, np.float32) / 255.0
    nan_val[3, 5, 7] = np.nan
    _write_npz(
        tmp / "nan.npz",
        train_images=_images(10, 0, np.float32) / 255.0,
        train_labels=_labels(10),
        val_images=nan_val,
        val_labels=_labels(6),
        test_images=_images(4, 2, np.float32) / 255.0,
        test_labels=_labels(4),
    )
    (tmp / "file.txt").write_text("a file, not a folder\n")
    records = [
        ResultRecord(
            "breastmnist", model, "linear", fraction, seed, "auroc", value, value - 0.05, value + 0.05, 50, 156
        )
        for model, base in (("dino", 0.8), ("random-init", 0.7))
        for fraction in (0.1, 1.0)
        for seed in (0, 1)
        for value in [base + 0.05 * fraction + 0.01 * seed]
    ]
    write_results(tmp / "report" / "results.json", ResultsFile(records, run_metadata(dataset="breastmnist")))
    return tmp


def _bad_cases(tmp: Path) -> dict[str, tuple[list[str | Path], list[str]]]:
    """name -> (arguments, texts the one error line must contain)."""
    return {
        "missing data file": (
            ["run", "-s", f"data.source={tmp / 'nonexistent.npz'}", "-o", tmp / "out_missing"],
            [str(tmp / "nonexistent.npz"), "dataset not found"],
        ),
        "npz without MedMNIST keys": (
            ["run", "-s", f"data.source={tmp / 'wrong_keys.npz'}", "-o", tmp / "out_keys"],
            [str(tmp / "wrong_keys.npz"), "no MedMNIST keys", "keys in the file: x, y"],
        ),
        "images and labels of different lengths": (
            ["run", "-s", f"data.source={tmp / 'lengths.npz'}", "-o", tmp / "out_lengths"],
            [str(tmp / "lengths.npz"), "split 'train' has 10 images but 9 labels"],
        ),
        "NaN images": (
            ["run", "-s", f"data.source={tmp / 'nan.npz'}", "-o", tmp / "out_nan"],
            [str(tmp / "nan.npz"), "val_images contains NaN or inf values (first at index 3)"],
        ),
        "unknown model name": (
            ["run", "-s", "model.backbone=not_a_model", "-o", tmp / "out_model"],
            ["unknown model name 'not_a_model'", "vit_tiny_28"],
        ),
        "output folder under a file": (
            ["run", "-o", tmp / "file.txt" / "sub"],
            [str(tmp / "file.txt" / "sub"), "output folder is not writable"],
        ),
        "unknown config key": (
            ["run", "-s", "pretrain.epoch=3", "-o", tmp / "out_key"],
            ["invalid config", "pretrain.epoch", "unknown key; did you mean 'pretrain.epochs'"],
        ),
        "missing YAML config": (
            ["run", tmp / "missing.yaml", "-o", tmp / "out_yaml"],
            [str(tmp / "missing.yaml"), "config file does not exist"],
        ),
    }


@pytest.fixture(scope="module")
def runs(work: Path, breastmnist_npz: Path) -> dict[str, subprocess.CompletedProcess[str]]:
    commands: dict[str, list[str | Path]] = {name: args for name, (args, _) in _bad_cases(work).items()}
    commands |= {
        "debug": ["--debug", "run", work / "missing.yaml", "-o", work / "out_debug"],
        "models list": ["models", "list"],
        "data info": ["data", "info", "data/breastmnist/breastmnist.npz"],
        "embed": _embed_args(breastmnist_npz, work / "x.h5"),
        "report": ["report", work / "report" / "results.json"],
        "version": ["--version"],
    }
    with ThreadPoolExecutor(max_workers=min(3, os.cpu_count() or 1)) as pool:
        futures = {name: pool.submit(_cli, *args) for name, args in commands.items()}
        return {name: future.result() for name, future in futures.items()}


@pytest.mark.parametrize("case", list(_bad_cases(Path("/tmp"))))
def test_bad_input_gives_one_clear_line(
    case: str, runs: dict[str, subprocess.CompletedProcess[str]], work: Path
) -> None:
    result = runs[case]
    expected = _bad_cases(work)[case][1]
    assert result.returncode == 1, result.stderr
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ")
    for text in expected:
        assert text in lines[0]
    assert "Traceback" not in result.stderr
    # Nothing was trained: the failure came before the pre-training stage wrote anything.
    assert not list(work.glob("out_*/pretrain"))


def test_debug_shows_the_traceback(runs: dict[str, subprocess.CompletedProcess[str]], work: Path) -> None:
    result = runs["debug"]
    assert result.returncode != 0
    assert "Traceback" in result.stderr
    assert "MedfoundryError" in result.stderr and "config file does not exist" in result.stderr


def test_version(runs: dict[str, subprocess.CompletedProcess[str]]) -> None:
    result = runs["version"]
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"medfoundry {version('medfoundry')}"


def test_models_list(runs: dict[str, subprocess.CompletedProcess[str]]) -> None:
    result = runs["models list"]
    assert result.returncode == 0, result.stderr
    for name in ("vit_tiny_28", "vit_small_224", "resnet18", "resnet50", "vit_tiny_patch16_224"):
        assert name in result.stdout


def test_data_info_split_sizes(runs: dict[str, subprocess.CompletedProcess[str]]) -> None:
    result = runs["data info"]
    assert result.returncode == 0, result.stderr
    sizes = {split: re.search(rf"{split}\W+(\d+)\W", result.stdout) for split in ("train", "val", "test")}
    assert {split: int(m.group(1)) for split, m in sizes.items() if m} == {"train": 546, "val": 78, "test": 156}
    assert "(1, 28, 28)" in result.stdout
    assert "[147, 399]" in result.stdout  # train label counts


def test_embed_writes_then_reuses(
    runs: dict[str, subprocess.CompletedProcess[str]], work: Path, breastmnist_npz: Path
) -> None:
    first = runs["embed"]
    assert first.returncode == 0, first.stderr
    assert (work / "x.h5").is_file()
    assert "156 x 192 features (wrote in" in _flat(first.stderr)
    mtime = (work / "x.h5").stat().st_mtime_ns
    second = _cli(*_embed_args(breastmnist_npz, work / "x.h5"))
    assert second.returncode == 0, second.stderr
    assert "156 x 192 features (reused)" in _flat(second.stderr)
    assert (work / "x.h5").stat().st_mtime_ns == mtime


def test_report(runs: dict[str, subprocess.CompletedProcess[str]], work: Path) -> None:
    result = runs["report"]
    assert result.returncode == 0, result.stderr
    html = (work / "report" / "report.html").read_text()
    assert html.lstrip().lower().startswith("<!doctype html")
    assert "random-init" in html and "dino" in html and "data:image/png;base64," in html
    assert "Report:" in result.stderr


@pytest.mark.parametrize("override", ["model.backbone=not_a_model", "supervised_baseline.backbone=resnet_nope"])
def test_model_names_are_checked_before_pretraining(override: str, tmp_path: Path) -> None:
    # In-process (one import of the pipeline for both cases): either bad name must fail before pre-training.
    from medfoundry.bench.run import run_experiment
    from medfoundry.config import ExperimentConfig, load_config
    from medfoundry.errors import ModelError

    config = load_config(ExperimentConfig, None, [override, f"output_dir={tmp_path / 'out'}"])
    config = config.model_copy(update={"data": config.data.model_copy(update={"source": str(BUNDLED)})})
    echoed: list[str] = []
    with pytest.raises(ModelError, match=f"unknown model name '{override.split('=')[1]}'"):
        run_experiment(config, show_progress=False, echo=echoed.append)
    assert echoed == []
    assert not (tmp_path / "out" / "pretrain").exists()


# The osteosarcoma manifest names its image column "file" and labels by index, so it needs reader options.
OSTEO_OPTIONS = ["-o", "path_column=file", "-o", "label_column=label_index", "-o", "class_name_column=label"]


def _bad_option_cases(csv: Path, tmp: Path) -> dict[str, tuple[list[str | Path], list[str]]]:
    """name -> (arguments, texts the one error line must contain)."""
    embed = ["embed", "--model", "vit_tiny_28", "--data", csv, "--split", "train", "--out", tmp / "bad.h5"]
    return {
        "unknown reader option": (
            ["data", "info", csv, "-o", "file_column=file"],
            ["unknown option file_column for reader csv; known: ", "path_column", "image_size", "channels"],
        ),
        "option value of the wrong type": (
            [*embed, *OSTEO_OPTIONS, "-o", "image_size=abc"],
            ["option image_size for reader csv: 'abc' does not fit int | tuple[int, int] | None"],
        ),
        "option without a value": (
            [*embed, "-o", "path_column"],
            ["reader option 'path_column' is not of the form KEY=VALUE"],
        ),
    }


@pytest.fixture(scope="module")
def option_runs(work: Path, shared_data: Path) -> dict[str, subprocess.CompletedProcess[str]]:
    csv = shared_data / "osteosarcoma_tcia_tiles_60" / "labels.csv"
    commands: dict[str, list[str | Path]] = {name: args for name, (args, _) in _bad_option_cases(csv, work).items()}
    commands |= {
        "data info": ["data", "info", csv, *OSTEO_OPTIONS, "-o", "image_size=64", "--option", "channels=3"],
        "embed": [
            *["embed", "--model", "vit_tiny_28", "--data", csv, "--split", "train", "--out", work / "osteo.h5"],
            *[*OSTEO_OPTIONS, "-o", "image_size=28", "-o", "channels=1"],
        ],
    }
    with ThreadPoolExecutor(max_workers=min(3, os.cpu_count() or 1)) as pool:
        futures = {name: pool.submit(_cli, *args) for name, args in commands.items()}
        return {name: future.result() for name, future in futures.items()}


def test_data_info_with_reader_options(option_runs: dict[str, subprocess.CompletedProcess[str]]) -> None:
    result = option_runs["data info"]
    assert result.returncode == 0, result.stderr
    assert re.search(r"train\W+60\W", result.stdout)
    assert "(3, 64, 64)" in result.stdout
    assert "[20, 20, 20]" in result.stdout


def test_embed_with_reader_options(option_runs: dict[str, subprocess.CompletedProcess[str]], work: Path) -> None:
    result = option_runs["embed"]
    assert result.returncode == 0, result.stderr
    assert "60 x 192 features (wrote in" in _flat(result.stderr)
    assert (work / "osteo.h5").is_file()


@pytest.mark.parametrize("case", list(_bad_option_cases(Path("/tmp/labels.csv"), Path("/tmp"))))
def test_bad_reader_option_gives_one_clear_line(
    case: str, option_runs: dict[str, subprocess.CompletedProcess[str]], work: Path, shared_data: Path
) -> None:
    result = option_runs[case]
    expected = _bad_option_cases(shared_data / "osteosarcoma_tcia_tiles_60" / "labels.csv", work)[case][1]
    assert result.returncode == 1, result.stderr
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ")
    for text in expected:
        assert text in lines[0]
    assert not (work / "bad.h5").exists()
