"""``medfoundry embed``: one split into HDF5, over :func:`medfoundry.models.features.embed`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from medfoundry.cli.common import ReaderOptionsOpt, console, load_splits, parse_reader_options
from medfoundry.errors import MedfoundryError

if TYPE_CHECKING:
    import torch


def embed(
    model: Annotated[str, typer.Option("--model", "-m", help="checkpoint folder, preset or timm name")],
    data: Annotated[str, typer.Option("--data", "-d", help="dataset spec: file.npz, file.csv, folder, prefix:path")],
    out: Annotated[Path, typer.Option("--out", help="output HDF5 file")],
    split: Annotated[str, typer.Option(help="split to embed")] = "test",
    batch_size: Annotated[int, typer.Option(help="images per batch")] = 128,
    num_workers: Annotated[int, typer.Option(help="DataLoader workers")] = 0,
    img_size: Annotated[int | None, typer.Option(help="input size for a preset or timm name")] = None,
    device: Annotated[str | None, typer.Option("--device", help="cpu or cuda (default: cuda when present)")] = None,
    reader_options: ReaderOptionsOpt = None,
) -> None:
    """Embed one split into HDF5 (features, ids, labels); reused when weights, preprocessing and data match.

    Under torchrun the ranks embed shards and rank 0 merges them into the same file (docs/distributed.md).
    """
    options = parse_reader_options(reader_options)  # before the slow imports: typos fail fast
    from medfoundry.models.checkpoint import load_encoder_or_build
    from medfoundry.models.features import embed as embed_images

    splits = load_splits(data, options)
    if split not in splits:
        raise MedfoundryError(f"no split '{split}' (found {sorted(splits)})", data)
    images = splits[split]
    encoder = load_encoder_or_build(model, images.num_channels, img_size)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        # One process: on the GPU when there is one. Under torchrun each rank moves it to its own device.
        encoder = encoder.to(embed_device(device))
    result = embed_images(encoder, images, out, batch_size, num_workers)
    if os.environ.get("RANK", "0") != "0":
        return  # under torchrun, rank 0 reports for all
    verb = "reused" if result.reused else f"wrote in {result.seconds:.1f} s"
    console.print(f"{out}: {result.features.shape[0]} x {result.features.shape[1]} features ({verb})")


def embed_device(device: str | None) -> torch.device:
    """``device``, or CUDA when present and the CPU otherwise; an unusable choice is one clear line."""
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError:
        raise MedfoundryError(f"--device {device!r}: use cpu, cuda or cuda:N") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise MedfoundryError(f"--device {device}: no CUDA device on this machine (use --device cpu)")
    return chosen


def register(root: typer.Typer) -> None:
    root.command("embed")(embed)
