"""Adapter methods by name and as config objects: ``"seq_bn[reduction_factor=8]"``, ``LoraConfig(r=8)``.

A method config is a frozen dataclass that knows where its adapter goes (the
roles of the model's preset, e.g. ``query`` and ``value``) and what it is (an
adapter network and a strategy). ``adapted.add_adapter(name, config)`` takes a
config, a registered method name, or a name with AdapterHub's bracket
overrides; the config is kept in the adapter's spec, so checkpoints store it.

Where a config takes ``target_modules`` (PEFT's field), each entry is a role
the model declares, or else a module path or name (PEFT's suffix rule, see
:mod:`jadapters.naming`). Where a method places itself by default, a role the
model does not declare is an error naming it.
"""

from __future__ import annotations

import ast
import dataclasses
from typing import Any, Callable, ClassVar, Iterable, Sequence

import flax.linen as nn

from jadapters.errors import AdapterError, UnknownAdapterError
from jadapters.naming import normalize_targets
from jadapters.strategies import Strategy


@dataclasses.dataclass(frozen=True)
class Placed:
    """One adapter of a method, resolved against a model: where it goes and what it is.

    Attributes:
        modules: the roles (declared module names) it goes to, ``()`` for explicit paths.
        targets: the module targets.
        adapter: the adapter network.
        strategy: how it joins the model.
    """

    modules: tuple[str, ...]
    targets: tuple[str, ...]
    adapter: nn.Module
    strategy: Strategy


@dataclasses.dataclass(frozen=True)
class PlacedPart:
    """One part of a union of methods (:class:`jadapters.ConfigUnion`), resolved against a model.

    ``add_adapter(name, union)`` adds it as the adapter ``name + '.' + suffix``,
    grouped under ``name``.

    Attributes:
        suffix: the part's name within the union (e.g. ``'lora'``).
        config: the part's own method config (kept in its spec).
        placed: where it goes and what it is.
    """

    suffix: str
    config: "MethodConfig"
    placed: Placed


class MethodConfig:
    """Base of method configs: frozen dataclasses whose fields are the method's hyperparameters.

    Subclasses set :attr:`method` (their registry name) and implement
    :meth:`place`, which resolves the config against an adapted model's
    placement: where the adapter goes (its roles, unless ``where`` gives the
    targets explicitly) and what it is. A union of methods returns a tuple of
    :class:`PlacedPart` instead, one per part.
    """

    method: ClassVar[str] = ""

    def place(self, placement: Any, where: tuple[str, ...] | None = None) -> "Placed | tuple[PlacedPart, ...]":
        raise NotImplementedError

    def replace(self, **changes: Any) -> "MethodConfig":
        """A copy with ``changes``; unknown fields are an error naming the method."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise AdapterError(f"method {self.method!r} has no option(s) {unknown}; its options: {sorted(known)}")
        return dataclasses.replace(self, **changes)


def resolve_roles(
    placement: Any, entries: Iterable[str], method: str, *, roles_only: bool
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(roles, targets)`` for ``entries``: roles the placement declares, else path targets.

    With ``roles_only`` (a method's default placement) an entry that is not a
    declared role is an error naming it and the roles the model has.

    Example:
        >>> from jadapters.transform import Placement
        >>> placement = Placement(modules=(("query", ("attn/q",)), ("value", ("attn/v",))))
        >>> resolve_roles(placement, ["query", "value"], "lora", roles_only=True)
        (('query', 'value'), ('attn/q', 'attn/v'))
        >>> resolve_roles(placement, ["query", "mlp/fc"], "lora", roles_only=False)
        (('query',), ('attn/q', 'mlp/fc'))
    """
    declared = dict(placement.modules)
    roles: list[str] = []
    targets: list[str] = []
    for entry in entries:
        if entry in declared:
            roles.append(entry)
            targets.extend(declared[entry])
        elif roles_only:
            raise AdapterError(
                f"method {method!r} goes to the role {entry!r}, which this model does not declare "
                f"(it declares {sorted(declared)}); use a preset that has it, declare it in "
                f"with_adapters(model, {{{entry!r}: ...}}), or give target_modules"
            )
        else:
            targets.extend(normalize_targets(entry))
    if not targets:
        raise AdapterError(f"method {method!r}: no target (target_modules is empty)")
    return tuple(dict.fromkeys(roles)), tuple(dict.fromkeys(targets))


