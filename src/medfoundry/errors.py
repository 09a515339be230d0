"""User-facing errors: one clear line naming the file and the problem."""

from __future__ import annotations

from pathlib import Path


class MedfoundryError(Exception):
    """An error caused by the user's input or environment, shown as one line without a traceback.

    The CLI prints ``str(error)`` and exits non-zero; ``--debug`` shows the traceback.
    """

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        super().__init__(f"{self.path}: {message}" if self.path is not None else message)


class DataError(MedfoundryError):
    """Input data is missing, malformed or inconsistent."""


class ModelError(MedfoundryError):
    """Unknown model name, bad checkpoint, or incompatible weights."""


class OutputError(MedfoundryError):
    """An output location cannot be written."""
