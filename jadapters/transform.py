"""``with_adapters``: adapters inserted into any Flax Linen model without touching its code.

The adapted module shares the wrapped model's scope, so its params tree is the
model's own plus, under each targeted submodule, a reserved ``__adapters__``
child holding the adapters' params. Interception happens inside the adapted
module's ``__call__`` and depends only on its (hashable) fields, so a jitted
function keyed on the module can never replay a trace made for another set of
enabled adapters.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
from typing import Any, Callable, Iterable, Mapping, Sequence

import flax.errors
import flax.linen as nn
import jax
import numpy as np

from jadapters import composition
from jadapters.blocks import InResidualBlock
from jadapters.configs import MethodConfig, as_config
from jadapters.context import LOSS_COLLECTION, AdapterContext, ChildCall
from jadapters.errors import AdapterError, UnknownAdapterError
from jadapters.naming import (Target, expand_groups, normalize_targets, path_matches, qualified_name, select_names,
                              split_adapter_name)
from jadapters.presets import Preset, get_preset
from jadapters.strategies import ResidualAdd, Strategy, check_like
from jadapters.tree import ADAPTERS_KEY, SHARED_KEY, adapter_locations, merge_trees, split_adapters

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
        config: the method config it was built from (``"lora[r=4]"``, ``LoraConfig(...)``), if any.
        group: for a part of a union of methods (:class:`jadapters.ConfigUnion`), the name the
            union was added under, which addresses all its parts; None otherwise.
    """

    name: str
    modules: tuple[str, ...]
    targets: tuple[str, ...]
    adapter: nn.Module
    strategy: Strategy
    enabled: bool = True
    config: Any = None
    group: str | None = None

    @property
    def qualified_name(self) -> str:
        """``'module:name'`` as it was added (the bare name for a global adapter)."""
        return qualified_name(self.modules, self.name)


@dataclasses.dataclass(frozen=True)
class AdapterGroup:
    """The adapters a union of methods was added as (``add_adapter("u", "unipelt")``): its parts' specs.

    Attributes:
        name: the name the union was added under.
        parts: the parts' specs, in insertion order.
    """

    name: str
    parts: tuple[AdapterSpec, ...]

    @property
    def enabled(self) -> bool:
        """Whether every part is enabled."""
        return all(p.enabled for p in self.parts)

    @property
    def configs(self) -> tuple[Any, ...]:
        """The parts' method configs."""
        return tuple(p.config for p in self.parts)


