"""Distillation (issue 17): a frozen teacher of another width and patch grid taught to a student on the shared
trainer; the student is an ordinary checkpoint folder for embed, probe and export; the benchmark's tiny mode.
Real data: BreastMNIST training images (bundled), and the Kermany subset and pool for the benchmark."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from medfoundry.cli import app
from medfoundry.config import DistillConfig, PretrainConfig
from medfoundry.data.medmnist import load_medmnist_npz
from medfoundry.errors import MedfoundryError
from medfoundry.models.backbones import create_encoder
from medfoundry.models.checkpoint import load_encoder, save_encoder
from medfoundry.ssl.base import SSL_METHODS, StepValues
from medfoundry.ssl.distill import features_and_grid, random_prototypes
from medfoundry.ssl.trainer import pretrain

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ViT of another width (384) and patch grid (4x4 at 28 px, the student's is 7x7) than vit_tiny_28."""
    teacher = create_encoder("vit_small_patch16_224", in_chans=1, img_size=28, patch_size=7, depth=1, seed=3)
    # A private absolute path, as a user's would be: the student's checkpoint must keep only its name.
    return save_encoder(teacher, tmp_path_factory.mktemp("private") / "my-teacher")


@pytest.fixture(scope="module")
def images(breastmnist_npz: Path):
    return load_medmnist_npz(breastmnist_npz)["train"].subset(np.arange(32))


def _config(teacher: Path | str, **distill: object) -> PretrainConfig:
    return PretrainConfig(
        method="distill",
        max_steps=3,
        batch_size=8,
        lr=1e-3,
        tensorboard=False,
        monitor_every_steps=3,
        distill=DistillConfig(teacher=str(teacher), n_prototypes=32, hidden_dim=64, bottleneck_dim=16, **distill),
    )


def test_student_learns_from_a_frozen_teacher_kept_out_of_state_and_checkpoint(
    teacher_dir: Path, images, tmp_path: Path
) -> None:
    torch.set_num_threads(1)
    student = create_encoder("vit_tiny_28", in_chans=1, seed=0, pool="token+avg")
    config = _config(teacher_dir)
    method = SSL_METHODS["distill"](student, config)
    assert method.teacher.embed_dim == 384 and student.embed_dim == 384 and method.teacher.backbone.num_features == 384
    assert not any(p.requires_grad for p in method.teacher.parameters()) and not method.teacher.training
    trainable = {id(p) for m in method.trainable_modules() for p in m.parameters()}
    assert not trainable & {id(p) for p in method.teacher.parameters()}

    before = {k: v.clone() for k, v in load_encoder(teacher_dir).backbone.state_dict().items()}
    result = pretrain(images, student, config, tmp_path / "run", show_progress=False)
    assert result.finished and result.steps == 3 and not result.collapsed and result.warnings == []
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    for key in ("pooled_loss", "patch_loss", "prototype_loss", "pooled_cosine"):
        assert all(np.isfinite(r[key]) for r in records), key
    # The teacher is neither trained nor saved: not in the resumable state, not in the student's folder.
    state = torch.load(tmp_path / "run" / "state" / "last.pt", weights_only=True)
    assert not any(key.startswith(("_teacher", "teacher")) for key in state["method"])
    assert all(torch.equal(v, load_encoder(teacher_dir).backbone.state_dict()[k]) for k, v in before.items())
    encoder = load_encoder(result.encoder_dir)
    assert int(encoder.backbone.num_features) == 192 and encoder.embed_dim == 384
    saved = json.loads((result.encoder_dir / "config.json").read_text())
    assert saved["distilled_from"] == "my-teacher" and saved["pretrain_config"]["distill"]["teacher"] == "my-teacher"
    text = (result.encoder_dir / "config.json").read_text() + (result.encoder_dir / "model_card.md").read_text()
    assert str(teacher_dir.parent) not in text and "Distilled from: my-teacher" in text

    # Resumed with a larger budget: it continues from step 3 (the teacher is rebuilt from its name, not the state).
    longer = config.model_copy(update={"max_steps": 4})
    resumed = pretrain(images, create_encoder("vit_tiny_28", in_chans=1, seed=0, pool="token+avg"), longer,
                       tmp_path / "run", show_progress=False)  # fmt: skip
    assert resumed.resumed_from_step == 3 and resumed.steps == 4


