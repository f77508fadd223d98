"""The adapter registry: by name, class path and class; no double registration."""

import flax.linen as nn
import pytest

from jadapters import LinearAdapter, MultiHeadAttentionAdapter, register_adapter
from jadapters.registry import get_registered_adapter
from jadapters.errors import AdapterError, UnknownAdapterError
from jadapters.registry import registered_name, resolve_class


def test_builtin_adapters_resolve_by_name_class_path_and_class():
    for cls in (LinearAdapter, MultiHeadAttentionAdapter):
        entry = get_registered_adapter(cls)
        assert entry.adapter_class is cls
        assert get_registered_adapter(entry.name) == entry
        assert get_registered_adapter(entry.class_path) == entry
        assert resolve_class(entry.class_path) is cls


def test_subclasses_are_not_their_parents_entry():
    class Sub(LinearAdapter):
        pass

    assert get_registered_adapter(Sub) is None
    assert registered_name(Sub).endswith("Sub")


def test_registering_twice_is_an_error():
    class Once(nn.Module):
        def __call__(self, x):
            return x

    register_adapter(Once, name="test_once")
    with pytest.raises(AdapterError, match="adapter type 'test_once' is already registered"):
        register_adapter(Once, name="test_once")
    with pytest.raises(AdapterError, match="is already registered as 'test_once'"):
        register_adapter(Once, name="test_once_again")
    assert resolve_class("test_once") is Once


def test_unknown_types_are_a_clear_error():
    assert get_registered_adapter("nope") is None
    with pytest.raises(UnknownAdapterError, match="no adapter type 'nope.Missing'"):
        resolve_class("nope.Missing")
    with pytest.raises(AdapterError, match="is not a class"):
        resolve_class("jadapters.registry.resolve_class")
