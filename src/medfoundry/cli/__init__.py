"""The ``medfoundry`` command: one thin module per command group over the Python API.

Every module in ``COMMAND_MODULES`` has ``register(root)``, which adds its commands (or its command group) to
the root app; a new command is one module plus its name here. Errors caused by input (missing files, bad
configs, unknown models) print one line and exit 1; ``--debug`` shows the full traceback instead.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import warnings
from importlib.metadata import version
from typing import Annotated, Any

import typer
from rich.logging import RichHandler
from rich.markup import escape

from medfoundry.cli.common import console, state
from medfoundry.errors import MedfoundryError

# In --help order: the pipeline first, then the per-domain commands.
COMMAND_MODULES = (
    "run",
    "eval",
    "probe",
    "pretrain",
    "distill",
    "embed",
    "report",
    "compare",
    "robustness",
    "mil",
    "data",
    "models",
    "wsi",
    "segment",
    "vlm",
)

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Pre-train, adapt and benchmark medical imaging foundation models.",
)


def _print_version(value: bool) -> None:
    if value:
        print(f"medfoundry {version('medfoundry')}")
        raise typer.Exit()


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="show tracebacks")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="more log lines")] = False,
    _version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="print the version and exit")
    ] = False,
) -> None:
    state["debug"] = debug
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not debug:
        warnings.showwarning = _one_line_warning
    # Our own progress at INFO; libraries (numexpr, h5py, ...) only when they warn, unless --verbose.
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False, show_time=False)],
    )
    logging.getLogger("medfoundry").setLevel(logging.DEBUG if verbose else logging.INFO)


def _one_line_warning(
    message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None, line: Any = None
) -> None:
    # A user needs the message, not the library line that raised it (--debug keeps Python's own format).
    console.print(f"[yellow]warning:[/] {escape(str(message))}", highlight=False, soft_wrap=True)


for _name in COMMAND_MODULES:
    importlib.import_module(f"{__name__}.{_name}").register(app)


def main() -> None:
    try:
        app()
    except MedfoundryError as error:
        if state["debug"]:
            raise
        # soft_wrap: one line however long, not wrapped at the console width (80 when piped).
        console.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        console.print("interrupted; finished stages and checkpoints are kept, run again to resume")
        sys.exit(130)