def test_patch_grids_of_vits_and_cnns() -> None:
    vit = create_encoder("vit_tiny_28", in_chans=1, seed=0)
    pooled, grid = features_and_grid(vit.backbone, torch.zeros(2, 1, 28, 28), "default")
    assert pooled.shape == (2, 192) and grid is not None and grid.shape == (2, 192, 7, 7)
    torch.testing.assert_close(pooled, vit(torch.zeros(2, 1, 28, 28)))
    cnn = create_encoder("resnet10t", in_chans=1, seed=0)
    pooled, grid = features_and_grid(cnn.backbone, torch.zeros(2, 1, 64, 64), "default")
    assert pooled.shape == (2, 512) and grid is not None and grid.shape[:2] == (2, 512) and grid.ndim == 4
    # The prototypes are fixed by their seed: every run and every rank gets the same teacher targets.
    torch.testing.assert_close(random_prototypes(16, 8, 0), random_prototypes(16, 8, 0))
    assert not torch.equal(random_prototypes(16, 8, 0), random_prototypes(16, 8, 1))


def _values() -> StepValues:
    return StepValues(step=0, epoch=0, lr=1e-3, weight_decay=0.0, momentum=1.0, teacher_temp=0.04)


def test_a_loss_of_weight_zero_adds_no_module(teacher_dir: Path) -> None:
    config = _config(teacher_dir, patch_weight=0.0, prototype_weight=0.0)
    method = SSL_METHODS["distill"](create_encoder("vit_tiny_28", in_chans=1, seed=0), config)
    # Under DDP every trainable parameter must take part in each step: no head for a loss that is off.
    assert method.student_head is None and method.patch_projection is None and len(method.trainable_modules()) == 2
    output = method.training_step([torch.randn(2, 1, 28, 28), torch.randn(2, 1, 28, 28)], _values())
    assert set(output.logs) == {"loss", "pooled_loss", "pooled_cosine"} and output.loss.requires_grad


def test_a_3d_student_learns_from_a_3d_teacher() -> None:
    torch.manual_seed(0)
    config = PretrainConfig(method="distill", distill=DistillConfig(teacher="vit3d_tiny_28", n_prototypes=16))
    method = SSL_METHODS["distill"](create_encoder("vit3d_tiny_28", in_chans=1, seed=0), config)
    volumes = [torch.randn(2, 1, 28, 28, 28), torch.randn(2, 1, 28, 28, 28)]
    output = method.training_step(volumes, _values())
    assert {"pooled_loss", "patch_loss", "prototype_loss"} <= set(output.logs) and torch.isfinite(output.loss)
    output.loss.backward()
    assert all(p.grad is None for p in method.teacher.parameters())


@pytest.mark.parametrize(
    ("teacher", "message"),
    [(None, "distillation needs a teacher"), ("vit3d_tiny_28", "takes volumes and the student")],
)
def test_bad_teacher_is_one_clear_error(teacher: str | None, message: str) -> None:
    config = PretrainConfig(method="distill", distill=DistillConfig(teacher=teacher))
    with pytest.raises(MedfoundryError, match=message):
        SSL_METHODS["distill"](create_encoder("vit_tiny_28", in_chans=1, seed=0), config)


def _class_folders(root: Path, archive: dict, split: str, count: int) -> Path:
    for index in range(count):
        folder = root / ("benign", "malignant")[int(archive[f"{split}_labels"].reshape(-1)[index])]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(archive[f"{split}_images"][index]).save(folder / f"{split}{index:03d}.png")
    return root


