"""How checkpoint metadata describes an array: its path, shape and dtype name; and dtype names back to dtypes."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jadapters.checkpoint.errors import CheckpointError


def array_entry(path: tuple[str, ...], leaf: Any) -> dict:
    """The metadata entry of one array: ``{"path": [...], "shape": [...], "dtype": name}``."""
    return {"path": list(path), "shape": list(np.shape(leaf)), "dtype": dtype_name(leaf)}


def leaf_dtype(leaf: Any) -> Any:
    return leaf.dtype if hasattr(leaf, "dtype") else np.asarray(leaf).dtype


_DTYPE_NAMES: dict = {}


def dtype_name(leaf: Any) -> str:
    """The name a checkpoint records for the dtype of ``leaf`` (e.g. ``'bfloat16'``)."""
    dtype = leaf_dtype(leaf)
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = _DTYPE_NAMES[dtype] = np.dtype(dtype).name
    return name


def dtype_from_name(name: str, path: Path | None = None) -> np.dtype:
    """The dtype a checkpoint names; a :class:`CheckpointError` naming ``path`` for an unknown one."""
    try:
        return _dtype_named(name)
    except TypeError:
        raise CheckpointError(f"checkpoint {path}: unknown dtype {name!r}") from None


@functools.lru_cache(maxsize=None)
def _dtype_named(name: str) -> np.dtype:
    return np.dtype(jax.numpy.dtype(name))
