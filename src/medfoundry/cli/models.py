"""``medfoundry models list|show|export``: backbones, public foundation models and checkpoints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from medfoundry.cli.common import console

app = typer.Typer(no_args_is_help=True, help="Backbones and checkpoints.")


@app.command("list")
def list_models() -> None:
    """Named backbone presets (any timm model name works too)."""
    from medfoundry.models.backbones import list_backbones
    from medfoundry.models.public import list_public_models

    table = Table("name", "timm architecture", "description", title="Backbone presets (random init)")
    for row in list_backbones():
        table.add_row(*row)
    Console().print(table)
    public = Table("name", "model", "domain", "token", "licence", title="Public foundation models (local weights)")
    for entry in list_public_models():
        # The full licence text (with its conditions) is in `models show NAME`.
        licence = entry.licence.split(" (")[0].split(";")[0]
        public.add_row(entry.name, entry.title, entry.domain, entry.token, licence)
    Console().print(public)
    Console().print("Load one with -m public:NAME:PATH (a local file or snapshot folder); details: models show NAME")


@app.command("show")
def show(name: Annotated[str, typer.Argument(help="public model name (see `models list`)")]) -> None:
    """Architecture, preprocessing, token, licence and weight source of a public foundation model."""
    from medfoundry.models.public import get_public_model

    entry = get_public_model(name)
    table = Table("field", "value", title=entry.title, show_header=False)
    size = f"{entry.input_size} px" if entry.input_size else "any (fully convolutional)"
    rows = {
        "name": entry.name,
        "domain": entry.domain,
        "architecture": entry.architecture,
        "timm builder": f"{entry.timm_name} {json.dumps(dict(entry.timm_kwargs))}",
        "input": f"{entry.in_chans} channel(s), {size}",
        "normalisation": f"mean {list(entry.mean)}, std {list(entry.std)} (on 0..1 values)",
        "token": f"{entry.token} (Encoder pool '{entry.pool}')",
        "licence": entry.licence,
        "weights": entry.weights,
        "usual file names": ", ".join(entry.weight_files) or "-",
        "key layout": entry.key_format,
        "test variant": json.dumps(dict(entry.test_kwargs)),
        "notes": entry.notes or "-",
        "load with": f"-m public:{entry.name}:/path/to/weights",
    }
    for field, value in rows.items():
        table.add_row(field, escape(value))
    Console().print(table)


@app.command("export")
def export(
    checkpoint_dir: Annotated[Path, typer.Argument(help="checkpoint folder (config.json + model.safetensors)")],
    out_dir: Annotated[
        Path,
        typer.Argument(
            help="output folder in timm's Hugging Face layout; loads with timm (local-dir:OUT) and with "
            "transformers AutoModel (built-in timm wrapper, no remote code)"
        ),
    ],
    licence: Annotated[str, typer.Option(help="licence written to the card and config")] = "apache-2.0",
    overwrite: Annotated[bool, typer.Option(help="replace a non-empty output folder")] = False,
) -> None:
    """Export a checkpoint as a timm / transformers folder (safetensors, timm config.json, README.md model card with
    the lines that give the feature medfoundry evaluated)."""
    from medfoundry.models.export import export_checkpoint

    out = export_checkpoint(checkpoint_dir, out_dir, licence=licence, overwrite=overwrite)
    console.print(
        f"{out}: checked with timm and transformers; load with timm.create_model('local-dir:{out.resolve()}', "
        f"pretrained=True) or transformers.AutoModel.from_pretrained('{out.resolve()}'); the feature medfoundry "
        f"evaluated: {out / 'README.md'}, section Load"
    )


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="models")
