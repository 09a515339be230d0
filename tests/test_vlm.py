"""Vision-language: CLIP on VQA-RAD (loss, held-out retrieval, resume), zero-shot prompt ensembles on Kermany,
bad pairs, and the CLI. Tiny models (timm's test_resnet at 32 px, a 1-layer 64-wide BERT) keep it fast."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from medfoundry.cli import app
from medfoundry.config import ModelConfig, PretrainConfig
from medfoundry.errors import MedfoundryError, ModelError
from medfoundry.models.checkpoint import load_encoder
from medfoundry.vlm.clip import embed_texts, load_clip
from medfoundry.vlm.pairs import PairSet, load_pair_images, load_pairs, split_pairs
from medfoundry.vlm.retrieval import chance_recall, evaluate_retrieval, hits_at_k
from medfoundry.vlm.text import TextTokenizer
from medfoundry.vlm.train import train_clip
from medfoundry.vlm.zeroshot import class_embeddings, class_prompts, parse_classes, parse_templates

MODEL = ModelConfig(backbone="test_resnet", img_size=32, in_chans=1)
TINY_TEXT = {"max_tokens": 64, "vocab_size": 2000, "text_width": 64, "text_heads": 2, "text_layers": 1, "embed_dim": 64}
KERMANY_REGEX = r"^(person\d+|(?:NORMAL2-)?IM-\d+)[-_]"
CLASSES = "normal=normal chest x-ray|clear lungs;pneumonia=pneumonia|lung opacity"
TEMPLATES = "{}.|a chest x-ray showing {}.|there is {}."


def tiny_config(epochs: int, batch_size: int = 32, **clip: object) -> PretrainConfig:
    return PretrainConfig(
        method="clip",
        epochs=epochs,
        batch_size=batch_size,
        lr=2e-3,
        warmup_epochs=2,
        weight_decay=0.05,
        weight_decay_end=0.05,
        log_every_steps=1,
        checkpoint_every_steps=1000,
        clip={**TINY_TEXT, **clip},
    )


@pytest.fixture(scope="module")
def vqa_splits(shared_data: Path) -> dict[str, PairSet]:
    folder = shared_data / "vqa_rad"
    if not folder.is_dir():
        pytest.skip("VQA-RAD is absent from the shared data")
    return split_pairs(load_pairs(f"vqa_rad:{folder}"), test_fraction=0.2, seed=0)


@pytest.fixture(scope="module")
def trained(vqa_splits: dict[str, PairSet], tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    torch.set_num_threads(2)
    out = tmp_path_factory.mktemp("clip")
    return train_clip(vqa_splits["train"], MODEL, tiny_config(epochs=8), out, show_progress=False)


def test_vqa_rad_pairs_are_split_by_image(vqa_splits: dict[str, PairSet]) -> None:
    train, test = vqa_splits["train"], vqa_splits["test"]
    assert len(train) + len(test) == 314  # 315 images, one has no questions
    assert not set(train.image_ids) & set(test.image_ids)
    texts, owner = train.texts()
    assert len(texts) > 2 * len(train) and owner.max() == len(train) - 1
    assert all(t.split(".")[0] in ("head", "chest", "abdomen") for t in texts)
    assert len(train.skipped) == 0


def test_clip_training_lowers_loss_and_retrieves_held_out_images(trained, vqa_splits) -> None:  # noqa: ANN001
    losses = trained.losses
    assert trained.finished and len(losses) == trained.total_steps
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert first > math.log(32) - 0.5  # about chance at the start (batch 32)
    assert last < 0.75 * first, (first, last)
    # The folder: our image-encoder checkpoint, a Hugging Face text folder with its tokenizer, projections.
    assert load_encoder(trained.model_dir / "image_encoder").embed_dim > 0
    assert (trained.model_dir / "text" / "tokenizer.json").is_file()
    info = json.loads((trained.model_dir / "clip.json").read_text())
    assert info["loss_end"] < info["loss_start"]

    result = evaluate_retrieval(trained.model_dir, vqa_splits["test"], n_bootstrap=200)
    assert result.seen_in_training == 0 and result.n_images == len(vqa_splits["test"])
    # Measured with this config, seeds 0/1/2: image-to-text R@10 0.38/0.37/0.38 (chance 0.15), text-to-image
    # 0.40/0.41/0.39 (chance 0.16), i.e. at least 2.4x chance; the thresholds keep a margin below that.
    for direction in ("image_to_text", "text_to_image"):
        recall = result.recalls[f"{direction}@10"]
        assert recall.value > 1.8 * recall.chance and recall.ci_low > recall.chance, (direction, recall)


def test_zero_shot_prompt_ensemble_on_kermany(trained, shared_data: Path, tmp_path: Path) -> None:  # noqa: ANN001
    kermany = shared_data / "kermany_cxr_224_trainsubset"
    if not kermany.is_dir():
        pytest.skip("Kermany subset is absent from the shared data")
    out = tmp_path / "zs"
    run = CliRunner().invoke(
        app,
        ["zero-shot", "-m", str(trained.model_dir), "-d", f"folder:{kermany}", "--classes", CLASSES]
        + ["--templates", TEMPLATES, "--patient-regex", KERMANY_REGEX, "-o", str(out), "--n-bootstrap", "200"],
    )
    assert run.exit_code == 0, run.output
    results = json.loads((out / "results.json").read_text())
    metrics = {r["metric"]: r for r in results["records"]}
    assert set(metrics) == {"auroc", "balanced_accuracy"}
    # The folder names no patients unless a regex reads them from the file names (as here: 598 of them).
    (grouping,) = [task["grouping"] for task in results["metadata"]["tasks"].values()]
    assert grouping == "test split only (600 images of 598 patients); no label is used"
    for record in metrics.values():
        assert record["adapter"] == "zero-shot" and record["n_train"] == 0 and record["n_test"] == 600
        assert record["ci_low"] <= record["value"] <= record["ci_high"]
    assert (out / "report.html").is_file()
    predictions = next(out.glob("tasks/*/predictions/*.csv"))  # the engine's layout: one folder per task
    proba = np.loadtxt(predictions, delimiter=",", skiprows=1, usecols=(3, 4))
    assert proba.shape == (600, 2) and np.all((proba >= 0) & (proba <= 1))
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-6)

    # The ensemble embedding is the normalised mean of the normalised prompt embeddings.
    loaded = load_clip(trained.model_dir)
    prompts = class_prompts(parse_classes(CLASSES), parse_templates(TEMPLATES))
    assert len(prompts["pneumonia"]) == 6  # 3 templates x 2 phrasings
    ensemble = class_embeddings(loaded.model, loaded.tokenizer, prompts)
    for row, texts in zip(ensemble, prompts.values(), strict=True):
        single = embed_texts(loaded.model, loaded.tokenizer, texts)
        torch.testing.assert_close(row, F.normalize(single.mean(dim=0), dim=0))
        assert not torch.allclose(row, single[0], atol=1e-3)  # the ensemble is not one prompt
    assert torch.allclose(ensemble.norm(dim=1), torch.ones(2))


def test_retrieval_cli_writes_recall_and_chance(trained, shared_data: Path, tmp_path: Path) -> None:  # noqa: ANN001
    out = tmp_path / "ret"
    run = CliRunner().invoke(
        app,
        ["retrieval", "-m", str(trained.model_dir), "-p", f"vqa_rad:{shared_data / 'vqa_rad'}", "-o", str(out)]
        + ["--n-bootstrap", "100"],
    )
    assert run.exit_code == 0, run.output
    written = json.loads((out / "retrieval.json").read_text())
    assert written["seen_in_training"] == 0 and written["split"] == "test"
    for direction in ("image_to_text", "text_to_image"):
        for k in (1, 5, 10):
            entry = written["recall"][f"{direction}@{k}"]
            assert 0 <= entry["value"] <= 1 and 0 < entry["chance"] < 1
    assert written["recall"]["text_to_image@10"]["chance"] == pytest.approx(10 / written["n_images"])
    models = {r["model"] for r in json.loads((out / "results.json").read_text())["records"]}
    assert "chance" in models and len(models) == 2


def test_recall_and_chance_are_exact() -> None:
    owner = np.array([0, 0, 1, 2, 3])  # image 0 owns two texts
    perfect = np.where(owner[None, :] == np.arange(4)[:, None], 1.0, 0.0)
    hits = hits_at_k(perfect, owner, (1, 2))
    assert hits["image_to_text@1"].mean() == 1.0 and hits["text_to_image@1"].mean() == 1.0
    chance = chance_recall(owner, 4, (1, 2))
    # Image 0: 2 of 5 texts; the others 1 of 5. Recall@1 by chance: (2/5 + 3 * 1/5) / 4.
    assert chance["image_to_text@1"] == pytest.approx((0.4 + 0.6) / 4)
    assert chance["text_to_image@2"] == pytest.approx(0.5)
    rng = np.random.default_rng(0)
    simulated = np.mean([hits_at_k(rng.random((4, 5)), owner, (2,))["image_to_text@2"].mean() for _ in range(4000)])
    assert simulated == pytest.approx(chance["image_to_text@2"], abs=0.02)


def test_resume_after_interruption_matches_an_uninterrupted_run(vqa_splits, tmp_path: Path) -> None:  # noqa: ANN001
    pairs = vqa_splits["train"].subset(np.arange(32))
    config = tiny_config(epochs=3, batch_size=16, max_tokens=32, text_layers=1)
    whole = train_clip(pairs, MODEL, config, tmp_path / "whole", show_progress=False)
    stopped = train_clip(pairs, MODEL, config, tmp_path / "resumed", stop_after_steps=2, show_progress=False)
    assert not stopped.finished and stopped.steps == 2 and not (tmp_path / "resumed" / "clip").exists()
    resumed = train_clip(pairs, MODEL, config, tmp_path / "resumed", show_progress=False)
    assert resumed.resumed_from_step == 2 and resumed.finished and resumed.steps == whole.steps == 6
    np.testing.assert_allclose(resumed.losses, whole.losses, rtol=1e-5)
    a, b = load_clip(whole.model_dir).model.state_dict(), load_clip(resumed.model_dir).model.state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], msg=name)
    # Another config in the same folder is refused rather than silently mixed.
    with pytest.raises(MedfoundryError, match="another config"):
        train_clip(pairs, MODEL, tiny_config(epochs=4, batch_size=16, max_tokens=32), tmp_path / "resumed")


def test_clip_resume_follows_the_images_not_their_paths(vqa_splits, tmp_path: Path) -> None:  # noqa: ANN001
    """The pairs' images copied elsewhere resume the run; one image replaced is other data and is refused."""
    pairs = vqa_splits["train"].subset(np.arange(16))
    config = tiny_config(epochs=2, batch_size=16, max_tokens=32, text_layers=1)
    train_clip(pairs, MODEL, config, tmp_path / "run", stop_after_steps=1, show_progress=False)
    (tmp_path / "copy").mkdir()
    copies = [tmp_path / "copy" / f"{i}{path.suffix}" for i, path in enumerate(pairs.image_paths)]
    for path, copy in zip(pairs.image_paths, copies, strict=True):
        copy.write_bytes(path.read_bytes())
    swapped = dataclasses.replace(pairs, image_paths=[pairs.image_paths[1], *pairs.image_paths[1:]])
    with pytest.raises(MedfoundryError, match="another config or data"):
        train_clip(swapped, MODEL, config, tmp_path / "run", show_progress=False)
    moved = train_clip(dataclasses.replace(pairs, image_paths=copies), MODEL, config, tmp_path / "run")
    assert moved.resumed_from_step == 1 and moved.finished


