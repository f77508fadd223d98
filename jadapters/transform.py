"""``with_adapters``: adapters inserted into any Flax Linen model without touching its code.

The adapted module shares the wrapped model's scope, so its params tree is the
model's own plus, under each targeted submodule, a reserved ``__adapters__``
child holding the adapters' params. Interception happens inside the adapted
module's ``__call__`` and depends only on its (hashable) fields, so a jitted
function keyed on the module can never replay a trace made for another set of
enabled adapters.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Iterable, Mapping, Sequence

import flax.errors
import flax.linen as nn
import jax

from jadapters.context import AdapterContext
from jadapters.errors import AdapterError, UnknownAdapterError
from jadapters.naming import Target, normalize_targets, path_matches, split_adapter_name
from jadapters.strategies import ResidualAdd, Strategy, check_same_shape
from jadapters.tree import ADAPTERS_KEY, merge_trees, split_adapters

GLOBAL = ""  # NeMo's name for the default module(s) that bare names go to


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
    """One adapter of an adapted model: what it is, where it goes, whether it runs.

    Attributes:
        name: the bare name, unique model-wide.
        modules: the module names it was added to (``()`` for a global adapter).
        targets: canonical path patterns it attaches to.
        adapter: the (unbound) adapter network.
        strategy: how its result joins the value.
        enabled: whether it runs in the forward pass.
    """

    name: str
    modules: tuple[str, ...]
    targets: tuple[str, ...]
    adapter: nn.Module
    strategy: Strategy
    enabled: bool = True

    @property
    def qualified_name(self) -> str:
        """``'module:name'`` as it was added (the bare name for a global adapter)."""
        return f"{'+'.join(self.modules)}:{self.name}" if self.modules else self.name


@dataclasses.dataclass(frozen=True)
class Placement:
    """Named module groups, which of them receive global adapters, and accepted types."""

    modules: tuple[tuple[str, tuple[str, ...]], ...] = ()
    global_modules: tuple[str, ...] = ()
    accepted_types: tuple[tuple[str, tuple[type, ...]], ...] = ()

    @property
    def module_names(self) -> tuple[str, ...]:
        """Valid module names, NeMo style: ``''`` (the global/default ones) and each declared one."""
        return (GLOBAL,) + tuple(name for name, _ in self.modules)

    def targets_of(self, module_names: Sequence[str]) -> tuple[str, ...]:
        declared = dict(self.modules)
        return tuple(dict.fromkeys(t for m in module_names for t in declared[m]))

    def accepted(self, module_name: str) -> tuple[type, ...] | None:
        return dict(self.accepted_types).get(module_name)


class AdaptedModule(nn.Module):
    """A Flax Linen model with adapters; build one with :func:`with_adapters`.

    Its params are the wrapped model's params plus the adapters' subtrees.
    Every method that changes the adapters returns a new module; nothing is
    mutated. ``training=True`` turns on adapter dropout, stochastic depth and
    auxiliary losses (``adapted.clone(training=True)``).
    """

    model: nn.Module
    placement: Placement = Placement()
    adapters: tuple[AdapterSpec, ...] = ()
    training: bool = False

    def setup(self) -> None:
        nn.share_scope(self, self.model)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        root = tuple(self.scope.path)
        creating = self.is_mutable_collection("params")
        matched: set[str] = set()
        seen: list[str] = []

        def intercept(next_fun, call_args, call_kwargs, context):
            out = next_fun(*call_args, **call_kwargs)
            if context.method_name != "__call__" or context.module.scope is None:
                return out
            full = tuple(context.module.scope.path)
            if full[: len(root)] != root or ADAPTERS_KEY in full:
                return out  # outside this model, or inside an adapter
            path = "/".join(full[len(root) :])
            seen.append(path)
            for spec in _specs_at(self.adapters, path):
                matched.add(spec.name)
                if spec.enabled or creating:
                    result = self._run(spec, context.module.scope, path, out, call_args, call_kwargs)
                    out = result if spec.enabled else out
            return out

        with nn.intercept_methods(intercept):
            output = self.model(*args, **kwargs)
        if creating:
            _check_all_placed(self.adapters, matched, seen)
        return output

    def _run(self, spec: AdapterSpec, module_scope, path: str, value, call_args, call_kwargs):
        adapter_scope = module_scope.push(ADAPTERS_KEY, reuse=True).push(spec.name, reuse=True)
        bound = spec.adapter.clone(parent=adapter_scope)
        pass_mode = _accepts_deterministic(type(spec.adapter))
        training = self.training

        def adapter_fn(*a, **k):
            if pass_mode:
                k.setdefault("deterministic", not training)
            try:
                return bound(*a, **k)
            except flax.errors.ScopeParamNotFoundError as e:
                raise AdapterError(
                    f"adapter {spec.name!r} at {path!r} has no params in the variables given to "
                    f"apply: initialise it with jadapters.init_adapters first ({e})"
                ) from None

        ctx = AdapterContext(spec.name, path, training, tuple(call_args), dict(call_kwargs), adapter_scope)
        result = spec.strategy(adapter_fn, value, ctx)
        check_same_shape(result, value, ctx, what=f"its strategy's result ({type(spec.strategy).__name__})")
        return result

    # NeMo's vocabulary, functional: each returns a new module or a plain value.

    @nn.nowrap
    def add_adapter(
        self,
        name: str,
        adapter: nn.Module,
        *,
        strategy: Strategy | None = None,
        targets: Target | Iterable[Target] | None = None,
        enabled: bool = True,
    ) -> "AdaptedModule":
        """Returns a new module with one more adapter.

        ``name`` is ``'name'`` (global: goes to the global modules),
        ``'module:name'`` or ``'a+b:name'`` (declared module names), or a bare
        name with explicit ``targets`` (paths, globs or regexes). The default
        strategy is the adapter's ``default_strategy()``, else :class:`ResidualAdd`.

        Example:
            >>> import flax.linen as nn
            >>> from jadapters import LinearAdapter, with_adapters
            >>> model = with_adapters(nn.Dense(4), {"dense": ""})
            >>> model = model.add_adapter("a1", LinearAdapter(dim=2))
            >>> model.get_enabled_adapters()
            ['a1']
        """
        modules, bare = split_adapter_name(name)
        existing = self._find(bare)
        if existing is not None:
            raise AdapterError(
                f"adapter {bare!r} already exists (added as {existing.qualified_name!r}, at "
                f"{list(existing.targets)}); adapter names are unique model-wide"
            )
        where = self._resolve_targets(name, modules, targets)
        if not isinstance(adapter, nn.Module):
            raise AdapterError(
                f"adapter {bare!r} at {list(where)}: expected a flax.linen.Module "
                f"instance (e.g. LinearAdapter(dim=8)), got {adapter!r}"
            )
        adapter = _detached(adapter)
        for module_name in (modules or (self.placement.global_modules if targets is None else ())):
            accepted = self.placement.accepted(module_name)
            if accepted is not None and not isinstance(adapter, accepted):
                raise AdapterError(
                    f"adapter {bare!r}: module {module_name!r} accepts only "
                    f"{[t.__name__ for t in accepted]} (or subclasses), got {type(adapter).__name__}"
                )
        if strategy is None:
            strategy = adapter.default_strategy() if hasattr(adapter, "default_strategy") else ResidualAdd()
        if not isinstance(strategy, Strategy):
            raise AdapterError(f"adapter {bare!r}: strategy must be a jadapters.Strategy, got {strategy!r}")
        try:
            strategy.validate()
            hash(strategy)
        except (ValueError, TypeError) as e:
            raise AdapterError(f"adapter {bare!r} at {list(where)}: invalid strategy {strategy!r}: {e}") from None
        spec = AdapterSpec(bare, modules, where, adapter, strategy, bool(enabled))
        return self.clone(adapters=self.adapters + (spec,))

    @nn.nowrap
    def set_enabled_adapters(self, name: str | Sequence[str] | None = None, enabled: bool = True) -> "AdaptedModule":
        """Returns a new module with adapter ``name`` (a name, a list, or None: all) switched.

        Example:
            >>> import flax.linen as nn
            >>> from jadapters import LinearAdapter, with_adapters
            >>> model = with_adapters(nn.Dense(4), {"dense": ""}).add_adapter("a", LinearAdapter(2))
            >>> model.set_enabled_adapters(enabled=False).get_enabled_adapters()
            []
        """
        names = self._resolve_names(name)
        adapters = tuple(
            dataclasses.replace(s, enabled=bool(enabled)) if s.name in names else s for s in self.adapters
        )
        return self.clone(adapters=adapters)

    @nn.nowrap
    def get_enabled_adapters(self) -> list[str]:
        """Bare names of the enabled adapters, in insertion order."""
        return [s.name for s in self.adapters if s.enabled]

    @nn.nowrap
    def is_adapter_available(self) -> bool:
        """True if the model has any adapter, enabled or not."""
        return bool(self.adapters)

    @nn.nowrap
    def adapter_names(self) -> list[str]:
        """Bare names of all adapters, in insertion order."""
        return [s.name for s in self.adapters]

    @nn.nowrap
    def get_adapter(self, name: str) -> AdapterSpec:
        """The spec of adapter ``name`` (bare or ``module:name``)."""
        (bare,) = self._resolve_names(name)
        return self._find(bare)

    @nn.nowrap
    def remove_adapter(self, name: str | Sequence[str]) -> "AdaptedModule":
        """Returns a new module without the named adapter(s); drop their variables
        with :func:`jadapters.split_adapters`."""
        names = self._resolve_names(name)
        return self.clone(adapters=tuple(s for s in self.adapters if s.name not in names))

    @nn.nowrap
    def _find(self, bare: str) -> AdapterSpec | None:
        return next((s for s in self.adapters if s.name == bare), None)

    @nn.nowrap
    def _resolve_names(self, name: str | Sequence[str] | None) -> set[str]:
        if name is None:
            return {s.name for s in self.adapters}
        names = [name] if isinstance(name, str) else list(name)
        resolved = set()
        for n in names:
            _, bare = split_adapter_name(n)
            if self._find(bare) is None:
                raise UnknownAdapterError(f"no adapter named {bare!r}; the model has {self.adapter_names()}")
            resolved.add(bare)
        return resolved

    @nn.nowrap
    def _resolve_targets(self, name: str, modules: tuple[str, ...], targets) -> tuple[str, ...]:
        if targets is not None:
            if modules:
                raise AdapterError(
                    f"adapter {name!r}: give either a module name ('module:name') or targets=, not both"
                )
            where = normalize_targets(targets)
            if not where:
                raise AdapterError(f"adapter {name!r}: targets= is empty")
            return where
        valid = self.placement.module_names
        for module_name in modules:
            if module_name not in valid:
                raise AdapterError(
                    f"adapter {name!r}: unknown module name {module_name!r}; valid module names: {list(valid)}"
                )
        named = tuple(m for m in modules if m != GLOBAL)
        if not modules or len(named) < len(modules):
            named = tuple(dict.fromkeys(named + self.placement.global_modules))
        return self.placement.targets_of(named)


def with_adapters(
    model: nn.Module,
    targets: Mapping[str, Target | Iterable[Target]] | None = None,
    *,
    global_modules: Sequence[str] | None = None,
    accepted_types: Mapping[str, type | Sequence[type]] | None = None,
) -> AdaptedModule:
    """Wraps a Flax Linen model so that adapters can be added to its submodules.

    ``targets`` declares the module names that ``'module:name'`` adapters may
    use, each mapped to module paths, globs or regexes (NeMo's
    ``adapter_module_names``). Bare (global) names go to ``global_modules``
    (default: all declared ones), like NeMo's global config.
    ``accepted_types`` restricts which adapter classes a module name accepts.
    To adapt a submodule of a larger model, build the adapted module in the
    parent's ``setup()`` or pass it in as a field.

    Example:
        >>> import jax, jax.numpy as jnp, flax.linen as nn
        >>> from jadapters import LinearAdapter, with_adapters, init_adapters
        >>> base = nn.Dense(4)
        >>> x = jnp.ones((2, 4))
        >>> params = base.init(jax.random.key(0), x)
        >>> model = with_adapters(base, {"dense": ""}).add_adapter("a1", LinearAdapter(dim=2))
        >>> variables = init_adapters(model, params, jax.random.key(1), x)
        >>> bool((model.apply(variables, x) == base.apply(params, x)).all())
        True
    """
    if not isinstance(model, nn.Module):
        raise AdapterError(f"with_adapters expects a flax.linen.Module, got {model!r}")
    model = _detached(model)
    declared: list[tuple[str, tuple[str, ...]]] = []
    for module_name, module_targets in (targets or {}).items():
        if not isinstance(module_name, str) or not module_name or any(c in module_name for c in ":+/"):
            raise AdapterError(f"module name {module_name!r} must be a non-empty string without ':', '+' or '/'")
        declared.append((module_name, normalize_targets(module_targets)))
    names = [n for n, _ in declared]
    chosen = tuple(names if global_modules is None else global_modules)
    for module_name in chosen:
        if module_name not in names:
            raise AdapterError(f"global module {module_name!r} is not a declared module name; declared: {names}")
    accepted = []
    for module_name, types in (accepted_types or {}).items():
        if module_name not in names and module_name != GLOBAL:
            raise AdapterError(f"accepted_types names module {module_name!r}, which is not declared: {names}")
        types = (types,) if isinstance(types, type) else tuple(types)
        accepted.append((module_name, types))
    return AdaptedModule(model=model, placement=Placement(tuple(declared), chosen, tuple(accepted)))


def init_adapters(
    adapted: AdaptedModule,
    variables: Mapping[str, Any],
    rngs: jax.Array | Mapping[str, jax.Array],
    *args: Any,
    **kwargs: Any,
) -> dict:
    """Returns ``variables`` plus freshly initialised params of every adapter missing from it.

    Only the adapter subtree is created: base params are neither re-initialised
    nor copied (the returned tree shares their arrays), and adapters already in
    ``variables`` keep their values. ``args``/``kwargs`` are sample inputs.

    Example:
        >>> import jax, jax.numpy as jnp, flax.linen as nn
        >>> from jadapters import LinearAdapter, with_adapters
        >>> x = jnp.ones((1, 3))
        >>> params = nn.Dense(3).init(jax.random.key(0), x)
        >>> model = with_adapters(nn.Dense(3), {"d": ""}).add_adapter("a", LinearAdapter(2))
        >>> sorted(init_adapters(model, params, jax.random.key(1), x)["params"])
        ['__adapters__', 'bias', 'kernel']
    """
    rngs = dict(rngs) if isinstance(rngs, Mapping) else {"params": rngs}
    adapted = adapted.clone(training=False)  # creating params needs no dropout keys

    @jax.jit
    def create(variables, rngs, args, kwargs):
        _, state = adapted.apply(variables, *args, rngs=rngs, mutable=True, **kwargs)
        return split_adapters(state)[0]

    created = create(variables, rngs, args, kwargs)
    present, _ = split_adapters(variables)
    missing = _drop_present(created, present)
    return merge_trees(variables, missing)


def _drop_present(created: Mapping, present: Mapping) -> dict:
    out = {}
    for key, sub in created.items():
        if key not in present:
            out[key] = sub
        elif isinstance(sub, Mapping) and isinstance(present[key], Mapping):
            rest = _drop_present(sub, present[key])
            if rest:
                out[key] = rest
    return out


def _detached(module: nn.Module) -> nn.Module:
    """The module without a parent: modules built inside a compact method are bound on
    construction, but the adapted module binds them to its own scopes."""
    return module if module.parent is None and module.scope is None else module.clone(parent=None, name=None)


@functools.lru_cache(maxsize=65536)
def _specs_at(adapters: tuple[AdapterSpec, ...], path: str) -> tuple[AdapterSpec, ...]:
    return tuple(s for s in adapters if any(path_matches(path, t) for t in s.targets))


@functools.lru_cache(maxsize=None)
def _accepts_deterministic(cls: type) -> bool:
    try:
        return "deterministic" in inspect.signature(cls.__call__).parameters
    except (TypeError, ValueError):
        return False


def _check_all_placed(adapters: tuple[AdapterSpec, ...], matched: set[str], seen: list[str]) -> None:
    for spec in adapters:
        if spec.targets and spec.name not in matched:
            paths = sorted(set(seen))
            raise AdapterError(
                f"adapter {spec.name!r}: its targets {list(spec.targets)} matched no module that was "
                f"called; module paths called: {paths[:40]}{' ...' if len(paths) > 40 else ''}"
            )
