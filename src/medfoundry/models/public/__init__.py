"""Public foundation models: the registry, their key layouts, and the CT-FM 3D encoder.

Importing this package registers CT-FM's encoder as a non-timm architecture, so an Encoder built from it can
be saved and reloaded like medfoundry's own 3D ViT.
"""

from __future__ import annotations

from medfoundry.models.backbones import NON_TIMM_ARCHITECTURES
from medfoundry.models.public.ctfm import CTFM_ARCHITECTURE, CTFMEncoder
from medfoundry.models.public.keymaps import KEY_MAPPERS
from medfoundry.models.public.registry import PUBLIC_MODELS, PublicModel, get_public_model, list_public_models

NON_TIMM_ARCHITECTURES.setdefault(CTFM_ARCHITECTURE, CTFMEncoder)

__all__ = [
    "CTFM_ARCHITECTURE",
    "KEY_MAPPERS",
    "PUBLIC_MODELS",
    "CTFMEncoder",
    "PublicModel",
    "get_public_model",
    "list_public_models",
]
