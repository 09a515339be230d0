"""Public foundation models: the registry, their key layouts, and the CT-FM 3D encoder.

CT-FM's encoder registers itself as an architecture (``models.backbones.ARCHITECTURES``), so an Encoder built
from it saves and reloads like medfoundry's own 3D ViT.
"""

from __future__ import annotations

from medfoundry.models.public.ctfm import CTFM_ARCHITECTURE, CTFMEncoder
from medfoundry.models.public.keymaps import KEY_MAPPERS
from medfoundry.models.public.registry import PUBLIC_MODELS, PublicModel, get_public_model, list_public_models

__all__ = [
    "CTFM_ARCHITECTURE",
    "KEY_MAPPERS",
    "PUBLIC_MODELS",
    "CTFMEncoder",
    "PublicModel",
    "get_public_model",
    "list_public_models",
]
