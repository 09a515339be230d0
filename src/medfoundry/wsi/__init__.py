"""Whole-slide images: tissue tiling into coordinate files and streaming tile embedding.

``tile_slides`` writes ``patches/<stem>.h5`` (TRIDENT/CLAM-style ``coords``) and thumbnails;
``embed_slides`` streams those tiles through an encoder into per-slide feature files. See docs/wsi.md.
"""

from __future__ import annotations

from typing import Any

from medfoundry.wsi.tiling import (
    ReadPlan,
    TileResult,
    TileSummary,
    open_slide,
    read_patches,
    read_tile,
    resolve_read_level,
    tile_slide,
    tile_slides,
)

__all__ = [
    "EmbedSummary",
    "ReadPlan",
    "SlideTiles",
    "TileResult",
    "TileSummary",
    "embed_slides",
    "open_slide",
    "read_patches",
    "read_tile",
    "resolve_read_level",
    "tile_slide",
    "tile_slides",
]

_EMBEDDING_NAMES = {"EmbedSummary", "SlideTiles", "embed_slides"}


def __getattr__(name: str) -> Any:
    # The embedding half imports torch; tiling (and data/wsi.py, which uses it) should not pay for that.
    if name in _EMBEDDING_NAMES:
        from medfoundry.wsi import embedding

        return getattr(embedding, name)
    raise AttributeError(f"module 'medfoundry.wsi' has no attribute {name!r}")
