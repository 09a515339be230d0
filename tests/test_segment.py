"""Segmentation probe on the real TotalSegmentator CT: a frozen random-init 3D ViT, linear and UNETR decoders.

The CT (122 x 101 x 30 voxels at 3 mm) is split along z: test block z 10..19, 2-slice margins, train z 0..7 and
22..29.
Dice is measured on the held-out block only. Thresholds were set from measured runs with a margin (the
numbers are in docs/segmentation.md). The probe runs as a task kind of the evaluation engine: the CLI as a one-task
suite, and a suite YAML with a segmentation task beside a classification one.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medfoundry.errors import DataError

CT_DIR = "totalsegmentator_ct_examples"


@pytest.fixture(scope="module")
def ct_files(shared_data: Path) -> tuple[Path, Path]:
    folder = shared_data / CT_DIR
    image, labels = folder / "example_ct_sm.nii.gz", folder / "example_seg.nii.gz"
    if not image.is_file() or not labels.is_file():
        pytest.skip(f"{folder} lacks the example CT and its label map")
    return image, labels


@pytest.fixture(scope="module")
def probe_run(ct_files: tuple[Path, Path], ct_encoder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The CLI end to end (a one-task suite of the engine), both decoders, on the real CT: the output folder.

    The encoder is vit3d_tiny_32's network (dim 192, 6 blocks, 3 heads, random weights) at a 16^3 input with
    4-voxel patches, saved as a checkpoint folder: the same 64 tokens per window, but 8x fewer voxels for the
    decoder and the loss than at 32^3, which keeps this test within the CPU budget (12 mm tokens at 3 mm).
    """
    from typer.testing import CliRunner

    from medfoundry.cli import app

    out = tmp_path_factory.mktemp("segment")
    checkpoint = ct_encoder
    image, labels = ct_files
    settings = {"batch_size": 2, "crop_pool": 32, "feature_size": 4, "lr": 0.005, "sw_overlap": 0.25}
    args = [
        "segment-probe",
        *("--encoder", str(checkpoint), "--image", str(image), "--labels", str(labels)),
        *("--classes", "liver,spleen,kidney_left,kidney_right", "--decoder", "linear,unetr"),
        *("--steps", "400", "--out", str(out / "probe")),
        *(item for key, value in settings.items() for item in ("--set", f"{key}={value}")),
        *("--set", "n_bootstrap=300"),
    ]
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out / "probe"


@pytest.fixture(scope="module")
def ct_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """vit3d_tiny_32's network at a 16^3 input with 4-voxel patches (random weights) as a checkpoint folder."""
    from medfoundry.models.backbones import create_encoder
    from medfoundry.models.checkpoint import save_encoder

    encoder = create_encoder("vit3d_tiny_32", in_chans=1, img_size=16, patch_size=4, seed=0)
    return save_encoder(encoder, tmp_path_factory.mktemp("ct-encoder") / "encoder")


def _records(out: Path) -> dict[tuple[str, str], dict]:
    raw = json.loads((out / "results.json").read_text())
    return {(r["adapter"], r["metric"]): r for r in raw["records"]}


# Measured with these settings: linear liver 0.64 [0.55, 0.71], mean 0.26; unetr liver 0.51, mean 0.16; kidneys
# stay near 0 on a random encoder. An empty prediction scores 0 on every organ.
@pytest.mark.parametrize(("decoder", "min_liver", "min_mean"), [("linear", 0.45, 0.15), ("unetr", 0.3, 0.08)])
def test_probe_learns_organs_on_held_out_z_block(probe_run: Path, decoder: str, min_liver: float, min_mean: float):
    records = _records(probe_run)
    liver, mean = records[(decoder, "dice_liver")], records[(decoder, "dice_mean")]
    empty = records[("all_background", "dice_liver")]
    assert empty["value"] == 0.0 and records[("all_background", "dice_mean")]["value"] == 0.0
    assert liver["value"] > min_liver, liver
    assert mean["value"] > min_mean, mean
    assert records[(decoder, "dice_spleen")]["value"] > 0.05
    # The CI comes from resampling 2-slice test slabs: it brackets the point estimate and excludes 0.
    assert 0.0 < liver["ci_low"] <= liver["value"] <= liver["ci_high"] <= 1.0
    assert liver["n_test"] == 5 and liver["trainable_params"] > 0 and liver["fit_seconds"] > 0


