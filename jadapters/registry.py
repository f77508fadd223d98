"""The registry of adapter types, by class and by class path.

Checkpoints record each adapter's type by its registry name, so that they can
rebuild the adapter from metadata alone. jadapters' own adapters are
registered on import; register your own with :func:`register_adapter`.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Callable, TypeVar

from jadapters.errors import AdapterError, UnknownAdapterError

T = TypeVar("T", bound=type)


def class_path(cls: type) -> str:
    """``'module.QualName'`` of a class.

    Example:
        >>> class_path(dict)
        'builtins.dict'
    """
    return f"{cls.__module__}.{cls.__qualname__}"


def import_by_path(path: str) -> object:
    """The object that a dotted path ``'module.QualName'`` names; ImportError if there is none.

    Example:
        >>> import_by_path("jadapters.registry.class_path") is class_path
        True
    """
    module_name, _, qualname = path.rpartition(".")
    try:
        obj = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError, ValueError) as error:
        raise ImportError(f"cannot import {path!r}") from error
    return obj


@dataclasses.dataclass(frozen=True)
class RegisteredAdapter:
    """One registry entry: a name and the adapter class it stands for."""

    name: str
    adapter_class: type

    @property
    def class_path(self) -> str:
        return class_path(self.adapter_class)


_REGISTRY: dict[str, RegisteredAdapter] = {}


def register_adapter(adapter_class: T | None = None, *, name: str | None = None) -> T | Callable[[T], T]:
    """Registers an adapter class under ``name`` (default: the class name).

    Usable as a decorator. Registering a name or a class twice is an error.

    Example:
        >>> import flax.linen as nn
        >>> @register_adapter(name="doc_scale")
        ... class Scale(nn.Module):
        ...     def __call__(self, x):
        ...         return x
        >>> get_registered_adapter("doc_scale").adapter_class is Scale
        True
    """

    def register(cls: T) -> T:
        if not isinstance(cls, type):
            raise AdapterError(f"register_adapter expects a class, got {cls!r}")
        key = name or cls.__name__
        if key in _REGISTRY:
            raise AdapterError(
                f"adapter type {key!r} is already registered "
                f"(as {_REGISTRY[key].class_path}); choose another name"
            )
        for entry in _REGISTRY.values():
            if entry.adapter_class is cls:
                raise AdapterError(f"adapter class {class_path(cls)} is already registered as {entry.name!r}")
        _REGISTRY[key] = RegisteredAdapter(key, cls)
        return cls

    return register if adapter_class is None else register(adapter_class)


def get_registered_adapter(key: str | type) -> RegisteredAdapter | None:
    """Finds an entry by registry name, class path or class; ``None`` if absent.

    Example:
        >>> from jadapters.adapters import LinearAdapter
        >>> get_registered_adapter(LinearAdapter).name
        'LinearAdapter'
        >>> get_registered_adapter("jadapters.adapters.linear.LinearAdapter").name
        'LinearAdapter'
    """
    if isinstance(key, type):
        return next((e for e in _REGISTRY.values() if e.adapter_class is key), None)
    if key in _REGISTRY:
        return _REGISTRY[key]
    return next((e for e in _REGISTRY.values() if e.class_path == key), None)


_STRATEGIES: dict[str, type] = {}


def register_strategy(strategy_class: T | None = None, *, name: str | None = None) -> T | Callable[[T], T]:
    """Registers a :class:`jadapters.Strategy` subclass under ``name`` (default: the class name).

    Checkpoints rebuild only registered classes (or those the caller allows),
    so a strategy of your own must be registered to be loaded back.

    Example:
        >>> import dataclasses, jadapters
        >>> @register_strategy(name="doc_double")
        ... @dataclasses.dataclass(frozen=True)
        ... class Double(jadapters.Strategy):
        ...     def __call__(self, adapter, value, ctx):
        ...         return 2 * value
        >>> get_registered_class("doc_double") is Double
        True
    """

    def register(cls: T) -> T:
        key = name or cls.__name__
        if key in _STRATEGIES and _STRATEGIES[key] is not cls:
            raise AdapterError(f"strategy {key!r} is already registered (as {class_path(_STRATEGIES[key])})")
        _STRATEGIES[key] = cls
        return cls

    return register if strategy_class is None else register(strategy_class)


def get_registered_class(key: str) -> type | None:
    """A registered adapter or strategy class, by registry name or class path; None if absent.

    Example:
        >>> get_registered_class("ResidualAdd").__name__, get_registered_class("no.such.Class")
        ('ResidualAdd', None)
    """
    entry = get_registered_adapter(key)
    if entry is not None:
        return entry.adapter_class
    if key in _STRATEGIES:
        return _STRATEGIES[key]
    return next((c for c in _STRATEGIES.values() if class_path(c) == key), None)


def registered_name(cls: type) -> str:
    """The registry name of a class, or its class path when it is not registered.

    Example:
        >>> registered_name(dict)
        'builtins.dict'
    """
    entry = get_registered_adapter(cls)
    if entry is not None:
        return entry.name
    return next((n for n, c in _STRATEGIES.items() if c is cls), class_path(cls))


def resolve_class(key: str) -> type:
    """The class behind a registry name or an importable class path.

    Example:
        >>> resolve_class("LinearAdapter").__name__
        'LinearAdapter'
    """
    entry = get_registered_adapter(key)
    if entry is not None:
        return entry.adapter_class
    try:
        obj = import_by_path(key)
    except ImportError:
        raise UnknownAdapterError(
            f"no adapter type {key!r}: it is neither registered ({sorted(_REGISTRY)}) "
            f"nor an importable class path"
        ) from None
    if not isinstance(obj, type):
        raise AdapterError(f"{key!r} names {obj!r}, which is not a class")
    return obj