@dataclasses.dataclass(frozen=True)
class Placement:
    """Named module groups, which of them receive global adapters, accepted types, and the preset used."""

    modules: tuple[tuple[str, tuple[str, ...]], ...] = ()
    global_modules: tuple[str, ...] = ()
    accepted_types: tuple[tuple[str, tuple[type, ...]], ...] = ()
    preset: str = ""
    sites: tuple[tuple[str, Any], ...] = ()

    def site(self, name: str, method: str) -> Any:
        """The preset's site ``name`` (see :class:`jadapters.Preset`); a clear error if there is none."""
        found = dict(self.sites).get(name)
        if found is None:
            raise AdapterError(
                f"method {method!r} needs the site {name!r}, which this model's preset "
                f"({self.preset or 'none'}) does not describe; it has sites {[n for n, _ in self.sites]}"
            )
        return found

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
    auxiliary losses (``adapted.clone(training=True)``); ``freeze_batchnorm=True``
    runs the base model's BatchNorm layers on their running statistics
    whatever the model's own ``train`` flag says (NeMo's adapter training).

    Any method of the wrapped model runs with its adapters too:
    ``adapted.apply(variables, x, method=Model.encode)`` (or ``method='encode'``,
    or a function ``fn(model, *args)``), and :meth:`call_method` from a parent module.
    """

    model: nn.Module
    placement: Placement = Placement()
    adapters: tuple[AdapterSpec, ...] = ()
    training: bool = False
    freeze_batchnorm: bool = False
    active_setup: Any = None  # a jadapters.composition block, or None: enabled adapters chained

    def __hash__(self) -> int:
        # A static argument of jit must hash; a third-party model may not (Hugging Face's Flax
        # modules hold an unhashable config), so such a model counts by its type alone. Equal
        # modules still hash equal; jit compares candidates with ==.
        try:
            model_hash = hash(self.model)
        except TypeError:
            model_hash = hash(type(self.model))
        return hash((model_hash, self.placement, self.adapters, self.training, self.freeze_batchnorm, self.active_setup))

    def setup(self) -> None:
        nn.share_scope(self, self.model)

    def __call__(self, *args: Any, adapter_ids: Any = None, **kwargs: Any) -> Any:
        """Runs the wrapped model with its enabled adapters (or its active setup).

        ``adapter_ids`` (one integer per row, ``-1`` for the base alone) chooses
        each row's adapter in the model's adapter banks (:class:`jadapters.AdapterBank`).
        """
        args, kwargs = composition.replicate_inputs(self.active_setup, args, kwargs)
        return self._run_adapted(lambda: self.model(*args, **kwargs), adapter_ids)

    def call_method(self, method: str | Callable[..., Any], *args: Any, adapter_ids: Any = None, **kwargs: Any) -> Any:
        """Runs a method of the wrapped model with the adapters: a name, or ``fn(model, *args, **kwargs)``.

        ``adapter_ids`` (as in :meth:`__call__`) chooses each row's slot of the adapter banks.

        Example:
            >>> import jax, jax.numpy as jnp, flax.linen as nn
            >>> from jadapters import LinearAdapter, with_adapters, init_adapters
            >>> class EncoderDecoder(nn.Module):
            ...     def setup(self):
            ...         self.encoder, self.decoder = nn.Dense(2), nn.Dense(2)
            ...     def __call__(self, x):
            ...         return self.decoder(self.encode(x))
            ...     def encode(self, x):
            ...         return self.encoder(x)
            >>> x = jnp.ones((1, 2))
            >>> model = with_adapters(EncoderDecoder(), {"encoder": "encoder"})
            >>> model = model.add_adapter("a", LinearAdapter(2))
            >>> params = EncoderDecoder().init(jax.random.key(0), x)
            >>> variables = init_adapters(model, params, jax.random.key(1), x)
            >>> model.apply(variables, x, method="encode").shape
            (1, 2)
        """
        args, kwargs = composition.replicate_inputs(self.active_setup, args, kwargs)
        if isinstance(method, str):
            name = method
            if not callable(getattr(type(self.model), name, None)):
                raise AdapterError(f"the wrapped model {type(self.model).__name__} has no method {name!r}")
            return self._run_adapted(lambda: getattr(self.model, name)(*args, **kwargs), adapter_ids)
        return self._run_adapted(lambda: method(self.model, *args, **kwargs), adapter_ids)

    def _run_adapted(self, run: Callable[[], Any], adapter_ids: Any = None) -> Any:
        session = _Session(self)
        session.adapter_ids = self._checked_ids(adapter_ids, session.creating)
        session.shared = self._shared_variables(session.creating)
        with nn.intercept_methods(session.intercept):
            output = run()
        if session.creating:
            _check_all_placed(self.adapters, session.matched, session.seen)
        return output

    @nn.nowrap
    def _checked_ids(self, adapter_ids: Any, creating: bool) -> Any:
        """``adapter_ids`` if an enabled adapter bank reads them; a clear error if given with none to read them."""
        if adapter_ids is None:
            return None
        from jadapters.bank import AdapterBank, check_adapter_ids

        banks = [s for s in self.adapters if s.enabled and isinstance(s.adapter, AdapterBank)]
        if not banks:
            if creating:
                return None
            raise AdapterError(
                f"adapter_ids were given, but no enabled adapter is a bank (AdapterBank) to read them; "
                f"enabled adapters: {self.get_enabled_adapters()}"
            )
        for spec in banks:
            check_adapter_ids(adapter_ids, spec.adapter.slots)
        return adapter_ids

    @nn.nowrap
    def _shared_variables(self, creating: bool) -> dict[str, Any]:
        """What each adapter's ``shared_module()`` computes, once per call, at the model's root.

        Variables shared by every placement of one adapter (Compacter's PHM
        rule) live at ``<root>/__adapters__/<name>/__shared__/``, outside any
        ``nn.scan`` of the model, so they are never stacked per layer; the
        adapter reads the result as its ``shared`` argument.
        """
        shared: dict[str, Any] = {}
        for spec in self.adapters:
            make = getattr(spec.adapter, "shared_module", None)
            module = make() if make is not None and (spec.enabled or creating) else None
            if module is None:
                continue
            scope = self.scope.push(ADAPTERS_KEY, reuse=True).push(spec.name, reuse=True).push(SHARED_KEY, reuse=True)
            try:
                shared[spec.name] = module.clone(parent=scope)()
            except flax.errors.ScopeParamNotFoundError as e:
                raise AdapterError(
                    f"adapter {spec.name!r}: its shared variables are not in the variables given to apply: "
                    f"initialise it with jadapters.init_adapters first ({e})"
                ) from None
        return shared

    @nn.nowrap
    def _entry(self, method: Any) -> Any:
        """``method`` for Flax's apply/init: the adapted module's own, or a wrapped model's through call_method."""
        if method is None:
            return None
        function = getattr(method, "__func__", method)
        name = method if isinstance(method, str) else getattr(function, "__name__", None)
        if isinstance(name, str) and name in _OWN_METHODS and (isinstance(method, str) or getattr(AdaptedModule, name) is function):
            return method
        return lambda module, *args, **kwargs: module.call_method(method, *args, **kwargs)

    @nn.nowrap
    def apply(self, variables: Mapping[str, Any], *args: Any, method: Any = None, **kwargs: Any) -> Any:
        """Flax's ``apply``; ``method`` may also name a method of the wrapped model (run with adapters)."""
        return super().apply(variables, *args, method=self._entry(method), **kwargs)

    @nn.nowrap
    def init(self, rngs: Any, *args: Any, method: Any = None, **kwargs: Any) -> Any:
        """Flax's ``init``; ``method`` as in :meth:`apply`."""
        return super().init(rngs, *args, method=self._entry(method), **kwargs)

    @nn.nowrap
    def init_with_output(self, rngs: Any, *args: Any, method: Any = None, **kwargs: Any) -> Any:
        """Flax's ``init_with_output``; ``method`` as in :meth:`apply`."""
        return super().init_with_output(rngs, *args, method=self._entry(method), **kwargs)

    # NeMo's vocabulary, functional: each returns a new module or a plain value.

    @nn.nowrap
    def add_adapter(
        self,
        name: str,
        adapter: nn.Module | MethodConfig | str,
        *,
        strategy: Strategy | None = None,
        targets: Target | Iterable[Target] | None = None,
        enabled: bool = True,
    ) -> "AdaptedModule":
        """Returns a new module with one more adapter.

        ``adapter`` is an adapter network (a Flax module), or a method: a
        config object (``LoraConfig(r=8)``) or a registered name with
        AdapterHub's bracket overrides (``"lora[r=8]"``, ``"seq_bn[reduction_factor=8]"``),
        which places itself through the model's roles.

        ``name`` is ``'name'`` (global: goes to the global modules, or where
        the method places itself), ``'module:name'`` or ``'a+b:name'``
        (declared module names), or a bare name with explicit ``targets``
        (paths, globs or regexes). The default strategy is the method's, the
        adapter's ``default_strategy()``, else :class:`ResidualAdd`.

        Example:
            >>> import flax.linen as nn
            >>> from jadapters import LinearAdapter, with_adapters
            >>> model = with_adapters(nn.Dense(4), {"dense": ""})
            >>> model = model.add_adapter("a1", LinearAdapter(dim=2))
            >>> model = model.add_adapter("a2", "lora[r=2]", targets="")
            >>> model.get_enabled_adapters(), model.get_adapter("a2").adapter.rank
            (['a1', 'a2'], 2)
        """
        modules, bare = split_adapter_name(name)
        self._check_new_name(bare)
        config = as_config(adapter) if isinstance(adapter, (str, MethodConfig)) else None
        explicit = bool(modules) or targets is not None
        where = self._resolve_targets(name, modules, targets) if explicit or config is None else None
        if config is not None:
            try:
                placed = config.place(self.placement, where)
            except (AdapterError, ValueError) as e:
                raise AdapterError(f"adapter {bare!r}: {e}") from None
            if isinstance(placed, tuple):  # a union of methods: one adapter per part, grouped under the name
                return self._add_parts(bare, placed, strategy, bool(enabled))
            adapter, strategy = placed.adapter, strategy or placed.strategy
            if not explicit:
                modules, where = placed.modules, placed.targets
        if strategy is None and isinstance(adapter, nn.Module):
            strategy = adapter.default_strategy() if hasattr(adapter, "default_strategy") else ResidualAdd()
        return self.add_spec(AdapterSpec(bare, modules, where, adapter, strategy, bool(enabled), config))

    @nn.nowrap
    def _add_parts(self, group: str, parts: Sequence[Any], strategy: Strategy | None, enabled: bool) -> "AdaptedModule":
        if strategy is not None:
            raise AdapterError(f"adapter {group!r}: a union of methods takes each part's own strategy; give none")
        out = self
        for part in parts:
            p = part.placed
            out = out.add_spec(AdapterSpec(f"{group}.{part.suffix}", p.modules, p.targets, p.adapter, p.strategy,
                                           enabled, part.config, group))
        return out

    @nn.nowrap
    def add_spec(self, spec: AdapterSpec) -> "AdaptedModule":
        """Returns a new module with ``spec`` appended, after the checks of :meth:`add_adapter`.

        This is the form in which checkpoints rebuild adapters: the spec keeps
        its saved targets.
        """
        bare, where = spec.name, list(spec.targets)
        self._check_new_name(bare)
        if not isinstance(spec.adapter, nn.Module):
            raise AdapterError(
                f"adapter {bare!r} at {where}: expected a flax.linen.Module "
                f"instance (e.g. LinearAdapter(dim=8)), got {spec.adapter!r}"
            )
        adapter = _detached(spec.adapter)
        for module_name in self._modules_of(spec):
            accepted = self.placement.accepted(module_name)
            if accepted is not None and not isinstance(adapter, accepted):
                raise AdapterError(
                    f"adapter {bare!r}: module {module_name!r} accepts only "
                    f"{[t.__name__ for t in accepted]} (or subclasses), got {type(adapter).__name__}"
                )
        strategy = spec.strategy
        if not isinstance(strategy, Strategy):
            raise AdapterError(f"adapter {bare!r}: strategy must be a jadapters.Strategy, got {strategy!r}")
        try:
            strategy.validate()
            hash(strategy)
        except (ValueError, TypeError) as e:
            raise AdapterError(f"adapter {bare!r} at {where}: invalid strategy {strategy!r}: {e}") from None
        return self.clone(adapters=self.adapters + (dataclasses.replace(spec, adapter=adapter),))

    @nn.nowrap
    def _check_new_name(self, bare: str) -> None:
        existing = self._find(bare)
        if existing is not None:
            raise AdapterError(
                f"adapter {bare!r} already exists (added as {existing.qualified_name!r}, at "
                f"{list(existing.targets)}); adapter names are unique model-wide"
            )
        if bare in self._groups():
            raise AdapterError(f"adapter {bare!r} already exists (a union of {self._groups()[bare]}); adapter names "
                               f"are unique model-wide")

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
    def set_active(self, setup: "composition.Setup | None") -> "AdaptedModule":
        """Returns a new module whose adapters run as ``setup`` says (see :mod:`jadapters.composition`).

        ``setup`` is an adapter name, a block (``Stack("a", Fuse("b", "c"))``),
        or None: every enabled adapter chained in insertion order. While a
        setup is active, only the adapters it names run, and they must be enabled.

        Example:
            >>> import flax.linen as nn
            >>> from jadapters import LinearAdapter, with_adapters, Stack
            >>> model = with_adapters(nn.Dense(4), {"dense": ""}).add_adapter("a", LinearAdapter(2))
            >>> model.set_active(Stack("a")).active_setup
            Stack('a')
            >>> model.set_active(Stack("a", "b"))
            Traceback (most recent call last):
            ...
            jadapters.errors.AdapterError: the adapter setup Stack('a', 'b') names adapters ['b'] that the model does not have; it has ['a']
        """
        setup = composition.as_setup(setup)
        if setup is not None:
            unknown = sorted(setup.names() - set(self.adapter_names()))
            if unknown:
                raise AdapterError(f"the adapter setup {setup!r} names adapters {unknown} that the model does not "
                                   f"have; it has {self.adapter_names()}")
        return self.clone(active_setup=setup)

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
    def get_adapter(self, name: str) -> AdapterSpec | AdapterGroup:
        """The spec of adapter ``name`` (bare or ``module:name``); for a union's name, its :class:`AdapterGroup`."""
        parts = self._groups().get(name) if isinstance(name, str) and self._find(name) is None else None
        if parts:
            return AdapterGroup(name, tuple(self._find(p) for p in parts))
        (bare,) = self._resolve_names(name)
        return self._find(bare)

    @nn.nowrap
    def remove_adapter(self, name: str | Sequence[str]) -> "AdaptedModule":
        """Returns a new module without the named adapter(s); drop their variables
        with :func:`jadapters.split_adapters`."""
        names = self._resolve_names(name)
        setup = self.active_setup
        if setup is not None and names & setup.names():
            raise AdapterError(f"adapters {sorted(names & setup.names())} are in the active setup {setup!r}; "
                               f"change it with set_active before removing them")
        return self.clone(adapters=tuple(s for s in self.adapters if s.name not in names))

    @nn.nowrap
    def _find(self, bare: str) -> AdapterSpec | None:
        return next((s for s in self.adapters if s.name == bare), None)

    @nn.nowrap
    def _resolve_names(self, name: str | Sequence[str] | None) -> set[str]:
        available = [(self._modules_of(s), s.name) for s in self.adapters]
        name = expand_groups(name, self._groups(), self.adapter_names())
        return set(select_names(name, available, "the model", listed=self.adapter_names()))

    @nn.nowrap
    def _groups(self) -> dict[str, list[str]]:
        """Union name -> its parts' names."""
        groups: dict[str, list[str]] = {}
        for s in self.adapters:
            if s.group is not None:
                groups.setdefault(s.group, []).append(s.name)
        return groups

    @nn.nowrap
    def _modules_of(self, spec: AdapterSpec) -> tuple[str, ...]:
        """The module names an adapter is on: those it was added to, or the global ones."""
        if spec.modules:
            return spec.modules
        placement = self.placement
        return placement.global_modules if spec.targets == placement.targets_of(placement.global_modules) else ()

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