def test_probe_writes_report_and_overlay(probe_run: Path):
    from medfoundry.evaluate.results import read_results

    results = read_results(probe_run / "results.json")
    task = results.metadata["tasks"]["totalseg_organs"]
    assert task["kind"] == "segmentation"
    assert task["classes"] == ["background", "liver", "spleen", "kidney_left", "kidney_right"]
    assert "test z [10, 20), train z [0, 8), [22, 30)" in task["splits"]["example_ct_sm"]
    metrics = {r.metric for r in results.records}
    assert {"dice_liver", "dice_spleen", "dice_kidney_left", "dice_kidney_right", "dice_mean"} <= metrics
    html = (probe_run / "report.html").read_text()
    assert "dice_liver" in html and "unetr" in html and "all_background" in html
    png = (probe_run / "overlay.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


@pytest.mark.parametrize("decoder", ["linear", "unetr"])
def test_only_decoder_parameters_get_gradients(decoder: str):
    from monai.losses import DiceCELoss

    from medfoundry.models.backbones import create_encoder
    from medfoundry.segment.heads import build_probe

    encoder = create_encoder("vit3d_tiny_32", in_chans=1, img_size=16, patch_size=4, seed=0)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    probe = build_probe(encoder, decoder, n_classes=3, feature_size=4)
    optimizer = torch.optim.AdamW(probe.trainable_parameters(), lr=0.1)
    images = torch.rand(2, 1, 16, 16, 16)
    labels = torch.randint(0, 3, (2, 1, 16, 16, 16))
    probe.train()
    logits = probe(images)
    assert logits.shape == (2, 3, 16, 16, 16)
    DiceCELoss(to_onehot_y=True, softmax=True)(logits, labels).backward()
    optimizer.step()
    assert all(not p.requires_grad and p.grad is None for p in probe.tokens.parameters())
    assert all(p.grad is not None for p in probe.decoder.parameters())
    assert {id(p) for p in probe.trainable_parameters()} == {id(p) for p in probe.decoder.parameters()}
    assert not probe.tokens.encoder.training  # stays in eval mode under probe.train()
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())


def test_z_split_keeps_test_voxels_out_of_training():
    from medfoundry.segment.data import LabelledVolume, cut_blocks, z_split

    split = z_split(30, 0.0, 0.4, margin=2)
    assert split.test == (0, 12) and split.train == ((14, 30),)
    middle = z_split(30, 0.4, 0.6, margin=3)
    assert middle.test == (12, 18) and middle.train == ((0, 9), (21, 30))
    image = np.arange(4 * 4 * 30, dtype=np.float32).reshape(4, 4, 30)
    volume = LabelledVolume(image, np.zeros((4, 4, 30), np.uint8), (3.0,) * 3, Path("ct"), Path("seg"), "ct")
    train, test = cut_blocks(volume, middle)
    test_values = set(test.image.ravel().tolist())
    for block in train:
        assert not np.shares_memory(block.image, volume.image)
        assert test_values.isdisjoint(block.image.ravel().tolist())
    with pytest.raises(DataError, match="no training slices"):
        z_split(10, 0.0, 1.0, margin=0)


def test_dice_matches_monai_and_bootstrap_resamples_slabs():
    from monai.metrics import DiceMetric
    from monai.networks.utils import one_hot

    from medfoundry.segment.metrics import dice_counts, dice_with_ci, slab_units

    rng = np.random.default_rng(0)
    reference = rng.integers(0, 3, (16, 16, 12))
    prediction = np.where(rng.random(reference.shape) < 0.8, reference, rng.integers(0, 3, reference.shape))
    units = slab_units(12, 2)
    assert units == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10), (10, 12)]
    metrics = dice_with_ci(dice_counts(prediction, reference, 3, units), ["background", "a", "b"], n_bootstrap=500)
    monai_dice = DiceMetric(include_background=True)(
        one_hot(torch.as_tensor(prediction)[None, None], 3), one_hot(torch.as_tensor(reference)[None, None], 3)
    )[0]
    for k, name in enumerate(["background", "a", "b"]):
        assert metrics[f"dice_{name}"].value == pytest.approx(float(monai_dice[k]), abs=1e-6)
        assert metrics[f"dice_{name}"].ci_low < metrics[f"dice_{name}"].value < metrics[f"dice_{name}"].ci_high
    assert metrics["dice_mean"].value == pytest.approx(float(monai_dice[1:].mean()), abs=1e-6)
    empty = dice_with_ci(dice_counts(np.zeros_like(reference), reference, 3, units), ["bg", "a", "b"], n_bootstrap=50)
    assert empty["dice_a"].value == empty["dice_a"].ci_high == 0.0


