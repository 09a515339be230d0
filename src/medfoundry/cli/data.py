"""``medfoundry data fetch|info``: get and inspect datasets, over :mod:`medfoundry.data`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from medfoundry.cli.common import ReaderOptionsOpt, console, parse_reader_options
from medfoundry.errors import MedfoundryError

if TYPE_CHECKING:
    import numpy as np

app = typer.Typer(no_args_is_help=True, help="Get and inspect datasets.")


@app.command("fetch")
def fetch(
    source: Annotated[str, typer.Argument(help="collection (medmnist)")],
    name: Annotated[str, typer.Argument(help="dataset name, e.g. breastmnist")],
    size: Annotated[int, typer.Option(help="28, 64, 128 or 224")] = 28,
    dest: Annotated[Path, typer.Option(help="download folder")] = Path("data"),
) -> None:
    """Download an official dataset file with md5 verification (says so clearly when offline)."""
    from medfoundry.data.fetch import fetch_medmnist

    if source != "medmnist":
        raise MedfoundryError(f"unknown collection '{source}'; known: medmnist")
    path = fetch_medmnist(name, size, dest, progress=True)
    console.print(f"{path} (md5 verified)")


@app.command("info")
def info(spec: Annotated[str, typer.Argument(help="dataset spec")], reader_options: ReaderOptionsOpt = None) -> None:
    """Splits, sizes, channels and label counts of a dataset."""
    from medfoundry.data.registry import load_dataset

    table = Table("split", "images", "shape", "labels")
    for split, images in load_dataset(spec, **parse_reader_options(reader_options)).items():
        table.add_row(split, str(len(images)), str(tuple(images.load(0).shape)), _label_counts(images.labels))
    Console().print(table)


def _label_counts(labels: np.ndarray | None) -> str:
    """Count per class index (0, 1, ...), or per value when the labels are not class indices; "-" when unlabelled.

    Readers refuse negative labels, but a user-registered reader may not: a count must never crash ``info``.
    """
    import numpy as np

    if labels is None or labels.ndim != 1 or len(labels) == 0:
        return "-"
    if np.issubdtype(labels.dtype, np.integer) and labels.min() >= 0:
        return str(np.bincount(labels).tolist())
    values, counts = np.unique(labels, return_counts=True)
    return ", ".join(f"{value}: {count}" for value, count in zip(values.tolist(), counts.tolist(), strict=True))


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="data")
