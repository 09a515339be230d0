"""Probing what a user already has: separate train / test datasets, or feature files, through the one engine."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from medfoundry.bench.engine import run_suite
from medfoundry.bench.probe import encoder_from_text, probe_config
from medfoundry.cli import app
from medfoundry.config import DatasetSpec
from medfoundry.data.registry import load_dataset
from medfoundry.errors import DataError
from medfoundry.evaluate.results import read_results
from medfoundry.models.backbones import create_encoder
from medfoundry.models.features import embed

CLASSES = ("benign", "malignant")


def _write_folder(root: Path, images: np.ndarray, labels: np.ndarray, prefix: str) -> Path:
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        folder = root / CLASSES[int(label)]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{prefix}{index:04d}.png")
    return root


@pytest.fixture(scope="module")
def folders(breastmnist_npz: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """BreastMNIST's train and test images as two separate class-folder trees, as a user's data often is."""
    archive = np.load(breastmnist_npz)
    root = tmp_path_factory.mktemp("user_data")
    train = _write_folder(
        root / "train_images", archive["train_images"][:200], archive["train_labels"].reshape(-1)[:200], "a"
    )
    test = _write_folder(root / "test_images", archive["test_images"], archive["test_labels"].reshape(-1), "b")
    return train, test


def test_probe_cli_on_separate_train_and_test_folders(folders: tuple[Path, Path], tmp_path: Path) -> None:
    train, test = folders
    out = tmp_path / "probe"
    result = CliRunner().invoke(
        app,
        ["probe", "--train", str(train), "--test", str(test), "--encoder", "vit_tiny_28", "-o", "channels=1",
         "-o", "image_size=28", "--adapters", "linear,knn", "--fractions", "0.1,1.0", "--seeds", "0",
         "--output", str(out), "--in-chans", "1"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    results = read_results(out / "results.json")
    task = results.metadata["tasks"]["probe"]
    # The test folder is used whole; only val was carved, from train, by patient.
    assert task["splits"]["test"] == 156 and task["carved_from_train"] == ["val"]
    assert task["splits"]["train"] + task["splits"]["val"] == 200
    assert {(r.model, r.adapter) for r in results.records} == {("vit_tiny_28", "linear"), ("vit_tiny_28", "knn")}
    assert all(r.n_test == 156 for r in results.records)
    assert (out / "report.html").is_file()


def test_probe_on_feature_files_runs_no_encoder(breastmnist_npz: Path, tmp_path: Path) -> None:
    splits = load_dataset(breastmnist_npz)
    encoder = create_encoder("vit_tiny_28", in_chans=1, img_size=28, seed=0)
    files = {role: tmp_path / f"{role}.h5" for role in ("train", "val", "test")}
    for role, path in files.items():
        embed(encoder, splits[role], path, batch_size=128)
    config = probe_config(
        DatasetSpec(source=str(files["train"])),
        DatasetSpec(source=str(files["test"])),
        val=DatasetSpec(source=str(files["val"])),
        output_dir=tmp_path / "probe",
        adapt={"adapters": ["linear", "fewshot"], "label_fractions": [1.0], "seeds": [0]},
    )
    output = run_suite(config, show_progress=False, echo=lambda line: None)
    assert {r.model for r in output.results.records} == {"features"}
    assert output.results.metadata["tasks"]["probe"]["precomputed_features"] is True
    assert output.results.metadata["tasks"]["probe"]["carved_from_train"] == []
    auroc = next(r.value for r in output.results.records if r.adapter == "linear" and r.metric == "auroc")
    assert 0.5 < auroc <= 1.0


def test_the_same_images_in_train_and_test_are_refused(folders: tuple[Path, Path], tmp_path: Path) -> None:
    train, _ = folders
    config = probe_config(
        DatasetSpec(source=str(train), options={"channels": 1, "image_size": 28}),
        DatasetSpec(source=str(train), options={"channels": 1, "image_size": 28}),
        encoders=[encoder_from_text("vit_tiny_28", in_chans=1)],
        output_dir=tmp_path / "probe",
    )
    with pytest.raises(DataError, match="share .* patient id"):
        run_suite(config, show_progress=False, echo=lambda line: None)


def test_encoder_names_from_the_command_line(tmp_path: Path) -> None:
    assert encoder_from_text("vit_tiny_28").backbone == "vit_tiny_28"
    folder = tmp_path / "my-encoder"
    folder.mkdir()
    spec = encoder_from_text(str(folder))
    assert spec.checkpoint == folder and spec.name == "my-encoder"
    public = encoder_from_text("public:uni:/weights/uni")
    assert public.checkpoint == Path("public:uni:/weights/uni") and public.name == "uni"