def _save_like(source: Path, target: Path, data: np.ndarray | None = None, affine: np.ndarray | None = None) -> Path:
    image = nib.load(source)
    values = np.asarray(image.dataobj) if data is None else data
    nib.save(nib.Nifti1Image(values, image.affine if affine is None else affine), target)
    return target


def test_bad_input_names_the_file(ct_files: tuple[Path, Path], tmp_path: Path):
    from medfoundry.segment.config import SegmentProbeConfig
    from medfoundry.segment.train import load_probe_data

    image, labels = ct_files
    names = labels.parent / "labels_total.csv"
    seg = np.asarray(nib.load(labels).dataobj)
    cropped = _save_like(labels, tmp_path / "cropped.nii.gz", data=seg[:, :, :20])
    shifted_affine = nib.load(labels).affine.copy()
    shifted_affine[2, 3] += 6.0
    shifted = _save_like(labels, tmp_path / "shifted.nii.gz", affine=shifted_affine)

    def config(label_path: Path, **kwargs: object) -> SegmentProbeConfig:
        return SegmentProbeConfig(images=[image], labels=[label_path], label_names=names, **kwargs)

    with pytest.raises(DataError, match=r"cropped\.nii\.gz: label map has shape \(122, 101, 20\)"):
        load_probe_data(config(cropped))
    with pytest.raises(DataError, match=r"shifted\.nii\.gz: label map affine differs"):
        load_probe_data(config(shifted))
    with pytest.raises(DataError, match=r"labels_total\.csv: class\(es\) 'livr' not in the label names"):
        load_probe_data(config(labels, classes=["livr", "spleen"]))


def test_merge_left_right_and_class_map():
    from medfoundry.segment.data import build_class_map

    names = {"spleen": 1, "kidney_right": 2, "kidney_left": 3, "liver": 5}
    merged = build_class_map(["liver", "kidney_left", "kidney_right"], names, Path("labels.csv"), merge=True)
    assert merged.names == ("background", "liver", "kidney") and merged.source_ids == ((0,), (5,), (3, 2))
    labels = np.array([0, 1, 2, 3, 4, 5, 117])
    assert merged.remap(labels).tolist() == [0, 0, 2, 2, 0, 1, 0]