_OWN_METHODS = frozenset({"__call__", "call_method"})


class _AdapterCall:
    """Calls one bound adapter, with its mode and with errors that name it.

    An adapter whose ``__call__`` takes ``deterministic`` gets ``not training``;
    one that takes ``shared`` gets what its ``shared_module()`` computed at the
    model's root for this call.
    """

    def __init__(self, adapter: nn.Module, ctx: AdapterContext, training: bool):
        self._adapter, self._ctx, self._training = adapter, ctx, training

    @property
    def module(self) -> nn.Module:
        """The bound adapter module, e.g. to read its fields before calling it."""
        return self._adapter

    def accepts(self, argument: str) -> bool:
        """Whether the adapter's ``__call__`` takes ``argument`` (e.g. ``'layer'``)."""
        return argument in _call_parameters(type(self._adapter))

    def nested(self, name: str) -> "_AdapterCall":
        """The same adapter with its own variables under ``name``.

        For a strategy that places one adapter at several positions inside the
        module it wraps (an attention and a feed-forward adapter in one block).
        """
        scope = self._ctx.scope.push(name, reuse=True)
        return _AdapterCall(self._adapter.clone(parent=scope), self._ctx, self._training)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.accepts("deterministic"):
            kwargs.setdefault("deterministic", not self._training)
        if self.accepts("shared") and self._ctx.session is not None:
            kwargs.setdefault("shared", self._ctx.session.shared.get(self._ctx.name))
        if self.accepts("adapter_ids") and self._ctx.session is not None:
            kwargs.setdefault("adapter_ids", self._ctx.session.adapter_ids)
        try:
            return self._adapter(*args, **kwargs)
        except flax.errors.ScopeParamNotFoundError as e:
            raise AdapterError(
                f"{self._ctx.where()} has no params in the variables given to apply: initialise it with "
                f"jadapters.init_adapters first ({e})"
            ) from None
        except flax.errors.InvalidRngError as e:
            raise AdapterError(
                f"{self._ctx.where()} needs a PRNG stream it was not given ({e}); in training mode pass "
                f"rngs={{'dropout': key}} to apply"
            ) from None


