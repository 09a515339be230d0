"""The one grammar of model names, wherever a model is named (recipes, suites, ``-m`` on the command line)::

    vit_tiny_28 / resnet50          a preset or any timm model name (random weights)
    public:NAME:PATH                a public foundation model from local weights (docs/models.md)
    public:NAME@test:PATH           the same with the registry's small test variant (tests and smoke runs)
    2.5d:INNER / 2.5d-attention:INNER
                                    a 2D model (any of the above but 2.5D, or a checkpoint folder) applied to a
                                    volume's slices, features averaged or attention-pooled (docs/volumes.md)
    FOLDER                          a medfoundry checkpoint folder

Parsing only reads the string (and whether a folder exists); building is for ``models.checkpoint`` and
``models.backbones``, so this module imports nothing of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from medfoundry.errors import ModelError

PUBLIC_PREFIX = "public:"
# "2.5d:NAME" averages the slice features, "2.5d-attention:NAME" pools them with gated attention.
SLICES_PREFIXES = {"2.5d": "mean", "2.5d-attention": "attention"}

NameKind = Literal["backbone", "public", "slices", "folder"]


@dataclass(frozen=True)
class ModelName:
    """A parsed model name: its kind and the parts that kind needs.

    ``name`` is the preset / timm name (backbone) or the registry name (public); ``path`` the weights (public) or
    the checkpoint folder (folder); ``inner`` the wrapped 2D model and ``aggregate`` the pooling (slices).
    """

    spec: str
    kind: NameKind
    name: str = ""
    path: Path | None = None
    variant: str = "full"
    aggregate: str = "mean"
    inner: ModelName | None = None

    @property
    def loads_weights(self) -> bool:
        """Whether the model comes with trained weights (a folder or public model, possibly over slices)."""
        if self.kind == "slices":
            return self.inner is not None and self.inner.loads_weights
        return self.kind in ("public", "folder")


def parse_public_spec(spec: str) -> tuple[str, str, Path] | None:
    """``public:NAME[@variant]:PATH`` -> (name, variant, path); None when ``spec`` is not a public-model name."""
    if not spec.startswith(PUBLIC_PREFIX):
        return None
    name, sep, path = spec[len(PUBLIC_PREFIX) :].partition(":")
    if not sep or not path or not name:
        raise ModelError(f"public model spec '{spec}' needs a local weights path: public:NAME:PATH")
    name, _, variant = name.partition("@")
    return name, variant or "full", Path(path).expanduser()


def parse_model_name(spec: str) -> ModelName:
    """Parse ``spec`` (see the module docstring); ModelError for a malformed public or 2.5D name."""
    spec = str(spec)
    public = parse_public_spec(spec)
    if public is not None:
        name, variant, path = public
        return ModelName(spec, "public", name=name, path=path, variant=variant)
    prefix, sep, rest = spec.partition(":")
    if sep and prefix in SLICES_PREFIXES:
        if not rest:
            raise ModelError(f"'{spec}' names no 2D model to apply to the slices: {prefix}:NAME")
        inner = parse_model_name(rest)
        if inner.kind == "slices":
            raise ModelError(f"'{spec}': a 2.5D encoder wraps a 2D model, not another 2.5D one")
        return ModelName(spec, "slices", name=inner.name, aggregate=SLICES_PREFIXES[prefix], inner=inner)
    path = Path(spec).expanduser()
    if path.is_dir():
        return ModelName(spec, "folder", name=path.name, path=path)
    return ModelName(spec, "backbone", name=spec)