def _bad_pairs_csv(folder: Path, images: list[Path]) -> Path:
    (folder / "broken.jpg").write_bytes(b"not a jpeg at all")
    rows = [
        "image,text,patient_id",
        f"{images[0]},chest. is there a pneumothorax? no.,p0",
        f"{images[1]},head. is this an mri? yes.,p1",
        f"{images[2]},abdomen. {'is the liver enlarged? no. ' * 40},p2",  # over-long: truncated, counted
        f"{images[3]},chest. is the heart enlarged? yes.,p3",
        f"{images[4]},head. is there a mass? yes.,p4",
        f"{images[5]},chest. is this a pa film? yes.,p5",
        f"{folder / 'missing.jpg'},chest. no such file.,p6",
        f"{images[6]},   ,p7",
        ",head. a text without an image.,p8",
        f"{folder / 'broken.jpg'},chest. an unreadable image.,p9",
    ]
    path = folder / "pairs.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def test_bad_pairs_are_skipped_with_a_line_each_and_a_summary(
    shared_data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    images = sorted((shared_data / "vqa_rad" / "data_RAD" / "images").glob("*.jpg"))[:7]
    if len(images) < 7:
        pytest.skip("VQA-RAD images are absent")
    csv_path = _bad_pairs_csv(tmp_path, images)
    with caplog.at_level(logging.WARNING, logger="medfoundry.vlm"):
        pairs = load_pairs(csv_path)
        decoded, kept = load_pair_images(pairs, 32, 1)
    assert len(pairs) == 7 and len(kept) == 6 and decoded.shape == (6, 1, 32, 32)
    assert kept.skipped.counts() == {
        "image file not found": 1,
        "empty text": 1,
        "no image path": 1,
        "unreadable image": 1,
    }
    text = caplog.text
    assert "missing.jpg: image file not found" in text and "broken.jpg: unreadable image" in text
    assert f"{images[6]}: empty text" in text and "pairs.csv:10: no image path" in text
    assert kept.skipped.summary().startswith("skipped 4 pairs:")

    # The same rows as JSON give the same pairs.
    rows = [
        {"image": str(p), "text": t[0], "patient_id": pid}
        for p, t, pid in zip(pairs.image_paths, pairs.captions, pairs.patient_ids, strict=True)
    ]
    (tmp_path / "pairs.json").write_text(
        json.dumps({"pairs": [*rows, {"image": str(tmp_path / "gone.png"), "text": "x"}]})
    )
    from_json = load_pairs(tmp_path / "pairs.json")
    assert from_json.captions == pairs.captions and from_json.skipped.counts() == {"image file not found": 1}

    tokenizer = TextTokenizer.train(kept.texts()[0], max_tokens=24, vocab_size=200, min_frequency=1)
    encoded = tokenizer.encode(kept.texts()[0])
    assert encoded.n_truncated == 1 and encoded.input_ids.shape[1] == 24

    # The CLI trains on what is left, and says what was skipped.
    out = tmp_path / "run"
    sets = ["-s", "model.backbone=test_convnext", "-s", "model.img_size=32", "-s", "pretrain.epochs=2"]
    sets += ["-s", "pretrain.batch_size=4", "-s", "pretrain.clip.max_tokens=24", "-s", "pretrain.clip.vocab_size=200"]
    sets += [
        "-s",
        "pretrain.clip.text_width=32",
        "-s",
        "pretrain.clip.text_heads=2",
        "-s",
        "pretrain.clip.test_fraction=0.34",
    ]
    sets += ["-s", "pretrain.clip.min_frequency=1"]
    run = CliRunner().invoke(app, ["pretrain", "--method", "clip", "--data", str(csv_path), "-o", str(out), *sets])
    assert run.exit_code == 0, run.output
    info = json.loads((out / "pretrain" / "clip" / "clip.json").read_text())
    # Unreadable images are found when decoded: broken.jpg counts here only if the split put it in train.
    assert info["n_train_images"] in (3, 4) and info["skipped"].startswith(("skipped 3 pairs", "skipped 4 pairs"))
    assert all(f"1 {reason}" in info["skipped"] for reason in ("empty text", "image file not found", "no image path"))
    assert info["n_truncated_texts"] in (0, 1)  # the over-long text is in train or test, depending on the split


