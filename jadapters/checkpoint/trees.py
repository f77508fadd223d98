"""Variables as nested dicts and as flat ``(key path, leaf)`` lists, and which adapter owns a key path."""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from jadapters.tree import ADAPTERS_KEY

Variables = Mapping[str, Any]


def flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    """``[(key path, leaf), ...]`` in tree order; every mapping is a subtree."""
    out = []
    for key, sub in tree.items():
        if type(sub) is dict or isinstance(sub, Mapping):
            out.extend(flatten(sub, prefix + (str(key),)))
        else:
            out.append((prefix + (str(key),), sub))
    return out


def unflatten(paths: Iterable[tuple[str, ...]], leaves: Iterable[Any]) -> dict:
    """The nested dicts holding each leaf at its key path."""
    out: dict = {}
    for path, leaf in zip(paths, leaves):
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = leaf
    return out


def _owner_and_location(key_path: tuple[str, ...]) -> tuple[str | None, str]:
    """The adapter owning a variable path and the module path it sits on (collection excluded)."""
    for i, key in enumerate(key_path[:-1]):
        if key == ADAPTERS_KEY:
            return key_path[i + 1], "/".join(key_path[1:i])
    return None, ""


def variables_by_adapter(
    flat: list[tuple[tuple[str, ...], Any]], names: Iterable[str]
) -> dict[str, tuple[list[int], list[str]]]:
    """For each adapter of ``names``: the indices in ``flat`` of its variables, and the module paths they sit on.

    Both are in tree order; the module paths are without repeats.
    """
    groups: dict[str, tuple[list[int], list[str]]] = {n: ([], []) for n in names}
    for i, (key_path, _) in enumerate(flat):
        owner, location = _owner_and_location(key_path)
        if owner in groups:
            indices, locations = groups[owner]
            indices.append(i)
            if location not in locations:
                locations.append(location)
    return groups
