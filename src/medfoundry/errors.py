"""User-facing errors: one clear line naming the file and the problem.

Two rules keep every bad input to one line:

* a :class:`MedfoundryError` message is one line by construction (line breaks from an interpolated library
  message are folded into spaces), so the CLI's ``error: ...`` never spills a parser dump;
* :func:`one_line` is the one place where any other exception from a reader or loader becomes such an error
  naming the file. ``load_dataset`` wraps every reader in it; checkpoint loading wraps its own call in it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# A library message can be a whole dump (YAML parser context, NumPy shapes); the first line says what went wrong.
_MAX_DETAIL = 200
_LINE_BREAKS = re.compile(r"\s*[\r\n]+\s*")


class MedfoundryError(Exception):
    """An error caused by the user's input or environment, shown as one line without a traceback.

    The CLI prints ``str(error)`` and exits non-zero; ``--debug`` shows the traceback.
    """

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        message = _LINE_BREAKS.sub(" ", str(message)).strip()
        super().__init__(f"{self.path}: {message}" if self.path is not None else message)


class DataError(MedfoundryError):
    """Input data is missing, malformed or inconsistent."""


class ModelError(MedfoundryError):
    """Unknown model name, bad checkpoint, or incompatible weights."""


class OutputError(MedfoundryError):
    """An output location cannot be written."""


def first_line(error: BaseException) -> str:
    """The first non-empty line of ``error``'s message, shortened; the class name when the message is empty."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= _MAX_DETAIL else text[: _MAX_DETAIL - 3] + "..."


@contextmanager
def one_line(path: str | Path, kind: str, error: type[MedfoundryError] = DataError) -> Iterator[None]:
    """Turn any exception raised inside into ``error("cannot read {kind}: Type: first line", path)``.

    A :class:`MedfoundryError` passes through unchanged (it already names its file), as do ``MemoryError``,
    ``KeyboardInterrupt`` and ``SystemExit`` (not a property of the input, and not to be swallowed). The original
    exception stays the ``__cause__``, so ``--debug`` still shows where a library failed. ``kind`` says what
    was being read, e.g. ``"csv dataset"`` or ``"checkpoint"``.
    """
    try:
        yield
    except (MedfoundryError, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - the point: readers and libraries raise anything on malformed input
        raise error(f"cannot read {kind}: {type(exc).__name__}: {first_line(exc)}", path) from exc
