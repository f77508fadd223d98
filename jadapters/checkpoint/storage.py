"""Checkpoint directories on disk: the path a user gives, the orbax checkpointers, writing one atomically.

A checkpoint directory is an ordinary orbax checkpoint: orbax's
``Checkpointer`` writes it into a temporary directory and commits it by
renaming; the jadapters metadata travels as its ``custom_metadata``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import orbax.checkpoint as ocp

from jadapters.checkpoint.atomic import replace_directory
from jadapters.checkpoint.errors import CheckpointError
from jadapters.checkpoint.metadata import read_metadata
from jadapters.checkpoint.packing import PackedArraysHandler

PathLike = Union[str, "os.PathLike[str]"]

_CHECKPOINTERS: dict = {}


def absolute_path(path: PathLike) -> Path:
    """``path`` with ``~`` expanded, made absolute (links are not resolved)."""
    return Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


def checkpointer(kind: str) -> "ocp.Checkpointer":
    """A cached synchronous orbax checkpointer: ``'packed'`` (or ``'packed-durable'``) buffers, or a ``'pytree'``."""
    if kind not in _CHECKPOINTERS:
        if kind.startswith("packed"):
            handler = PackedArraysHandler(durable=kind == "packed-durable")
        else:
            handler = ocp.PyTreeCheckpointHandler()
        _CHECKPOINTERS[kind] = ocp.Checkpointer(handler)
    return _CHECKPOINTERS[kind]


def write_checkpoint(path: PathLike, args: "ocp.args.CheckpointArgs", metadata: dict, *, overwrite: bool, kind: str) -> Path:
    """Saves ``args`` with the :func:`checkpointer` of ``kind`` at ``path``, replacing a checkpoint there atomically.

    Anything at ``path`` that is not a jadapters checkpoint (or an empty
    directory) is never touched. Returns the absolute path.
    """
    path = absolute_path(path)
    if os.path.lexists(path):
        if not overwrite:
            raise CheckpointError(f"{path} already exists (pass overwrite=True to replace it)")
        _require_replaceable(path)

    def write(staging: Path) -> None:
        checkpointer(kind).save(staging, args=args, custom_metadata=metadata)

    # Durable saves make the rename itself durable too.
    replace_directory(path, write, sync=kind != "packed")
    return path


def _require_replaceable(path: Path) -> None:
    if path.is_dir() and not any(path.iterdir()):
        return
    try:
        read_metadata(path, None)
    except CheckpointError:
        raise CheckpointError(
            f"{path} exists and is not a jadapters checkpoint; refusing to replace it"
        ) from None
