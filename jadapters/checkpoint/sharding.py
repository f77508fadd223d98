"""Where restored arrays go: the ``shardings`` argument of the loaders, and placing arrays onto it."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Union

import jax
import numpy as np

from jadapters.checkpoint.trees import Variables
from jadapters.errors import AdapterError

#: Where restored arrays go: one sharding for all, a function of
#: ``(path, shape, dtype)`` (path '/'-joined, e.g. ``'params/enc/__adapters__/a/up/kernel'``),
#: or a nested mapping shaped like the variables, with a sharding at each leaf.
Shardings = Union["jax.sharding.Sharding", Callable[[str, tuple, Any], "jax.sharding.Sharding"], Mapping[str, Any], None]


def place_arrays(
    arrays: list[np.ndarray], entries: list[Mapping[str, Any]], shardings: Shardings, variables: Variables
) -> list:
    """The host ``arrays`` (described by ``entries``) on their devices, in one batched transfer where possible.

    Without ``shardings`` they are replicated over the mesh of the base params
    in ``variables`` when those are sharded over several devices, else put on
    the default device.
    """
    default = _default_adapter_sharding(variables) if shardings is None else None
    targets = []
    for array, e in zip(arrays, entries):
        sharding = sharding_for(shardings, tuple(e["path"]), array.shape, array.dtype) if shardings is not None else default
        targets.append(sharding)
    if all(s is None for s in targets):
        return jax.device_put(arrays)
    out: list = [None] * len(arrays)
    batch_idx, batch_arrays, batch_shardings = [], [], []
    for i, (array, sharding) in enumerate(zip(arrays, targets)):
        if sharding is None:
            sharding = default_device_sharding()
        if sharding.is_fully_addressable:
            batch_idx.append(i)
            batch_arrays.append(array)
            batch_shardings.append(sharding)
        else:
            out[i] = jax.make_array_from_callback(array.shape, sharding, lambda index, a=array: a[index])
    for i, placed in zip(batch_idx, jax.device_put(batch_arrays, batch_shardings)):
        out[i] = placed
    return out


def sharding_for(shardings: Shardings, path: tuple[str, ...], shape: tuple, dtype: Any):
    """The sharding that ``shardings`` gives the array at ``path`` (None when ``shardings`` is None)."""
    if shardings is None:
        return None
    if isinstance(shardings, jax.sharding.Sharding):
        return shardings
    if callable(shardings):
        return shardings("/".join(path), shape, dtype)
    node: Any = shardings
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            raise AdapterError(f"shardings has no entry for {'/'.join(path)}")
        node = node[key]
    if not isinstance(node, jax.sharding.Sharding):
        raise AdapterError(f"shardings at {'/'.join(path)} is {node!r}, not a jax.sharding.Sharding")
    return node


def default_device_sharding() -> "jax.sharding.Sharding":
    return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def _default_adapter_sharding(variables: Variables):
    """Replicated over the base params' mesh when they are sharded over several devices, else None."""
    for leaf in jax.tree_util.tree_leaves(variables.get("params", {})):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, jax.sharding.NamedSharding) and len(sharding.device_set) > 1:
            return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
        return None
    return None
