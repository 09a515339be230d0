"""Importing this module registers every SSL method in ``medfoundry.ssl.base.SSL_METHODS``."""

from __future__ import annotations

from medfoundry.ssl import byol, dino, ibot, mae, mocov3, simclr

__all__ = ["byol", "dino", "ibot", "mae", "mocov3", "simclr"]
