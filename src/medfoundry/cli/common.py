"""What the command modules share: the stderr console, the option types, and reader options (``-o KEY=VALUE``).

Reader options are parsed here and checked against the reader in :func:`medfoundry.data.registry.load_dataset`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
import yaml
from rich.console import Console
from rich.markup import escape

from medfoundry.errors import MedfoundryError

if TYPE_CHECKING:
    from medfoundry.config import ExperimentConfig
    from medfoundry.data.sample import Splits

# Progress and messages go to stderr so that stdout stays clean for tables and Markdown.
console = Console(stderr=True)
state = {"debug": False}

ConfigArg = Annotated[Path | None, typer.Argument(help="YAML recipe (see configs/)")]
OverridesOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="dotted override, e.g. pretrain.epochs=5")]
OutputOpt = Annotated[Path | None, typer.Option("--output", "-o", help="output folder")]
_OPTION_HELP = "reader option KEY=VALUE (VALUE read as YAML), repeatable, e.g. -o image_size=224 -o path_column=file"
ReaderOptionsOpt = Annotated[list[str] | None, typer.Option("--option", "-o", help=_OPTION_HELP)]
# For commands whose -o already means --output.
ReaderOptionsLongOpt = Annotated[list[str] | None, typer.Option("--option", help=_OPTION_HELP)]

_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def echo(line: str) -> None:
    """One message line on stderr, printed as given (no markup, never wrapped)."""
    console.print(escape(line), highlight=False, soft_wrap=True)


def experiment_config(config: Path | None, overrides: list[str] | None, output: Path | None) -> ExperimentConfig:
    """The recipe with ``-s`` overrides and ``--output`` applied (``--output`` wins)."""
    from medfoundry.config import ExperimentConfig, load_config

    values = list(overrides or [])
    if output is not None:
        values.append(f"output_dir={output}")
    return load_config(ExperimentConfig, config, values)


def split_reader_options(values: list[str] | None) -> list[tuple[str, str]]:
    """``KEY=VALUE`` strings as (key, raw value) pairs; a malformed one is a one-line error."""
    pairs = []
    for value in values or []:
        key, sep, raw = value.partition("=")
        key = key.strip()
        if not sep or not _KEY.match(key):
            raise MedfoundryError(f"reader option '{value}' is not of the form KEY=VALUE, e.g. -o image_size=224")
        pairs.append((key, raw))
    return pairs


def parse_reader_options(values: list[str] | None) -> dict[str, Any]:
    """``["image_size=224", "path_column=file"]`` -> ``{"image_size": 224, "path_column": "file"}``."""
    options: dict[str, Any] = {}
    for key, raw in split_reader_options(values):
        try:
            options[key] = yaml.safe_load(raw)
        except yaml.YAMLError as error:
            problem = " ".join(str(getattr(error, "problem", None) or error).split())
            raise MedfoundryError(f"reader option {key}: '{raw}' is not a YAML value ({problem})") from None
    return options


def load_splits(spec: str, options: dict[str, Any]) -> Splits:
    """``load_dataset(spec, **options)``: the option check and the one-line errors live there, for every caller."""
    from medfoundry.data.registry import load_dataset

    return load_dataset(spec, **options)
