"""Optional dependencies: imported where they are used, with one clear line naming the extra when one is missing.

``pip install medfoundry`` gives the core (pre-training, adapters, the benchmark engine, 2D and 3D readers);
the extras below add whole-slide images, vision-language models, survival tasks, stain normalisation and LoRA.
``make setup`` installs ``.[all,dev]``. ``EXTRAS`` must name the same extras as ``pyproject.toml``
(``tests/test_extras.py`` checks it).
"""

from __future__ import annotations

import importlib
import types
from typing import Any

from medfoundry.errors import MedfoundryError

#: extra -> the distributions it installs (as in pyproject.toml's optional-dependencies).
EXTRAS: dict[str, tuple[str, ...]] = {
    "wsi": ("openslide-python", "openslide-bin", "wsidicom"),
    "vlm": ("transformers", "tokenizers"),
    "survival": ("scikit-survival",),
    "stain": ("torchstain",),
    "lora": ("peft",),
}


class MissingExtraError(MedfoundryError):
    """An optional dependency is not installed; the message names the extra that installs it."""


def require(module: str, extra: str, feature: str | None = None) -> types.ModuleType:
    """Import ``module``, or raise :class:`MissingExtraError` naming ``pip install 'medfoundry[EXTRA]'``."""
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}")  # a programming error, not the user's
    try:
        return importlib.import_module(module)
    except ImportError as error:
        top = module.split(".")[0]
        # Only the package itself being absent is this error; a broken install inside it keeps its own message.
        name = getattr(error, "name", None) or ""
        if name != top and not name.startswith(f"{top}."):
            raise
        what = feature or module.split(".")[0]
        raise MissingExtraError(
            f"{what} needs the optional dependency {top}: pip install 'medfoundry[{extra}]'"
        ) from None


class _Lazy:
    """A stand-in for a module or a module's attribute, imported through :func:`require` on first use."""

    def __init__(self, module: str, extra: str, attr: str | None = None) -> None:
        self._module, self._extra, self._attr = module, extra, attr

    def _target(self) -> Any:
        module = require(self._module, self._extra)
        return getattr(module, self._attr) if self._attr else module

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._target(), name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._target()(*args, **kwargs)


def lazy(module: str, extra: str, attr: str | None = None) -> Any:
    """``module`` (or ``module.attr``), imported on first use: ``import medfoundry`` works without the extra."""
    return _Lazy(module, extra, attr)