def test_suite_runs_segmentation_beside_classification_and_resumes(
    ct_files: tuple[Path, Path], ct_encoder: Path, breastmnist_npz: Path, tmp_path: Path
):
    """A suite YAML with a BreastMNIST task and a segmentation task on the real CT: one engine, one results.json.

    Label fractions of a segmentation task draw train blocks: at 0.5 the decoder sees one of the CT's two blocks.
    """
    import yaml
    from helpers import write_breastmnist_subset

    from medfoundry.bench.engine import run_suite
    from medfoundry.bench.segmentation import read_masks
    from medfoundry.config import SuiteConfig, load_config
    from medfoundry.evaluate.results import read_results

    image, labels = ct_files
    breast = write_breastmnist_subset(breastmnist_npz, tmp_path / "breast.npz", 120)
    organs = {
        "images": [str(image)],
        "labels": [str(labels)],
        "classes": ["liver", "spleen"],
        "decoders": ["linear"],
        **{"steps": 30, "batch_size": 2, "crop_pool": 8, "sw_overlap": 0.25, "lr": 0.005},
    }
    suite = {
        "name": "mixed",
        "output_dir": str(tmp_path / "suite"),
        "tasks": [{"name": "breast", "source": str(breast)}, {"name": "organs", "segmentation": organs}],
        "encoders": [
            {"name": "vit2d", "backbone": "vit_tiny_28", "in_chans": 1, "img_size": 28, "tasks": ["breast"]},
            {"name": "ct-vit", "checkpoint": str(ct_encoder), "in_chans": 1, "tasks": ["organs"]},
        ],
        "adapt": {"adapters": ["linear"], "label_fractions": [0.5, 1.0], "seeds": [0]},
        "evaluate": {"n_bootstrap": 50},
        "comparisons": {"reference_adapter": None, "scratch_baseline": False},
    }
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(suite))
    config = load_config(SuiteConfig, path)
    assert config.tasks[1].kind == "segmentation"

    first = run_suite(config, show_progress=False, echo=lambda line: None)
    # breast: linear x 2 fractions; organs: linear x 2 fractions + the empty-prediction baseline x 2.
    assert (first.cells_computed, first.cells_reused) == (6, 0)
    results = read_results(first.results_path)
    seg = {(r.model, r.adapter, r.label_fraction, r.metric): r for r in results.records if r.task == "organs"}
    assert {r.metric for r in results.records if r.task == "breast"} >= {"auroc"}
    for fraction in (0.5, 1.0):
        mean = seg[("ct-vit", "linear", fraction, "dice_mean")]
        assert 0.0 <= mean.ci_low <= mean.value <= mean.ci_high <= 1.0 and mean.n_test == 5
        assert seg[("baseline", "all_background", fraction, "dice_liver")].value == 0.0
    assert seg[("ct-vit", "linear", 1.0, "dice_liver")].value > 0.0
    # One of two 8-slice train blocks at 0.5 (4 two-slice units), both at 1.0.
    assert seg[("ct-vit", "linear", 0.5, "dice_mean")].n_train == 4
    assert seg[("ct-vit", "linear", 1.0, "dice_mean")].n_train == 8
    assert {"dice_background", "dice_liver", "dice_spleen", "dice_mean"} == {key[3] for key in seg}
    meta = results.metadata
    assert meta["primary_metric"] == {"breast": "auroc", "organs": "dice_mean"}
    assert meta["tasks"]["organs"]["classes"] == ["background", "liver", "spleen"]

    predictions = tmp_path / "suite" / "tasks" / "organs" / "predictions" / "ct-vit__linear__1__0.csv"
    rows = predictions.read_text().splitlines()
    assert rows[0] == "unit,class,intersection,predicted,reference,dice" and len(rows) == 1 + 5 * 3
    (mask,) = read_masks(predictions)
    assert mask.shape == (122, 101, 10) and set(np.unique(mask)) <= {0, 1, 2}
    html = first.report_path.read_text()
    assert "dice_mean" in html and "all_background" in html and "AUROC" in html

    again = run_suite(load_config(SuiteConfig, path), show_progress=False, echo=lambda line: None)
    assert (again.cells_computed, again.cells_reused) == (0, 6)
    assert [r.value for r in again.results.records] == [r.value for r in results.records]


def test_suite_segmentation_task_is_checked_when_loaded(ct_files: tuple[Path, Path]):
    from medfoundry.bench.engine import load_task
    from medfoundry.config import TaskConfig
    from medfoundry.errors import MedfoundryError

    image, labels = ct_files
    volumes = {"images": [str(image)], "labels": [str(labels)]}
    with pytest.raises(ValueError, match=r"segmentation\.decoder: unknown key; did you mean 'decoders'"):
        TaskConfig(name="organs", segmentation={**volumes, "decoder": ["linear"]})
    with pytest.raises(ValueError, match="not as source or train"):
        TaskConfig(name="organs", source="x.npz", segmentation=volumes)
    with pytest.raises(ValueError, match="kind segmentation and a segmentation section"):
        TaskConfig(name="organs", source="x.npz", kind="segmentation")
    with pytest.raises(MedfoundryError, match=r"unknown metric\(s\) \['auroc'\]"):
        load_task(TaskConfig(name="organs", segmentation=volumes, metrics=["auroc"]))
