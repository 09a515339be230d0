"""Full fine-tuning with layer-wise LR decay and LoRA, on real BreastMNIST images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medfoundry.adapt.finetune import FineTuneConfig, FineTuner, layer_decay_param_groups
from medfoundry.bench.classification import finetune_settings
from medfoundry.bench.run import run_experiment
from medfoundry.config import EncoderConfig, ExperimentConfig, load_config
from medfoundry.data.medmnist import load_medmnist_npz
from medfoundry.data.sample import ImageSet
from medfoundry.errors import ModelError
from medfoundry.evaluate.metrics import auroc
from medfoundry.evaluate.results import read_results
from medfoundry.models.backbones import create_encoder
from medfoundry.models.checkpoint import load_encoder, save_encoder
from medfoundry.models.features import prepare_batch

NPZ = Path(__file__).resolve().parents[1] / "data" / "breastmnist" / "breastmnist.npz"


@pytest.fixture(scope="module")
def data() -> tuple[ImageSet, ImageSet]:
    torch.set_num_threads(1)
    splits = load_medmnist_npz(NPZ)
    train, val = splits["train"], splits["val"]
    rng = np.random.default_rng(0)
    # Both classes in both subsets, so validation AUROC is defined.
    train_idx = np.concatenate([rng.choice(np.flatnonzero(train.labels == c), 32, replace=False) for c in (0, 1)])
    val_idx = np.concatenate([rng.choice(np.flatnonzero(val.labels == c), 16, replace=False) for c in (0, 1)])
    return train.subset(train_idx), val.subset(val_idx)


def _batch(images: ImageSet) -> torch.Tensor:
    return torch.from_numpy(np.stack([images.load(i) for i in range(len(images))]))


def _check_proba(proba: np.ndarray, n: int) -> None:
    assert proba.shape == (n, 2)
    assert np.all(proba >= 0) and np.all(proba <= 1)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-6)


def test_lora_trains_only_lora_and_head_and_merges(data: tuple[ImageSet, ImageSet], tmp_path: Path) -> None:
    train, val = data
    encoder = create_encoder("vit_tiny_28", in_chans=1, seed=0)
    initial = {k: v.clone() for k, v in encoder.backbone.state_dict().items()}
    tuner = FineTuner(
        encoder,
        2,
        mode="lora",
        lr=1e-2,
        max_steps=8,
        eval_every_steps=4,
        patience_evals=5,
        batch_size=16,
        lora_rank=4,
        lora_alpha=8,
    ).build()
    head_before = {k: v.clone() for k, v in tuner.head_.state_dict().items()}
    tuner.fit(train, val)
    assert tuner.steps_ == 8
    # A small share: 6 blocks x rank 4 x (192 + 576) LoRA weights plus the 2 x 192 + 2 head.
    assert tuner.trainable_parameters_ == 6 * 4 * (192 + 576) + 2 * 192 + 2
    assert tuner.trainable_parameters_ / tuner.total_parameters_ < 0.02

    trained = tuner.encoder_.backbone
    base_state = trained.get_base_model().state_dict()
    lora_changed = 0
    for name, value in base_state.items():
        if "lora_" in name:
            lora_changed += not torch.equal(value, torch.zeros_like(value)) and "lora_B" in name
            continue
        original = name.replace(".base_layer.", ".")
        torch.testing.assert_close(value, initial[original], rtol=0, atol=0, msg=f"{name} changed")
    assert lora_changed == 6  # every block's lora_B left its zero start
    assert any(not torch.equal(tuner.head_.state_dict()[k], v) for k, v in head_before.items())
    assert encoder.backbone.state_dict().keys() == initial.keys()  # the input encoder is not modified
    for name, value in encoder.backbone.state_dict().items():
        assert torch.equal(value, initial[name])

    merged = tuner.merged_encoder()
    assert set(merged.backbone.state_dict()) == set(initial)  # timm's own names
    prepare = prepare_batch(merged, _batch(val))
    with torch.inference_mode():
        tuner.encoder_.eval()
        unmerged_features = tuner.encoder_(prepare)
        merged_features = merged(prepare)
    torch.testing.assert_close(merged_features, unmerged_features, rtol=0, atol=1e-5)
    assert not torch.allclose(merged.backbone.blocks[0].attn.qkv.weight, initial["blocks.0.attn.qkv.weight"])

    folder = save_encoder(merged, tmp_path / "lora-merged")
    reloaded = load_encoder(folder).eval()
    with torch.inference_mode():
        torch.testing.assert_close(reloaded(prepare), merged_features, rtol=0, atol=0)


def test_lora_rejects_backbone_without_qkv() -> None:
    encoder = create_encoder("resnet18", in_chans=1, seed=0)
    with pytest.raises(ModelError, match="LoRA needs a ViT .* backbone 'resnet18' has none"):
        FineTuner(encoder, 2, mode="lora")


def test_layer_decay_param_groups() -> None:
    encoder = create_encoder("vit_tiny_28", in_chans=1, seed=0)
    head = torch.nn.Linear(encoder.embed_dim, 2)
    base, decay, depth = 1e-3, 0.75, 6
    groups = layer_decay_param_groups(encoder.backbone, head, base, 0.05, decay)
    lr_of = {name: group["lr"] for group in groups for name in group["names"]}
    wd_of = {name: group["weight_decay"] for group in groups for name in group["names"]}
    assert len(lr_of) == sum(1 for _ in encoder.backbone.parameters()) + 2  # every parameter, once
    for name in ("cls_token", "pos_embed", "patch_embed.proj.weight"):
        assert lr_of[name] == pytest.approx(base * decay ** (depth + 1))
    for block in range(depth):
        layer = block + 1
        assert lr_of[f"blocks.{block}.attn.qkv.weight"] == pytest.approx(base * decay ** (depth + 1 - layer))
        assert lr_of[f"blocks.{block}.mlp.fc2.bias"] == pytest.approx(base * decay ** (depth + 1 - layer))
    assert lr_of["norm.weight"] == lr_of["head.weight"] == pytest.approx(base)
    assert wd_of["blocks.0.attn.qkv.weight"] == 0.05 and wd_of["head.weight"] == 0.05
    assert wd_of["blocks.0.attn.qkv.bias"] == wd_of["cls_token"] == wd_of["norm.weight"] == 0.0
    # A CNN has no blocks to decay over: every parameter at the base rate.
    cnn = create_encoder("resnet18", in_chans=1, seed=0)
    assert {g["lr"] for g in layer_decay_param_groups(cnn.backbone, head, base, 0.05, decay)} == {base}


def test_random_weights_fine_tune_without_layer_decay(tmp_path: Path) -> None:
    """Layer-wise decay protects pre-trained layers; the same ViT from random weights trains every layer at one lr."""
    tune = FineTuneConfig(modes=["full"], layer_decay=0.75)
    pretrained = EncoderConfig(name="fm", checkpoint=tmp_path / "ckpt")
    assert finetune_settings(tune, pretrained).layer_decay == 0.75
    recipe = tmp_path / "recipe.yaml"
    for random in (
        EncoderConfig(name="init", recipe=recipe, untrained=True),
        EncoderConfig(name="vit", backbone="vit_tiny_28"),
    ):
        assert random.random_weights and finetune_settings(tune, random).layer_decay == 1.0
    assert tune.layer_decay == 0.75  # the suite's own settings are left as they were


def test_full_finetune_learns_and_keeps_best_weights(data: tuple[ImageSet, ImageSet]) -> None:
    train, val = data
    encoder = create_encoder("vit_tiny_28", in_chans=1, seed=0)

    def fit() -> FineTuner:
        return FineTuner(
            encoder,
            2,
            mode="full",
            lr=3e-4,
            layer_decay=0.75,
            max_steps=24,
            eval_every_steps=4,
            patience_evals=3,
            batch_size=32,
            seed=1,
            augment=False,
        ).fit(train, val)

    tuner = fit()
    # The optimizer's groups carry the decayed rates (AdamW has no schedule here to change them).
    top = max(g["layer_id"] for g in tuner.optimizer_.param_groups)
    for group in tuner.optimizer_.param_groups:
        assert group["lr"] == pytest.approx(3e-4 * 0.75 ** (top - group["layer_id"]))
    assert tuner.trainable_parameters_ == tuner.total_parameters_
    losses = tuner.history_.losses
    assert np.mean(losses[-4:]) < np.mean(losses[:4])
    scores = tuner.history_.scores
    assert len(scores) >= 2 and tuner.best_step_ in [step for step, _ in scores]
    assert tuner.best_score_ == max(score for _, score in scores)
    # The kept weights are the best evaluation's, not the last step's (early stopping ended this run).
    assert tuner.best_step_ < tuner.steps_ < 24
    assert auroc(val.labels, tuner.predict_proba(val)) == pytest.approx(tuner.best_score_, abs=1e-12)
    _check_proba(tuner.predict_proba(train), len(train))

    again = fit()
    assert again.history_.losses == losses and again.history_.scores == scores
    np.testing.assert_array_equal(again.predict_proba(val), tuner.predict_proba(val))


def test_run_experiment_with_finetuning_cells(breastmnist_npz: Path, tmp_path: Path) -> None:
    """`finetune.modes: [full, lora]` adds fine-tuning cells on the same label subsets, with predictions files."""
    torch.set_num_threads(1)
    archive = np.load(breastmnist_npz)
    small = tmp_path / "breast_small.npz"
    np.savez(small, **{key: archive[key][:64] if key.startswith("train") else archive[key] for key in archive.files})
    settings = [
        f"data.source={small}",
        f"output_dir={tmp_path / 'run'}",
        "pretrain.epochs=1",
        "pretrain.batch_size=32",
        "pretrain.tensorboard=false",
        "pretrain.views.n_local_views=2",
        "pretrain.dino.out_dim=64",
        "random_init_baseline=false",
        "adapt.adapters=[knn]",
        "adapt.label_fractions=[1.0]",
        "adapt.seeds=[0]",
        "supervised_baseline.enabled=false",
        "finetune.modes=[full, lora]",
        "finetune.max_steps=4",
        "finetune.eval_every_steps=2",
        "finetune.batch_size=32",
        "evaluate.n_bootstrap=50",
    ]
    config = load_config(ExperimentConfig, Path("configs/demo/breastmnist_dino.yaml"), settings)
    out = run_experiment(config, show_progress=False, echo=lambda _: None)
    records = read_results(out.results_path).records
    assert {r.adapter for r in records} == {"knn", "finetune-full", "finetune-lora"}
    tuned = [r for r in records if r.adapter.startswith("finetune")]
    assert len(tuned) == 2 * 4 and all(r.n_train == 64 and r.n_test == 156 for r in tuned)
    assert (tmp_path / "run" / "tasks" / "breastmnist" / "predictions" / "dino__finetune-lora__1__0.csv").is_file()
