"""Splitting the adapter subtree off a variables tree and joining it back, without copies."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from jadapters import AdapterError, merge_trees, split_adapters
from jadapters.tree import adapter_locations, adapter_name_at

names = st.sampled_from(["a", "a_v2", "b"])


@st.composite
def variable_trees(draw):
    tree = {"params": {}, "batch_stats": {}}
    for module in draw(st.lists(st.sampled_from(["enc", "dec", "proj"]), unique=True, max_size=3)):
        node = tree["params"].setdefault(module, {"kernel": np.zeros(2)})
        for name in draw(st.lists(names, unique=True, max_size=3)):
            node.setdefault("__adapters__", {})[name] = {"w": np.ones(1)}
        if draw(st.booleans()):
            tree["batch_stats"][module] = {"__adapters__": {"a": {"mean": np.zeros(1)}}, "mean": np.zeros(1)}
    return tree


@given(variable_trees(), st.one_of(st.none(), st.lists(names, unique=True)))
def test_split_then_merge_is_identity_and_shares_leaves(tree, selected):
    adapters, rest = split_adapters(tree, selected)
    merged = merge_trees(rest, adapters)
    prune = lambda t: {k: prune(v) for k, v in t.items() if not isinstance(v, dict) or prune(v)} if isinstance(t, dict) else t
    assert _ids(merged) == _ids(prune(tree))
    for path, leaf in _leaves(adapters):
        owner = adapter_name_at(path)
        assert owner is not None and (selected is None or owner in selected)
    for path, _ in _leaves(rest):
        owner = adapter_name_at(path)
        assert owner is None or (selected is not None and owner not in selected)


def test_prefix_names_never_mix():
    tree = {"params": {"enc": {"__adapters__": {"a": {"w": 1}, "a_v2": {"w": 2}}}}}
    assert split_adapters(tree, ["a"])[0] == {"params": {"enc": {"__adapters__": {"a": {"w": 1}}}}}
    assert adapter_locations(tree) == {"a": ["enc"], "a_v2": ["enc"]}


def test_merge_rejects_conflicts():
    with pytest.raises(AdapterError, match="p/x is present twice"):
        merge_trees({"p": {"x": 1}}, {"p": {"x": 2}})
    with pytest.raises(AdapterError, match="p is both a leaf and a subtree"):
        merge_trees({"p": 1}, {"p": {"x": 2}})


def _leaves(tree, path=()):
    for key, sub in tree.items():
        if isinstance(sub, dict):
            yield from _leaves(sub, path + (key,))
        else:
            yield path + (key,), sub


def _ids(tree):
    return sorted((p, id(v)) for p, v in _leaves(tree))