class _Session:
    """One call of an adapted model: which adapters were placed, which module calls are running."""

    def __init__(self, adapted: AdaptedModule):
        self.adapted = adapted
        self.root = tuple(adapted.scope.path)
        self.creating = adapted.is_mutable_collection("params")
        self.losses_requested = adapted.is_mutable_collection(LOSS_COLLECTION)
        self.matched: set[str] = set()
        self.seen: list[str] = []
        self.shared: dict[str, Any] = {}
        self.adapter_ids: Any = None
        self._active: set[str] = set()
        self._hooks: list[tuple[str, Mapping[str, Any]]] = []

    @contextlib.contextmanager
    def child_hooks(self, parent: str, hooks: Mapping[str, Any]):
        entry = (parent, dict(hooks))
        self._hooks.append(entry)
        try:
            yield
        finally:
            self._hooks.remove(entry)

    def intercept(self, next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or module.scope is None:
            return next_fun(*args, **kwargs)
        full = tuple(module.scope.path)
        if full[: len(self.root)] != self.root or ADAPTERS_KEY in full:
            return next_fun(*args, **kwargs)  # outside this model, or inside an adapter
        path = "/".join(full[len(self.root) :])
        if path in self._active:
            # The same module calling itself (``super().__call__``, as nn.SelfAttention does):
            # its adapters already wrap the outer call.
            return next_fun(*args, **kwargs)
        self.seen.append(path)
        call = next_fun
        if self.adapted.freeze_batchnorm and isinstance(module, nn.BatchNorm):
            call = functools.partial(_batchnorm_on_running_statistics, module, call)
        setup = self.adapted.active_setup
        specs = _specs_at(self.adapted.adapters, path)
        here = setup
        if setup is not None:
            composed = [s for s in specs if s.name in setup.names()]
        else:
            # Several bottlenecks in one residual block cannot nest their hooks on the block's
            # LayerNorm: with no setup they run as AdapterHub runs a list of active adapters, a Stack.
            composed = [s for s in specs if isinstance(s.strategy, InResidualBlock) and s.enabled
                        and not s.strategy.is_parallel]
            composed = composed if len(composed) > 1 else []
            here = composition.Stack(*(s.name for s in composed)) if composed else None
        for spec in specs:
            self.matched.add(spec.name)
            if spec in composed:
                if spec is composed[0]:
                    call = functools.partial(self._run_composed, here, composed, module, path, call)
            # While variables are created, every adapter runs (disabled ones get their variables too);
            # with an active setup, only those it names run.
            elif (spec.enabled and setup is None) or self.creating:
                call = functools.partial(self._run, spec, module, path, call)
        for parent, hooks in reversed(self._hooks):
            relative = path[len(parent) + 1 :] if parent else path
            if (path.startswith(parent + "/") or not parent) and relative in hooks:
                call = functools.partial(hooks[relative], ChildCall(call, module))
        self._active.add(path)
        try:
            return call(*args, **kwargs)
        finally:
            self._active.discard(path)

    def _adapter_call(self, spec: AdapterSpec, module: nn.Module, path: str, args, kwargs):
        scope = module.scope.push(ADAPTERS_KEY, reuse=True).push(spec.name, reuse=True)
        training = self.adapted.training
        ctx = AdapterContext(spec.name, path, training, args, kwargs, scope=scope, module=module, session=self,
                             changes_shape=spec.strategy.changes_shape)
        return _AdapterCall(spec.adapter.clone(parent=scope), ctx, training), ctx

    def _run_composed(self, setup, specs, module: nn.Module, path: str, call, *args, **kwargs):
        """The setup's adapters at this module, run together as its blocks say."""
        disabled = [s.name for s in specs if not s.enabled]
        if disabled and not self.creating:
            raise AdapterError(f"adapters {disabled} at {path!r} are in the active setup {setup!r} but disabled; "
                               f"enable them, or change the setup with set_active")
        if len(specs) == 1 and composition.only_stacked(setup, specs[0].name):
            return self._run(specs[0], module, path, call, *args, **kwargs)  # a Stack of one is the adapter alone
        members = [composition.Member(s, *self._adapter_call(s, module, path, args, kwargs)) for s in specs]
        return composition.run_setup(setup, members, call, args, kwargs)

    def _run(self, spec: AdapterSpec, module: nn.Module, path: str, call, *args, **kwargs):
        strategy = spec.strategy
        adapter, ctx = self._adapter_call(spec, module, path, args, kwargs)
        if strategy.changes_shape:
            return strategy.around(adapter, call, ctx)
        values: list[Any] = []

        def observed(*a, **k):
            values.append(call(*a, **k))
            return values[-1]

        result = strategy.around(adapter, observed, ctx)
        if values:
            check_like(result, values[-1], ctx, what=f"its strategy's result ({type(strategy).__name__})")
        return result


def _batchnorm_on_running_statistics(module: nn.BatchNorm, call, *args, **kwargs):
    """Calls a BatchNorm in inference mode, whatever its field or its caller ask for."""
    if len(args) > 1:
        args = (args[0], True) + tuple(args[2:])
    elif module.use_running_average is None or "use_running_average" in kwargs:
        kwargs = {**kwargs, "use_running_average": True}
    if module.use_running_average is None or module.use_running_average:
        return call(*args, **kwargs)
    # The field says batch statistics; Flax rejects setting both field and argument, so the
    # field is switched for the duration of this call.
    object.__setattr__(module, "use_running_average", True)
    try:
        return call(*args, **kwargs)
    finally:
        object.__setattr__(module, "use_running_average", False)


def with_adapters(
    model: nn.Module,
    targets: Mapping[str, Target | Iterable[Target]] | Preset | str | None = None,
    *,
    global_modules: Sequence[str] | None = None,
    accepted_types: Mapping[str, type | Sequence[type]] | None = None,
) -> AdaptedModule:
    """Wraps a Flax Linen model so that adapters can be added to its submodules.

    ``targets`` declares the module names that ``'module:name'`` adapters may
    use, each mapped to module paths, globs or regexes (NeMo's
    ``adapter_module_names``); or it is a :class:`jadapters.Preset` (or the
    name of a shipped one, e.g. ``'hf_bert'``), whose roles become the module
    names. Bare (global) names go to ``global_modules`` (default: the preset's
    global roles, else all declared names), like NeMo's global config.
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
        >>> with_adapters(base, "hf_bert").placement.global_modules
        ('ffn_output',)
    """
    if not isinstance(model, nn.Module):
        raise AdapterError(f"with_adapters expects a flax.linen.Module, got {model!r}")
    model = _detached(model)
    preset_name, sites = "", ()
    if isinstance(targets, (Preset, str)):
        preset = get_preset(targets)
        preset_name, targets, sites = preset.name, dict(preset.roles), preset.sites
        if global_modules is None:
            global_modules = preset.global_roles
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
    placement = Placement(tuple(declared), chosen, tuple(accepted), preset_name, sites)
    return AdaptedModule(model=model, placement=placement)


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
    ``variables`` keep their values. ``args``/``kwargs`` are sample inputs;
    Python values among them (``train=False``, ``deterministic=True``) are
    passed as they are, arrays are traced. ``variables`` is a dict of
    collections, ``{'params': ...}`` (Hugging Face models keep bare params:
    pass ``{'params': hf_model.params}``); it must hold every base variable.
    Adapters that start from the layer's weight and leave it a residual
    (LoRA's ``"pissa"`` and ``"olora"`` inits) are the one exception to "base
    params untouched": the returned variables hold the residual weights of the
    layers they were created on (new arrays; those passed in are unchanged).

    Example:
        >>> import jax, jax.numpy as jnp, flax.linen as nn
        >>> from jadapters import LinearAdapter, with_adapters
        >>> x = jnp.ones((1, 3))
        >>> params = nn.Dense(3).init(jax.random.key(0), x)
        >>> model = with_adapters(nn.Dense(3), {"d": ""}).add_adapter("a", LinearAdapter(2))
        >>> sorted(init_adapters(model, params, jax.random.key(1), x)["params"])
        ['__adapters__', 'bias', 'kernel']
    """
    if not isinstance(adapted, AdaptedModule):
        raise AdapterError(f"init_adapters expects the AdaptedModule returned by with_adapters, got {type(adapted).__name__}")
    _check_collections(variables, "init_adapters")
    rngs = dict(rngs) if isinstance(rngs, Mapping) else {"params": rngs}
    adapted = adapted.clone(training=False)  # creating params needs no dropout keys
    traced, rebuild = split_static((args, kwargs))

    @jax.jit
    def create(variables, rngs, traced):
        call_args, call_kwargs = rebuild(traced)
        _, state = adapted.apply(variables, *call_args, rngs=rngs, mutable=True, **call_kwargs)
        return split_adapters(state)

    created, rest = create(variables, rngs, traced)
    _check_base_complete(variables, rest)
    present, _ = split_adapters(variables)
    missing = _drop_present(created, present)
    return merge_trees(_rewritten_base(adapted, variables, rest, missing), missing)


def _rewritten_base(adapted: AdaptedModule, variables: Mapping[str, Any], after: Mapping[str, Any], new: Mapping) -> Any:
    """``variables`` with the base params of the layers that newly created adapters rewrite (PiSSA's residual).

    An adapter whose ``rewrites_base`` is true replaces its layer's params when
    it is created; they are taken from ``after`` (the state the creating pass
    left) for the modules where it was just created, and nowhere else.
    """
    rewriting = {s.name for s in adapted.adapters if getattr(s.adapter, "rewrites_base", False)}
    paths = {p for name, where in adapter_locations(new).items() if name in rewriting for p in where}
    if not paths:
        return variables
    params = variables["params"]
    for path in sorted(paths):
        keys = path.split("/") if path else []
        source = after["params"]
        for key in keys:
            source = source[key]
        params = with_leaves(params, keys, {k: v for k, v in source.items() if not isinstance(v, Mapping)})
    return {**variables, "params": params}


def with_leaves(tree: Mapping[str, Any], keys: Sequence[str], leaves: Mapping[str, Any]) -> dict:
    """A copy of ``tree`` with ``leaves`` set in the node at ``keys``; nothing else is copied.

    Example:
        >>> with_leaves({"a": {"k": 1, "b": 2}, "c": 3}, ["a"], {"k": 9})
        {'a': {'k': 9, 'b': 2}, 'c': 3}
    """
    if not keys:
        return {**tree, **leaves}
    return {**tree, keys[0]: with_leaves(tree[keys[0]], keys[1:], leaves)}


def _check_collections(variables: Any, what: str) -> None:
    """Raises unless ``variables`` is a mapping of collections (``{'params': ...}``)."""
    if not isinstance(variables, Mapping):
        raise AdapterError(f"{what}: variables must be a dict of collections such as {{'params': ...}}, got {type(variables).__name__}")
    if variables and "params" not in variables:
        keys = sorted(map(str, variables))[:8]
        raise AdapterError(
            f"{what}: variables must be a dict of collections such as {{'params': ...}}, but its keys are {keys}; "
            f"bare params (as Hugging Face's Flax models keep them) go in as {{'params': params}}"
        )


def _check_base_complete(given: Mapping[str, Any], base_after: Mapping[str, Any]) -> None:
    """Raises if the model created base variables, i.e. ``given`` lacks some of the base's."""
    have = {path for path, _ in _leaf_paths(given)}
    created = [path for path, _ in _leaf_paths(base_after) if path not in have and path[0] == "params"]
    if created:
        shown = ["/".join(p) for p in created[:6]]
        raise AdapterError(
            f"init_adapters: the variables given lack {len(created)} base parameter(s) of the model, e.g. {shown}; "
            f"pass the base model's variables (for a Hugging Face model: {{'params': hf_model.params}})"
        )


def _leaf_paths(tree: Mapping[str, Any]) -> list[tuple[tuple[str, ...], Any]]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [(tuple(str(getattr(k, "key", k)) for k in path), leaf) for path, leaf in flat]


def split_static(tree: Any) -> tuple[list[Any], Callable[[list[Any]], Any]]:
    """Array leaves of ``tree`` (to trace) and a function that rebuilds it with Python values kept as they are."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    is_array = [isinstance(leaf, (jax.Array, np.ndarray, np.generic)) for leaf in leaves]
    static = [None if a else leaf for leaf, a in zip(leaves, is_array)]

    def rebuild(traced: list[Any]) -> Any:
        it = iter(traced)
        return jax.tree_util.tree_unflatten(treedef, [next(it) if a else s for s, a in zip(static, is_array)])

    return [leaf for leaf, a in zip(leaves, is_array) if a], rebuild


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
def _call_parameters(cls: type) -> frozenset[str]:
    try:
        return frozenset(inspect.signature(cls.__call__).parameters)
    except (TypeError, ValueError):
        return frozenset()


def _check_all_placed(adapters: tuple[AdapterSpec, ...], matched: set[str], seen: list[str]) -> None:
    for spec in adapters:
        if spec.targets and spec.name not in matched:
            paths = sorted(set(seen))
            raise AdapterError(
                f"adapter {spec.name!r}: its targets {list(spec.targets)} matched no module that was "
                f"called; module paths called: {paths[:40]}{' ...' if len(paths) > 40 else ''}"
            )