def test_distill_command_gives_a_checkpoint_that_embed_probe_and_export_accept(
    teacher_dir: Path, breastmnist_npz: Path, tmp_path: Path
) -> None:
    runner, out = CliRunner(), tmp_path / "distilled"
    settings = ["pretrain.max_steps=2", "pretrain.batch_size=8", "pretrain.tensorboard=false",
                "pretrain.distill.n_prototypes=32", "model.pool=token+avg"]  # fmt: skip
    result = runner.invoke(
        app,
        ["distill", "--teacher", str(teacher_dir), "--student", "vit_tiny_28", "--data", str(breastmnist_npz),
         "--output", str(out), *[arg for s in settings for arg in ("-s", s)]],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    checkpoint = out / "pretrain" / "encoder"
    assert json.loads((checkpoint / "config.json").read_text())["ssl_method"] == "distill"

    embedded = runner.invoke(
        app, ["embed", "--model", str(checkpoint), "--data", str(breastmnist_npz), "--split", "val",
              "--out", str(tmp_path / "val.h5")],
    )  # fmt: skip
    assert embedded.exit_code == 0, embedded.output
    assert (tmp_path / "val.h5").is_file()

    archive = dict(np.load(breastmnist_npz))
    train = _class_folders(tmp_path / "train", archive, "train", 60)
    test = _class_folders(tmp_path / "test", archive, "test", 40)
    probed = runner.invoke(
        app,
        ["probe", "--train", str(train), "--test", str(test), "--encoder", str(checkpoint), "-o", "channels=1",
         "-o", "image_size=28", "--adapters", "linear", "--fractions", "1.0", "--seeds", "0",
         "--output", str(tmp_path / "probe")],
    )  # fmt: skip
    assert probed.exit_code == 0, probed.output
    records = json.loads((tmp_path / "probe" / "results.json").read_text())["records"]
    assert {r["adapter"] for r in records} == {"linear"} and {r["n_test"] for r in records} == {40}

    exported = runner.invoke(app, ["models", "export", str(checkpoint), str(tmp_path / "export")])
    assert exported.exit_code == 0, exported.output
    assert (tmp_path / "export" / "README.md").is_file()


@pytest.mark.slow
def test_tiny_benchmark_compares_four_encoders(shared_data: Path, tmp_path: Path) -> None:
    if not (shared_data / "kermany_cxr_224_trainrest").is_dir():
        pytest.skip("the Kermany pool is absent")
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    import distillation

    report = distillation.main(["--tiny", "--out", str(tmp_path / "bench"), "--data-root", str(shared_data)])
    assert json.loads((tmp_path / "bench" / "distillation.json").read_text())["verdict"] == report["verdict"]
    auroc = report["summary"]["auroc"]
    names = {distillation.TEACHER, distillation.DISTILLED, distillation.SSL_STUDENT, distillation.RANDOM_STUDENT}
    assert set(auroc) == names and all(set(v) == {"0.1", "1.0"} for v in auroc.values())
    # Paired differences of the distilled student against the three others, at both label fractions.
    assert set(report["summary"]["distilled_minus"]) == names - {distillation.DISTILLED}
    assert all(rate > 0 for rate in report["inference_images_per_second"].values())
    assert report["runs"][distillation.DISTILLED]["steps"] >= 1 and "left out" in report["pool"]


def test_resume_with_a_replaced_teacher_file_is_refused(images, tmp_path: Path) -> None:
    """Same teacher path, other weights: resuming would mix two teachers in one student, so it is refused."""
    torch.set_num_threads(1)
    folder = tmp_path / "teacher"
    make = lambda seed: create_encoder(  # noqa: E731 - two teachers of one architecture
        "vit_small_patch16_224", in_chans=1, img_size=28, patch_size=7, depth=1, seed=seed
    )
    save_encoder(make(3), folder)
    config = _config(folder).model_copy(update={"max_steps": 2})
    student = lambda: create_encoder("vit_tiny_28", in_chans=1, seed=0, pool="token+avg")  # noqa: E731
    assert pretrain(images, student(), config, tmp_path / "run", show_progress=False).steps == 2
    save_encoder(make(4), folder)  # replaced in place
    longer = config.model_copy(update={"max_steps": 3})
    with pytest.raises(MedfoundryError, match="another config or data"):
        pretrain(images, student(), longer, tmp_path / "run", show_progress=False)
