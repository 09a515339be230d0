"""``models export``: the exported folder gives the feature medfoundry evaluated, in timm and in transformers, by
running the model card's own snippets; cards and configs keep private paths out; crafted configs are refused."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from threadpoolctl import threadpool_limits

from medfoundry.errors import ModelError
from medfoundry.models.backbones import Encoder, create_encoder
from medfoundry.models.checkpoint import CARD_FILE, CONFIG_FILE, save_encoder
from medfoundry.models.export import CARD_PATH, SOURCE_CONFIG_FILE, export_checkpoint

torch.set_num_threads(1)
threadpool_limits(1)


def _randomised(encoder: Encoder, seed: int = 0) -> Encoder:
    # timm's init leaves the final norm at exactly 1/0 and the tokens near zero: random values everywhere make a
    # wrong pooling or a dropped norm visible.
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in encoder.backbone.state_dict(keep_vars=True).values():
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.2)
    return encoder.eval()


def _card_snippets(card: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", card, flags=re.DOTALL)


@pytest.mark.parametrize("pool", ["token+avg", "avg", "default"])
def test_card_snippets_give_the_evaluated_feature_in_timm_and_transformers(pool: str, tmp_path: Path) -> None:
    encoder = _randomised(create_encoder("vit_tiny_28", in_chans=1, seed=0, pool=pool))
    out = export_checkpoint(save_encoder(encoder, tmp_path / "ckpt"), tmp_path / "export")
    images = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    normalised = encoder.normalize(images)
    with torch.inference_mode():
        expected = encoder(normalised)
    assert expected.shape[1] == (384 if pool == "token+avg" else 192)
    card = (out / "README.md").read_text()
    snippets = _card_snippets(card)
    assert len(snippets) == 2 and "timm" in snippets[0] and "transformers" in snippets[1]
    for snippet in snippets:
        scope: dict = {"images": normalised.clone()}
        exec(snippet.replace(CARD_PATH, str(out)), scope)  # noqa: S102 - the card's own code, on our export
        torch.testing.assert_close(scope["feature"], expected, rtol=0, atol=1e-5)
    if pool == "token+avg":
        assert "384 dimensions" in card and "192 dimensions" in card  # the card says plain forward is CLS only


def test_export_config_has_num_classes_once(tmp_path: Path) -> None:
    encoder = create_encoder("vit_tiny_28", in_chans=1, seed=0)
    out = export_checkpoint(save_encoder(encoder, tmp_path / "ckpt"), tmp_path / "export")
    config = json.loads((out / CONFIG_FILE).read_text())
    # transformers' TimmWrapper passes the top-level num_classes and model_args together.
    assert config["num_classes"] == 0 and "num_classes" not in config["model_args"]


def test_cards_and_configs_keep_private_paths_out(tmp_path: Path) -> None:
    encoder = create_encoder("vit_tiny_28", in_chans=1, seed=0)
    extra = {
        "ssl_method": "dino",
        "data": "/home/ana/private-cohort/train.npz",
        "pretrain_config": {"data": {"source": "dicom:/srv/pacs/export-2024"}, "output_dir": "/home/ana/runs/x"},
    }
    ckpt = save_encoder(encoder, tmp_path / "ckpt", extra=extra)
    out = export_checkpoint(ckpt, tmp_path / "export")
    for file in (ckpt / CONFIG_FILE, ckpt / CARD_FILE, out / "README.md", out / SOURCE_CONFIG_FILE):
        text = file.read_text()
        assert "/home/ana" not in text and "/srv/pacs" not in text, file
    assert "train.npz" in (ckpt / CARD_FILE).read_text() and "train.npz" in (out / "README.md").read_text()
    assert json.loads((ckpt / CONFIG_FILE).read_text())["pretrain_config"]["data"]["source"] == "dicom:export-2024"


def test_export_refuses_crafted_model_kwargs(tmp_path: Path) -> None:
    encoder = create_encoder("vit_tiny_28", in_chans=1, seed=0)
    ckpt = save_encoder(encoder, tmp_path / "ckpt")
    config = json.loads((ckpt / CONFIG_FILE).read_text())
    config["model_kwargs"]["pretrained_cfg_overlay"] = {"file": "/etc/passwd"}
    (ckpt / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(ModelError, match="pretrained_cfg_overlay") as info:
        export_checkpoint(ckpt, tmp_path / "export")
    assert str(ckpt / CONFIG_FILE) in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "export").exists()


def test_cli_export_help_and_message_name_both_libraries(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from medfoundry.cli import app

    ckpt = save_encoder(create_encoder("vit_tiny_28", in_chans=1, seed=0), tmp_path / "ckpt")
    shutil.rmtree(tmp_path / "export", ignore_errors=True)
    result = CliRunner().invoke(app, ["models", "export", str(ckpt), str(tmp_path / "export")])
    assert result.exit_code == 0, result.output
    assert "transformers" in result.output and "timm" in result.output
