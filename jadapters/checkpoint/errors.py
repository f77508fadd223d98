"""The error every checkpoint problem is reported as, and the translation of orbax's and the file system's errors."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

from jadapters.errors import AdapterError


class CheckpointError(AdapterError):
    """A checkpoint is missing, incomplete, corrupted, or does not fit the model.

    Example:
        >>> isinstance(CheckpointError("x"), ValueError)
        True
    """

    __module__ = "jadapters.checkpoint"  # its public name, in tracebacks and pickles


@contextlib.contextmanager
def checkpoint_errors(path: Path) -> Iterator[None]:
    """Turns what orbax or the file system raise on a damaged checkpoint into a :class:`CheckpointError`."""
    try:
        yield
    except AdapterError:
        raise
    except Exception as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: it is incomplete or corrupted ({message[:300]})") from error
