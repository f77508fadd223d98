"""Folding adapters into the base weights, undoing it, and dropping adapters.

PEFT's ``merge_and_unload()``, ``unmerge_adapter()`` and ``unload()``, functional:

* :func:`merge_adapters` returns the base model (or the adapted model without
  the merged adapters) and variables whose layer weights hold ``W + delta``:
  its forward pass is the base model's, at the base model's cost.
* :func:`unmerge_adapters` subtracts (or divides) the adapters out again.
* :func:`unload_adapters` drops adapters without merging them.

Nothing is changed in place: the variables passed in stay valid, so undoing a
merge is usually just keeping them; :func:`unmerge_adapters` is for when only
the merged weights were kept.

An adapter can merge when its class implements the merge protocol::

    merge_into(params, variables, layer, *, strategy, original) -> new params of the layer
    unmerge_from(params, variables, layer, *, strategy) -> restored params of the layer

``params`` are the layer's own params (``kernel``, ``bias``, ``embedding``)
with the adapters it follows already merged, ``original`` the same before any
merge (what the forward pass reads), ``variables`` the adapter's variables by
collection, ``layer`` the :class:`jadapters.layers.LayerInfo` of the layer and
``strategy`` the adapter's strategy (a merge holds only for the strategy it
assumes). LoRA (and DoRA, PiSSA, OLoRA), IA3 and VeRA implement it. A class
attribute ``merge_is_additive = True`` (or such a property) says that its
merge only adds to the weights, whatever was merged before.

To see each layer's kind and layout the model is traced once on sample inputs
(as :func:`jadapters.init_adapters` does; nothing is computed); the merge
itself runs layer by layer on the arrays, once per layer for the layers of an
``nn.scan`` (the stacked params are mapped over).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jadapters.context import AdapterContext
from jadapters.errors import AdapterError
from jadapters.layers import LayerInfo, describe_layer
from jadapters.strategies import Strategy
from jadapters.transform import AdaptedModule, AdapterSpec, _check_collections, _specs_at, split_static, with_leaves
from jadapters.tree import ADAPTERS_KEY, split_adapters

#: What the recording pass stores per (adapter, layer path): the layer, and the rank of each
#: of its own params as one layer sees them (the rest of an array's rank is scan stacking).
_Record = tuple[LayerInfo, dict]
_RECORDING: list[dict] = []


@dataclasses.dataclass(frozen=True)
class _Recording(Strategy):
    """Runs ``inner`` unchanged and records, at trace time, the layer it joins."""

    inner: Strategy = None

    @property
    def changes_shape(self):  # the inner strategy's
        return self.inner.changes_shape

    def around(self, adapter, call, ctx: AdapterContext) -> Any:
        values = []

        def observed(*args, **kwargs):
            values.append(call(*args, **kwargs))
            return values[-1]

        result = self.inner.around(adapter, observed, ctx)
        if values and _RECORDING:
            x = ctx.args[0] if ctx.args else None
            own = {k: jnp.ndim(v) for k, v in ctx.module.variables.get("params", {}).items() if not isinstance(v, Mapping)}
            _RECORDING[-1].setdefault((ctx.name, ctx.path), (describe_layer(ctx, x, values[-1]), own))
        return result


def _record_layers(adapted: AdaptedModule, names: Sequence[str], variables, inputs, kwargs) -> dict:
    """(adapter name, path) -> record, for the named adapters, from one abstract trace of the model."""
    specs = tuple(
        dataclasses.replace(s, strategy=_Recording(s.strategy), enabled=True) if s.name in names else s
        for s in adapted.adapters
    )
    recording = adapted.clone(adapters=specs, training=False)
    traced, rebuild = split_static((inputs, kwargs))

    def run(variables, traced):
        args, kw = rebuild(traced)
        return recording.apply(variables, *args, **kw)

    _RECORDING.append({})
    try:
        jax.eval_shape(run, variables, traced)
        return _RECORDING[-1]
    finally:
        _RECORDING.pop()


def _subtree(tree: Mapping[str, Any], keys: Sequence[str]) -> Any:
    for key in keys:
        if not isinstance(tree, Mapping) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _own(params: Mapping[str, Any], path: str) -> dict:
    node = _subtree(params, path.split("/") if path else [])
    return {k: v for k, v in (node or {}).items() if not isinstance(v, Mapping)}


def _adapter_variables(variables: Mapping[str, Any], path: str, name: str) -> dict:
    keys = (path.split("/") if path else []) + [ADAPTERS_KEY, name]
    found = {collection: _subtree(tree, keys) for collection, tree in variables.items()}
    return {collection: sub for collection, sub in found.items() if sub is not None}


def _mergeable(spec: AdapterSpec, what: str) -> None:
    method = "merge_into" if what == "merge" else "unmerge_from"
    if not callable(getattr(spec.adapter, method, None)):
        reason = getattr(type(spec.adapter), "cannot_merge_reason", None) or (
            "only adapters whose effect is a change of the layer's weights can be folded into them "
            f"(it has no {method})"
        )
        raise AdapterError(f"adapter {spec.name!r} ({type(spec.adapter).__name__}) cannot {what}: {reason}")


def _additive(adapter: nn.Module) -> bool:
    return bool(getattr(adapter, "merge_is_additive", False))


def _selected(adapted: AdaptedModule, name, what: str) -> list[AdapterSpec]:
    if not isinstance(adapted, AdaptedModule):
        raise AdapterError(f"{what} expects the AdaptedModule returned by with_adapters, got {type(adapted).__name__}")
    if name is None:
        specs = [s for s in adapted.adapters if s.enabled]
        if not specs:
            raise AdapterError(f"{what}: no enabled adapter to {what.split('_')[0]}; the model has {adapted.adapter_names()}")
        return specs
    chosen = adapted._resolve_names(name)
    return [s for s in adapted.adapters if s.name in chosen]


def _layers(adapted, specs, variables, inputs, kwargs, what: str) -> dict[str, list[tuple[AdapterSpec, _Record]]]:
    """Path -> [(spec, record)] in the order the adapters join the layer (insertion order)."""
    records = _record_layers(adapted, [s.name for s in specs], variables, inputs, kwargs)
    for spec in specs:
        if not any(n == spec.name for n, _ in records):
            raise AdapterError(f"{what}: adapter {spec.name!r} was not called on these inputs, so nothing can be merged")
    by_path: dict[str, list] = {}
    for (name, path), record in records.items():
        by_path.setdefault(path, []).append((next(s for s in specs if s.name == name), record))
    order = {s.name: i for i, s in enumerate(adapted.adapters)}
    for entries in by_path.values():
        entries.sort(key=lambda e: order[e[0].name])
    return by_path


def _check_neighbours(adapted: AdaptedModule, chosen: set[str], by_path) -> None:
    """Merging must not change what adapters left on the same layer compute."""
    for path in by_path:
        here = [s for s in _specs_at(adapted.adapters, path) if s.enabled or s.name in chosen]
        kept = [s for s in here if s.name not in chosen]
        merged = [s for s in here if s.name in chosen]
        if kept and merged and not all(_additive(s.adapter) for s in here):
            raise AdapterError(
                f"adapter {merged[0].name!r} at {path!r}: merging it while {[s.name for s in kept]} stay on the same "
                f"layer would change what they compute (only purely additive adapters, such as LoRA and VeRA, "
                f"commute); merge them together, or none of them"
            )


def _stacking(own: Mapping[str, Any], ranks: Mapping[str, int], layer: LayerInfo, path: str) -> int:
    name = layer.weight_name()
    if name not in own or name not in ranks:
        raise AdapterError(f"the layer at {path!r} has no {name!r} parameter in the variables given")
    return jnp.ndim(own[name]) - ranks[name]


def _mapped(fn, depth: int):
    for _ in range(depth):
        fn = jax.vmap(fn)
    return fn


def _finite(tree: Any) -> bool:
    return all(bool(jnp.isfinite(leaf).all()) for leaf in jax.tree_util.tree_leaves(tree))


def merge_adapters(
    adapted: AdaptedModule,
    variables: Mapping[str, Any],
    *inputs: Any,
    name: str | Sequence[str] | None = None,
    safe_merge: bool = False,
    **kwargs: Any,
) -> tuple[nn.Module, dict]:
    """Folds adapters into the layers' weights: PEFT's ``merge_and_unload``.

    Args:
        adapted: the adapted model.
        variables: its variables (base and adapters).
        *inputs: sample inputs (and ``**kwargs``), as for :func:`jadapters.init_adapters`:
            the model is traced once, nothing is computed.
        name: the adapter(s) to merge (names, or ``'module:name'``); None: every enabled one.
        safe_merge: check that every merged weight is finite before returning, and raise
            naming the first adapter that makes one non-finite (PEFT's ``safe_merge``).

    Returns:
        ``(model, variables)``: the wrapped base model when no adapter is left, else the
        adapted model without the merged ones; and variables whose layers hold the merged
        weights, without the merged adapters' variables. The variables passed in are unchanged.

    Raises:
        AdapterError: naming the adapter, for an adapter that cannot be merged (a bottleneck
            with a nonlinearity, a LoRA on a grouped Conv, ...), for a merge that would change
            what an adapter left on the same layer computes, and with ``safe_merge`` for a
            non-finite result; always before anything is returned.

    Example:
        >>> import jax, jax.numpy as jnp, flax.linen as nn
        >>> from jadapters import LoRA, with_adapters, init_adapters
        >>> base, x = nn.Dense(3), jnp.ones((2, 3))
        >>> params = base.init(jax.random.key(0), x)
        >>> adapted = with_adapters(base, {"dense": ""}).add_adapter("lora", LoRA(rank=2, init_weights="random"))
        >>> variables = init_adapters(adapted, params, jax.random.key(1), x)
        >>> model, merged = merge_adapters(adapted, variables, x)
        >>> model is adapted.model, bool(jnp.allclose(model.apply(merged, x), adapted.apply(variables, x), atol=1e-6))
        (True, True)
    """
    _check_collections(variables, "merge_adapters")
    specs = _selected(adapted, name, "merge_adapters")
    for spec in specs:
        _mergeable(spec, "merge")
    chosen = {s.name for s in specs}
    by_path = _layers(adapted, specs, variables, inputs, kwargs, "merge_adapters")
    _check_neighbours(adapted, chosen, by_path)
    params = variables["params"]
    for path, entries in by_path.items():
        own = _own(variables["params"], path)
        depth = _stacking(own, entries[0][1][1], entries[0][1][0], path)
        adapter_vars = [_adapter_variables(variables, path, spec.name) for spec, _ in entries]

        def chain(own, adapter_vars, entries=entries, path=path):
            steps, current = [], dict(own)
            for (spec, (layer, _)), av in zip(entries, adapter_vars):
                try:
                    current = spec.adapter.merge_into(current, av, layer, strategy=spec.strategy, original=own)
                except AdapterError as e:
                    raise AdapterError(f"adapter {spec.name!r} at {path!r}: {e}") from None
                steps.append(current)
            return steps

        steps = _mapped(chain, depth)(own, adapter_vars)
        if safe_merge:
            for (spec, _), step in zip(entries, steps):
                if not _finite(step):
                    raise AdapterError(
                        f"adapter {spec.name!r} at {path!r}: merging it gives non-finite weights (NaN or inf); "
                        f"the adapter seems to be broken, nothing was merged"
                    )
        params = with_leaves(params, path.split("/") if path else [], steps[-1])
    _, rest = split_adapters({**variables, "params": params}, chosen)
    kept = [s.name for s in adapted.adapters if s.name not in chosen]
    model = adapted.remove_adapter(sorted(chosen)) if kept else adapted.model
    return model, rest


def unmerge_adapters(
    adapted: AdaptedModule,
    variables: Mapping[str, Any],
    *inputs: Any,
    name: str | Sequence[str] | None = None,
    **kwargs: Any,
) -> dict:
    """Takes merged adapters out of the weights again: PEFT's ``unmerge_adapter``.

    ``adapted`` is the model with the adapters (as before :func:`merge_adapters`),
    ``variables`` the merged base variables plus those adapters' variables.
    Returns variables that ``adapted`` computes as before the merge: each weight
    restored to float rounding (``W + d - d``, ``(W * l) / l``: within a few
    float32 ulps of ``|W| + |d|``). DoRA, ``bias='lora_only'`` and a zero IA3
    scale lost information in the merge: those raise, naming the adapter.

    Example:
        >>> import jax, jax.numpy as jnp, flax.linen as nn
        >>> from jadapters import LoRA, with_adapters, init_adapters, split_adapters, merge_trees
        >>> base, x = nn.Dense(3), jnp.ones((2, 3))
        >>> params = base.init(jax.random.key(0), x)
        >>> adapted = with_adapters(base, {"dense": ""}).add_adapter("lora", LoRA(rank=2, init_weights="random"))
        >>> variables = init_adapters(adapted, params, jax.random.key(1), x)
        >>> _, merged = merge_adapters(adapted, variables, x)
        >>> restored = unmerge_adapters(adapted, merge_trees(merged, split_adapters(variables)[0]), x)
        >>> bool(jnp.allclose(restored["params"]["kernel"], params["params"]["kernel"], atol=1e-6))
        True
    """
    _check_collections(variables, "unmerge_adapters")
    specs = _selected(adapted, name, "unmerge_adapters")
    for spec in specs:
        _mergeable(spec, "unmerge")
    by_path = _layers(adapted, specs, variables, inputs, kwargs, "unmerge_adapters")
    params = variables["params"]
    for path, entries in by_path.items():
        own = _own(variables["params"], path)
        depth = _stacking(own, entries[0][1][1], entries[0][1][0], path)
        adapter_vars = [_adapter_variables(variables, path, spec.name) for spec, _ in entries]

        def chain(own, adapter_vars, entries=entries, path=path):
            current = dict(own)
            for (spec, (layer, _)), av in reversed(list(zip(entries, adapter_vars))):
                try:
                    current = spec.adapter.unmerge_from(current, av, layer, strategy=spec.strategy)
                except AdapterError as e:
                    raise AdapterError(f"adapter {spec.name!r} at {path!r}: {e}") from None
            return current

        params = with_leaves(params, path.split("/") if path else [], _mapped(chain, depth)(own, adapter_vars))
    return {**variables, "params": params}


def unload_adapters(
    adapted: AdaptedModule, variables: Mapping[str, Any], name: str | Sequence[str] | None = None
) -> tuple[nn.Module, dict]:
    """Drops adapters without merging them: PEFT's ``unload``.

    ``name`` None drops all of them. Returns ``(model, variables)`` as
    :func:`merge_adapters` does: the wrapped base model when none is left. A
    PiSSA/OLoRA adapter leaves its residual weights behind, as in PEFT.

    Example:
        >>> import flax.linen as nn
        >>> from jadapters import LoRA, with_adapters
        >>> adapted = with_adapters(nn.Dense(3), {"dense": ""}).add_adapter("lora", LoRA(rank=2))
        >>> variables = {"params": {"kernel": 1, "bias": 2, "__adapters__": {"lora": {"w": 3}}}}
        >>> model, rest = unload_adapters(adapted, variables)
        >>> type(model).__name__, rest
        ('Dense', {'params': {'kernel': 1, 'bias': 2}})
    """
    if not isinstance(adapted, AdaptedModule):
        raise AdapterError(f"unload_adapters expects the AdaptedModule returned by with_adapters, got {type(adapted).__name__}")
    names = adapted.adapter_names() if name is None else sorted(adapted._resolve_names(name))
    _, rest = split_adapters(variables, names)
    kept = [n for n in adapted.adapter_names() if n not in names]
    return (adapted.remove_adapter(names) if kept else adapted.model), rest