_METHODS: dict[str, Callable[..., MethodConfig]] = {}


def register_method(name: str, factory: Callable[..., MethodConfig] | None = None):
    """Registers a method name: ``factory(**overrides)`` builds its config. Usable as a decorator.

    Example:
        >>> sorted(n for n in method_names() if n.startswith("lora"))
        ['lora']
    """

    def register(f):
        if name in _METHODS and _METHODS[name] is not f:
            raise AdapterError(f"method {name!r} is already registered")
        _METHODS[name] = f
        return f

    return register if factory is None else register(factory)


def method_names() -> list[str]:
    """The registered method names."""
    return sorted(_METHODS)


def _split_top_level(text: str) -> list[str]:
    parts, depth, current = [], 0, []
    for char in text:
        if char in "[(" :
            depth += 1
        elif char in "])":
            depth -= 1
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    if "".join(current).strip():
        parts.append("".join(current))
    return parts


def _value(text: str) -> Any:
    text = text.strip()
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word: a string, as AdapterHub reads it


def parse_method(spec: str) -> MethodConfig:
    """The config a method name describes, with AdapterHub's bracket overrides.

    Example:
        >>> parse_method("lora[r=4,lora_alpha=16]").r
        4
        >>> parse_method("lora[rank=4]")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        jadapters.errors.AdapterError: method 'lora' has no option(s) ['rank']; its options: ['alpha_pattern', ...]
    """
    if not isinstance(spec, str) or not spec.strip():
        raise AdapterError(f"a method is a name such as 'lora' or 'seq_bn[reduction_factor=8]', got {spec!r}")
    name, bracket, rest = spec.strip().partition("[")
    name = name.strip()
    if name not in _METHODS:
        raise UnknownAdapterError(f"no method named {name!r}; the methods are {method_names()}")
    overrides: dict[str, Any] = {}
    if bracket:
        if not rest.endswith("]"):
            raise AdapterError(f"method {spec!r}: overrides go in one pair of brackets, 'name[key=value,...]'")
        for item in _split_top_level(rest[:-1]):
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                raise AdapterError(f"method {spec!r}: expected key=value, got {item.strip()!r}")
            overrides[key.strip()] = _value(value)
    config = _METHODS[name]()
    return config.replace(**overrides) if overrides else config


def as_config(method: str | MethodConfig) -> MethodConfig:
    """A config from a config or a method name (with overrides)."""
    if isinstance(method, MethodConfig):
        return method
    return parse_method(method)


def check_options(name: str, values: Sequence[Any], allowed: Sequence[Any], option: str) -> None:
    """Raises a clear ``ValueError`` unless every one of ``values`` is in ``allowed``."""
    for value in values:
        if value not in allowed:
            raise ValueError(f"{name}: {option} must be one of {list(allowed)}, got {value!r}")


def resolve_alias(name: str, value: Any, alias_name: str, alias: Any, default: Any) -> Any:
    """A field given under either of two names (PEFT's and AdapterHub's), else ``default``; both given must agree.

    Example:
        >>> resolve_alias("num_virtual_tokens", None, "prefix_length", 4, 20)
        4
        >>> resolve_alias("num_virtual_tokens", 8, "prefix_length", 4, 20)
        Traceback (most recent call last):
        ...
        ValueError: num_virtual_tokens=8 and prefix_length=4 disagree; give one of them
    """
    if value is not None and alias is not None and value != alias:
        raise ValueError(f"{name}={value!r} and {alias_name}={alias!r} disagree; give one of them")
    return value if value is not None else alias if alias is not None else default
