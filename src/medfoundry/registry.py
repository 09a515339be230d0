"""One registry style for every kind of component: a name -> member table filled by a decorator.

Like timm's ``register_model``: a component registers itself in its own file, and the registry knows which files
hold its members (``modules``) and imports them on the first lookup. So ``SSL_METHODS.get("dino")`` works after
importing only the trainer, nobody has to import a module for its side effects, and the file that defines the
registry never imports its members at module level (no import circles)::

    SSL_METHODS: Registry[type[SSLMethod]] = Registry("SSL method", modules=("medfoundry.ssl.dino", ...))

    @SSL_METHODS.register("dino")
    class DINO(SSLMethod): ...

An unknown name is a :class:`UnknownNameError` (a ``MedfoundryError`` and a ``ValueError``, so pydantic validators
report it as a field error) that suggests the closest registered names.
"""

from __future__ import annotations

import difflib
import importlib
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from types import MappingProxyType
from typing import Any, Generic, TypeVar

from medfoundry.errors import MedfoundryError, ModelError

T = TypeVar("T")
M = TypeVar("M")

# difflib's similarity ratio; 0.6 keeps "vit_tiny_46" -> "vit_tiny_64" (0.91) and "vit_tiny_28" (0.82) but drops
# "resnet18" (0.11), and for short names asks for most letters in common ("dion" -> "dino" is 0.75).
_CUTOFF = 0.6
_MAX_SUGGESTIONS = 4
# Above this many names the message gives only the suggestions and a count (timm has over a thousand models).
_MAX_LISTED = 30


class UnknownNameError(MedfoundryError, ValueError):
    """A name that no registered component has."""


class UnknownModelError(UnknownNameError, ModelError):
    """An unknown name of a model part (architecture, preset, public model, MIL model, decoder)."""


def suggest(name: str, choices: Iterable[str]) -> list[str]:
    """The choices closest to ``name``: a shared prefix first (``vit_tiny`` -> ``vit_tiny_28``), then by similarity."""
    choices = sorted(set(choices))
    key = name.strip().lower()
    by_prefix = [c for c in choices if len(key) >= 2 and (c.lower().startswith(key) or key.startswith(c.lower()))]
    lowered = {c.lower(): c for c in choices}
    close = [lowered[c] for c in difflib.get_close_matches(key, list(lowered), n=_MAX_SUGGESTIONS, cutoff=_CUTOFF)]
    return list(dict.fromkeys(by_prefix + close))[:_MAX_SUGGESTIONS]


def did_you_mean(name: str, choices: Iterable[str], prefix: str = "") -> str:
    """`` did you mean 'a' or 'b'?`` (with a leading space; each prefixed with ``prefix``), or ``""`` when nothing
    is close."""
    quoted = [f"'{prefix}{c}'" for c in suggest(name, choices)]
    if not quoted:
        return ""
    listed = f"{', '.join(quoted[:-1])} or {quoted[-1]}" if len(quoted) > 1 else quoted[0]
    return f" did you mean {listed}?"


def unknown_name_error(
    kind: str, name: str, choices: Iterable[str], error: type[UnknownNameError] = UnknownNameError
) -> UnknownNameError:
    """The error for ``name`` not among ``choices``, with suggestions and, when short, the list of choices."""
    choices = sorted(set(choices))
    known = ", ".join(choices) if len(choices) <= _MAX_LISTED else f"{len(choices)} names"
    return error(f"unknown {kind} '{name}';{did_you_mean(name, choices)} known: {known}")


class Registry(Generic[T]):
    """Named members of one kind, each with optional metadata, filled by :meth:`register`.

    ``modules`` are the modules whose import registers the members; they are imported on the first lookup, so a
    registry is complete however it was reached. Iterating, ``in`` and ``len`` see every member, like a mapping.
    ``error`` is the class of the unknown-name error (``UnknownModelError`` for model parts).
    """

    def __init__(
        self, kind: str, modules: tuple[str, ...] = (), error: type[UnknownNameError] = UnknownNameError
    ) -> None:
        self.kind = kind
        self.modules = modules
        self.error = error
        self._members: dict[str, T] = {}
        self._metadata: dict[str, Mapping[str, Any]] = {}
        self._loaded = not modules
        self._lock = threading.RLock()

    def register(self, name: str, **metadata: Any) -> Callable[[M], M]:
        """Decorator registering the decorated class or function under ``name``; a name is registered once."""

        def decorate(member: M) -> M:
            self.add(name, member, **metadata)  # type: ignore[arg-type]
            return member

        return decorate

    def add(self, name: str, member: T, **metadata: Any) -> T:
        """Register ``member`` (a value rather than a decorated definition, e.g. a preset) under ``name``."""
        with self._lock:
            if name in self._members:
                raise ValueError(f"{self.kind} '{name}' is already registered (by {self._members[name]!r})")
            self._members[name] = member
            self._metadata[name] = MappingProxyType(dict(metadata))
        return member

    def _load(self) -> None:
        if self._loaded:
            return
        with self._lock:
            if self._loaded:
                return
            # Marked first: a member module that looks a name up while it is being imported must not recurse.
            self._loaded = True
            try:
                for module in self.modules:
                    importlib.import_module(module)
            except BaseException:
                self._loaded = False
                raise

    def get(self, name: str) -> T:
        """The member registered as ``name``; :class:`UnknownNameError` suggesting close names otherwise."""
        self._load()
        if name not in self._members:
            raise unknown_name_error(self.kind, name, self._members, self.error)
        return self._members[name]

    __getitem__ = get

    def metadata(self, name: str) -> Mapping[str, Any]:
        """The keyword arguments ``name`` was registered with (read-only)."""
        self.get(name)
        return self._metadata[name]

    def names(self) -> list[str]:
        self._load()
        return sorted(self._members)

    def items(self) -> list[tuple[str, T]]:
        return [(name, self._members[name]) for name in self.names()]

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._members

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        self._load()
        return len(self._members)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {len(self._members)} registered{'' if self._loaded else ', not loaded'})"
