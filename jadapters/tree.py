"""The adapter subtree of a variables pytree: find it, split it off, join it back.

Adapter variables live under a reserved child of the module they are attached
to: ``params/encoder/layers_0/__adapters__/<adapter name>/...``. Splitting and
joining never copy an array: leaves are shared between input and output.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import jax
import numpy as np
from flax import traverse_util

from jadapters.errors import AdapterError

#: The reserved child name under which a module's adapters keep their variables.
ADAPTERS_KEY = "__adapters__"

#: Under an adapter's variables at the model's root: what every placement of the adapter shares.
SHARED_KEY = "__shared__"

#: Under an adapter's params: data it reads but training never updates (an adapter bank's per-slot gains).
DATA_KEY = "__data__"

Tree = Mapping[str, Any]


def _flat(tree: Tree) -> dict[tuple[str, ...], Any]:
    return traverse_util.flatten_dict(tree, keep_empty_nodes=False) if tree else {}


def _unflat(flat: Mapping[tuple[str, ...], Any]) -> dict:
    return traverse_util.unflatten_dict(dict(flat)) if flat else {}


def adapter_name_at(path: tuple[str, ...]) -> str | None:
    """The adapter that owns a variable path, or None for a base variable.

    Example:
        >>> adapter_name_at(("params", "enc", "__adapters__", "a1", "up", "kernel"))
        'a1'
        >>> adapter_name_at(("params", "enc", "kernel")) is None
        True
    """
    for i, key in enumerate(path[:-1]):
        if key == ADAPTERS_KEY:
            return path[i + 1]
    return None


def split_adapters(variables: Tree, names: Iterable[str] | None = None) -> tuple[dict, dict]:
    """Splits variables into ``(adapters, rest)``; ``names`` None selects all adapters.

    Unselected adapters stay in ``rest``. :func:`merge_trees` joins them back.

    Example:
        >>> v = {"params": {"enc": {"kernel": 1, "__adapters__": {"a": {"w": 2}, "b": {"w": 3}}}}}
        >>> split_adapters(v, ["a"])
        ({'params': {'enc': {'__adapters__': {'a': {'w': 2}}}}}, {'params': {'enc': {'kernel': 1, '__adapters__': {'b': {'w': 3}}}}})
    """
    wanted = None if names is None else set(names)
    selected, rest = {}, {}
    for path, leaf in _flat(variables).items():
        owner = adapter_name_at(path)
        chosen = owner is not None and (wanted is None or owner in wanted)
        (selected if chosen else rest)[path] = leaf
    return _unflat(selected), _unflat(rest)


def split_data(params: Tree) -> tuple[dict, dict]:
    """Splits an adapter params tree into ``(trainable, data)``: leaves under a ``__data__`` key are data.

    Example:
        >>> split_data({"p": {"__adapters__": {"b": {"w": 1, "__data__": {"gain": 2}}}}})
        ({'p': {'__adapters__': {'b': {'w': 1}}}}, {'p': {'__adapters__': {'b': {'__data__': {'gain': 2}}}}})
    """
    trainable, data = {}, {}
    for path, leaf in _flat(params).items():
        (data if DATA_KEY in path else trainable)[path] = leaf
    return _unflat(trainable), _unflat(data)


def merge_trees(*trees: Tree) -> dict:
    """Joins nested dicts; a leaf present in two trees is an error.

    Example:
        >>> merge_trees({"a": {"x": 1}}, {"a": {"y": 2}})
        {'a': {'x': 1, 'y': 2}}
    """
    out: dict[tuple[str, ...], Any] = {}
    prefixes: set[tuple[str, ...]] = set()
    for tree in trees:
        for path, leaf in _flat(tree).items():
            if path in out:
                raise AdapterError(f"cannot merge: {'/'.join(path)} is present twice")
            clash = next((path[:i] for i in range(1, len(path)) if path[:i] in out), None)
            if clash is not None or path in prefixes:
                raise AdapterError(f"cannot merge: {'/'.join(clash or path)} is both a leaf and a subtree")
            out[path] = leaf
            prefixes.update(path[:i] for i in range(1, len(path)))
    return _unflat(out)


def replace_leaves(tree: Tree, new: Tree) -> dict:
    """``tree`` with the leaves that ``new`` holds replaced (every path of ``new`` must be in ``tree``).

    Example:
        >>> replace_leaves({"a": {"x": 1, "y": 2}}, {"a": {"y": 5}})
        {'a': {'x': 1, 'y': 5}}
    """
    if not _flat(new):
        return tree  # nothing to replace: the same tree, its subtrees shared
    flat = _flat(tree)
    for path, leaf in _flat(new).items():
        if path not in flat:
            raise AdapterError(f"cannot replace {'/'.join(path)}: the tree has no such leaf")
        flat[path] = leaf
    return _unflat(flat)


def restrict(tree: Tree, like: Tree) -> dict:
    """The leaves of ``tree`` whose paths are leaves of ``like`` too.

    Example:
        >>> restrict({"a": {"x": 1, "y": 2}}, {"a": {"y": 0}, "b": 3})
        {'a': {'y': 2}}
    """
    keep = set(_flat(like))
    return _unflat({p: leaf for p, leaf in _flat(tree).items() if p in keep})


def adapter_locations(variables: Tree) -> dict[str, list[str]]:
    """Adapter name -> module paths holding its variables, in tree order.

    Variables an adapter shares between its placements (under ``__shared__``
    at the root) are not a location.

    Example:
        >>> adapter_locations({"params": {"enc": {"__adapters__": {"a": {"w": 1}}}}})
        {'a': ['enc']}
        >>> adapter_locations({"params": {"__adapters__": {"a": {"__shared__": {"r": 1}}}}})
        {}
    """
    found: dict[str, list[str]] = {}
    for path in _flat(variables):
        owner = adapter_name_at(path)
        if owner is not None:
            at = path.index(ADAPTERS_KEY)
            if path[at + 2 : at + 3] == (SHARED_KEY,):  # shared between placements, not a placement
                continue
            where = "/".join(path[1:at])
            if where not in found.setdefault(owner, []):
                found[owner].append(where)
    return found


def count_parameters(tree: Any) -> int:
    """Number of scalars in a pytree of arrays.

    Example:
        >>> import numpy as np
        >>> count_parameters({"a": np.zeros((2, 3)), "b": np.zeros(4)})
        10
    """
    return int(sum(np.prod(np.shape(leaf), dtype=np.int64) for leaf in jax.tree_util.tree_leaves(tree)))
