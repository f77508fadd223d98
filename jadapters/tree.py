"""The adapter subtree of a variables pytree: find it, split it off, join it back.

Adapter variables live under a reserved child of the module they are attached
to: ``params/encoder/layers_0/__adapters__/<adapter name>/...``. Splitting and
joining never copy an array: leaves are shared between input and output.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import jax
import numpy as np

from jadapters.errors import AdapterError

#: The reserved child name under which a module's adapters keep their variables.
ADAPTERS_KEY = "__adapters__"

#: Under an adapter's variables at the model's root: what every placement of the adapter shares.
SHARED_KEY = "__shared__"

Tree = Mapping[str, Any]


def _select(tree: Tree, keep: Callable[[tuple[str, ...]], bool], path: tuple[str, ...] = ()) -> dict:
    out = {}
    for key, sub in tree.items():
        sub_path = path + (key,)
        if isinstance(sub, Mapping):
            picked = _select(sub, keep, sub_path)
            if picked:
                out[key] = picked
        elif keep(sub_path):
            out[key] = sub
    return out


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

    def is_selected(path):
        owner = adapter_name_at(path)
        return owner is not None and (wanted is None or owner in wanted)

    return _select(variables, is_selected), _select(variables, lambda p: not is_selected(p))


def merge_trees(*trees: Tree) -> dict:
    """Joins nested dicts; a leaf present in two trees is an error.

    Example:
        >>> merge_trees({"a": {"x": 1}}, {"a": {"y": 2}})
        {'a': {'x': 1, 'y': 2}}
    """
    out: dict = {}

    def put(dst: dict, src: Tree, path: tuple[str, ...]) -> None:
        for key, sub in src.items():
            if isinstance(sub, Mapping):
                node = dst.setdefault(key, {})
                if not isinstance(node, dict):
                    raise AdapterError(f"cannot merge: {'/'.join(path + (key,))} is both a leaf and a subtree")
                put(node, sub, path + (key,))
            elif key in dst:
                raise AdapterError(f"cannot merge: {'/'.join(path + (key,))} is present twice")
            else:
                dst[key] = sub

    for tree in trees:
        put(out, tree, ())
    return out


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

    def walk(tree: Tree, path: tuple[str, ...]) -> None:
        for key, sub in tree.items():
            if key == ADAPTERS_KEY and isinstance(sub, Mapping):
                for name, own in sub.items():
                    if isinstance(own, Mapping) and set(own) == {SHARED_KEY}:
                        continue
                    where = "/".join(path)
                    if where not in found.setdefault(name, []):
                        found[name].append(where)
            elif isinstance(sub, Mapping):
                walk(sub, path + (key,))

    for collection in variables.values():
        if isinstance(collection, Mapping):
            walk(collection, ())
    return found


def count_parameters(tree: Any) -> int:
    """Number of scalars in a pytree of arrays.

    Example:
        >>> import numpy as np
        >>> count_parameters({"a": np.zeros((2, 3)), "b": np.zeros(4)})
        10
    """
    return int(sum(np.prod(np.shape(leaf), dtype=np.int64) for leaf in jax.tree_util.tree_leaves(tree)))
