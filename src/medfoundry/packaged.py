"""The recipes shipped inside the package (``medfoundry/configs``), so suites work from an installed wheel.

The checkout's ``configs/`` is a link to this folder: one copy of every YAML. A relative path such as
``configs/pretrain/simclr.yaml`` (as suites name their recipes) is read from the working directory when it is
there, and otherwise from the package, so ``medfoundry eval configs/suites/breastmnist.yaml`` and a suite's
``recipe: configs/pretrain/simclr.yaml`` also work outside a checkout.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_CONFIGS = Path(__file__).resolve().parent / "configs"
_PREFIX = "configs"


def resolve_config_path(path: str | Path) -> Path:
    """``path`` itself when it exists or is not a relative ``configs/...`` path; else the packaged recipe."""
    path = Path(path)
    if path.exists() or path.is_absolute() or not path.parts or path.parts[0] != _PREFIX:
        return path
    packaged = PACKAGE_CONFIGS.joinpath(*path.parts[1:])
    return packaged if packaged.is_file() else path