def test_local_text_checkpoint_and_clear_errors(vqa_splits, tmp_path: Path) -> None:  # noqa: ANN001
    from medfoundry.vlm.text import build_text_model, save_text_model

    pairs = vqa_splits["train"].subset(np.arange(16))
    tokenizer = TextTokenizer.train(pairs.texts()[0], max_tokens=32, vocab_size=300, min_frequency=1)
    folder = tmp_path / "my-bert"
    save_text_model(build_text_model(tokenizer.vocab_size, 32, 32, 1, 2, 0.0, tokenizer.pad_id), folder)
    config = tiny_config(epochs=1, batch_size=8, max_tokens=32, text_checkpoint=str(folder))
    with pytest.raises(ModelError, match="tokenizer.json"):
        train_clip(pairs, MODEL, config, tmp_path / "no-tokenizer", show_progress=False)
    tokenizer.save(folder / "tokenizer.json")
    result = train_clip(pairs, MODEL, config, tmp_path / "run", show_progress=False)
    assert result.finished and "checkpoint" in json.loads((result.model_dir / "clip.json").read_text())["text_source"]
    with pytest.raises(MedfoundryError, match="name=phrasing"):
        parse_classes("normal=;pneumonia=opacity")
    with pytest.raises(MedfoundryError, match="at least 2 classes"):
        parse_classes("normal=clear lungs")
    with pytest.raises(MedfoundryError, match=r"\{\}"):
        parse_templates("a chest x-ray")
    with pytest.raises(ModelError, match="not a CLIP model folder"):
        load_clip(tmp_path)
