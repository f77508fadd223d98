"""Adapter banks: many adapters of one kind on one frozen base, chosen row by row, swapped without recompiling.

A bank holds ``slots`` adapters of one kind (LoRA and its linear variants,
IA3, or a bottleneck adapter) stacked on a slot axis, at every layer the
method targets. Each row of a batch names its slot in ``adapter_ids``, an
integer array passed at apply time as data (``-1``: the base model alone), so
one compiled function serves any assignment of rows to adapters, for
inference and for training::

    adapted = adapted.add_adapter("tasks", AdapterBankConfig(LoraConfig(r=8), slots=8))
    logits = adapted.apply(variables, tokens, adapter_ids=jnp.array([0, 3, -1, 3]))

How a row meets its adapter: the bank gathers each row's slot weights
(``jnp.take`` along the slot axis) and runs the adapter with them under
``jax.vmap`` over rows, so a LoRA layer is two batched matmuls
``(B, T, in) x (B, in, r)`` and ``(B, T, r) x (B, r, out)``, the same
flops as one LoRA on the whole batch: no Python loop over adapters and no
adapter run on rows that did not ask for it. This gathered form (Punica's
BGMV) was chosen over sorting rows into per-adapter segments for
``jax.lax.ragged_dot`` by measurement (``benchmarks/multi_adapter.py``
times both on the same batch); on XLA:CPU ragged_dot was the slower.

Weights are jit arguments and everything per slot is data: a per-slot,
per-layer ``gain`` (LoRA's ``alpha / r``; 1 for an occupied IA3 or
bottleneck slot, 0 for an empty one) lives under the bank's ``__data__``
key, which training never updates. Loading an adapter into a slot
(:func:`hotswap_adapter`) or emptying it (:func:`clear_slot`) writes arrays
of the same shapes on the host, so nothing is compiled again; a smaller
rank (or bottleneck width) is zero-padded to the bank's, which changes no
output (the padded rows and columns multiply zeros).

Rows choose slots ``0 <= id < slots`` or ``-1``. An id out of that range
is an error when the ids are concrete; inside ``jit`` such rows come out as
NaN rather than silently as some adapter.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jadapters.adapters.bottleneck import Bottleneck
from jadapters.adapters.ia3 import IA3
from jadapters.adapters.lora import LoRA
from jadapters.blocks import InResidualBlock
from jadapters.checks import check_positive_int
from jadapters.configs import MethodConfig, Placed, register_method
from jadapters.errors import AdapterError
from jadapters.layers import CONV
from jadapters.registry import register_adapter
from jadapters.strategies import Strategy
from jadapters.tree import ADAPTERS_KEY, DATA_KEY, _flat, _unflat, adapter_locations, split_adapters

#: The bank's per-slot params, stacked on the slot axis.
SLOTS_KEY = "slots"
GAIN = "gain"

_LORA, _IA3, _BOTTLENECK = "lora", "ia3", "bottleneck"


def _kind(adapter: nn.Module) -> str:
    if isinstance(adapter, LoRA):
        return _LORA
    if isinstance(adapter, IA3):
        return _IA3
    if isinstance(adapter, Bottleneck):
        return _BOTTLENECK
    raise ValueError(
        f"an adapter bank holds LoRA, IA3 or Bottleneck adapters, got {type(adapter).__name__}"
    )


def check_bankable(adapter: nn.Module) -> None:
    """Raises ``ValueError`` unless ``adapter`` can live in a bank (its output is linear in a per-row gain).

    Example:
        >>> from jadapters import LoRA
        >>> check_bankable(LoRA(rank=4, use_dora=True))
        Traceback (most recent call last):
        ...
        ValueError: a bank cannot hold DoRA (use_dora=True): its magnitude rescales the layer's whole output, so a row without it is not the base; use plain LoRA
    """
    kind = _kind(adapter)
    if kind == _LORA:
        if adapter.use_dora:
            raise ValueError("a bank cannot hold DoRA (use_dora=True): its magnitude rescales the layer's whole "
                             "output, so a row without it is not the base; use plain LoRA")
        if adapter.bias != "none":
            raise ValueError(f"a bank cannot hold LoRA with bias={adapter.bias!r}: it replaces the base layer's "
                             f"bias for every row")
        if adapter.rewrites_base:
            raise ValueError(f"a bank cannot hold LoRA with init_weights={adapter.init_weights!r}: it rewrites the "
                             f"base weights that every row shares")
        if adapter.rank_pattern or adapter.alpha_pattern:
            raise ValueError("a bank has one rank at every layer: drop rank_pattern / alpha_pattern (adapters "
                             "loaded into it may have them; their ranks are padded and their scalings kept)")
    if kind == _BOTTLENECK:
        if adapter.phm_layer:
            raise ValueError("a bank cannot hold Compacter (phm_layer=True) adapters: their rule is shared "
                             "between placements")
        if adapter.ln_after:
            raise ValueError("a bank cannot hold a bottleneck with ln_after=True: its LayerNorm makes the "
                             "adapter's output non-zero for rows that have none")


def check_bank_strategy(strategy: Strategy) -> None:
    """Raises ``ValueError`` unless a row whose adapter contributes zero gets exactly the base's value.

    For bottlenecks in a residual block that holds when the adapter's residual is
    the sub-layer's output and the block's LayerNorm runs after it (AdapterHub's
    ``seq_bn``, ``double_seq_bn`` and ``par_bn`` presets).
    """
    if isinstance(strategy, InResidualBlock) and not (
        strategy.original_ln_after and (strategy.is_parallel or strategy.residual_before_ln is True)
    ):
        raise ValueError(
            "a bank of bottlenecks needs residual_before_ln=True (or is_parallel=True) and original_ln_after=True: "
            "otherwise a row without an adapter does not compute the base model's block"
        )


@register_adapter
class AdapterBank(nn.Module):
    """``slots`` adapters like ``adapter`` stacked on a slot axis; each row runs the one its id names.

    Joined by the adapter's own strategy (``ParallelAdd`` for LoRA,
    ``IA3Scale``, ``InResidualBlock``). Rows with id ``-1`` get exactly the
    base model's values. LoRA runs with scaling 1 and each slot's ``alpha / r``
    is its gain (data); the bank's own ``alpha / r`` is every slot's gain at
    initialisation, so a fresh bank trains ``slots`` ordinary adapters.

    Example:
        >>> import jax, jax.numpy as jnp, flax.linen as nn
        >>> import jadapters
        >>> x = jnp.ones((3, 4))
        >>> params = nn.Dense(4).init(jax.random.key(0), x)
        >>> bank = AdapterBank(jadapters.LoRA(rank=2, init_weights="random"), slots=2)
        >>> adapted = jadapters.with_adapters(nn.Dense(4), {"d": ""}).add_adapter("tasks", bank)
        >>> variables = jadapters.init_adapters(adapted, params, jax.random.key(1), x)
        >>> out = adapted.apply(variables, x, adapter_ids=jnp.array([0, 1, -1]))
        >>> bool((out[2] == nn.Dense(4).apply(params, x)[2]).all()), bool((out[0] != out[1]).any())
        (True, True)
    """

    adapter: nn.Module
    slots: int = 8

    def __post_init__(self) -> None:
        check_positive_int("slots", self.slots)
        if not isinstance(self.adapter, nn.Module):
            raise ValueError(f"AdapterBank holds an adapter module (LoRA, IA3, Bottleneck), got {self.adapter!r}")
        check_bankable(self.adapter)
        super().__post_init__()

    @nn.nowrap
    def default_strategy(self) -> Strategy:
        return self.adapter.default_strategy()

    @property
    def kind(self) -> str:
        """``'lora'``, ``'ia3'`` or ``'bottleneck'``."""
        return _kind(self.adapter)

    @nn.nowrap
    def initial_gain(self) -> float:
        """Every slot's gain at initialisation: LoRA's ``alpha / r`` (or rsLoRA's), else 1."""
        if self.kind == _LORA:
            return self.adapter.scaling_for(self.adapter.rank, self.adapter.alpha)
        return 1.0

    @nn.nowrap
    def slot_adapter(self) -> nn.Module:
        """The per-slot adapter as the bank runs it (LoRA with scaling 1: the gain scales it)."""
        inner = self.adapter.clone(parent=None, name=None)
        if self.kind == _LORA:
            inner = inner.clone(alpha=float(inner.rank), use_rslora=False)
        return inner

    @nn.compact
    def __call__(self, *args: Any, adapter_ids: jax.Array | None = None, layer: Any = None,
                 deterministic: bool = True) -> jax.Array:
        creating = self.is_mutable_collection("params") and not self.variables.get("params")
        inner = self.slot_adapter()
        kind = self.kind
        if kind == _IA3:
            (features,) = args
            sample, call_args, call_kwargs = (), (features,), {}
        else:
            sample = args[0]
            if kind == _LORA and layer is not None and layer.kind == CONV and layer.module.feature_group_count != 1:
                raise AdapterError(f"an adapter bank at {layer.path!r}: LoRA on a grouped Conv cannot be padded "
                                   f"to a common rank; use a bank on ungrouped layers")
            call_args = (sample[:1],) if kind == _LORA else (sample[:1], None)
            call_kwargs = {"layer": layer} if kind == _LORA else {}
        slots = self.param(SLOTS_KEY, lambda key: jax.vmap(
            lambda k: inner.init(k, *call_args, **call_kwargs)["params"])(jax.random.split(key, self.slots)))
        gain = self.param(DATA_KEY, lambda _: {GAIN: jnp.full((self.slots,), self.initial_gain(), jnp.float32)})[GAIN]
        gain = jax.lax.stop_gradient(gain)
        rows = None if kind == _IA3 else sample.shape[0]
        ids = _row_ids(adapter_ids, rows, creating, self.slots, self.scope.path)
        chosen = jnp.clip(ids, 0, self.slots - 1)
        # -1 rows: factor 0 (the base); out-of-range ids: NaN, never another adapter's output.
        factor = jnp.where(ids < 0, 0.0, jnp.where(ids >= self.slots, jnp.nan, jnp.take(gain, chosen)))
        row_params = jax.tree_util.tree_map(lambda p: jnp.take(p, chosen, axis=0), slots)
        if kind == _IA3:
            if adapter_ids is None:  # creating: no rows to scale differently
                return jnp.ones_like(slots["ia3_l"][0])
            vectors = row_params["ia3_l"]
            valid = (factor != 0)[:, None]
            return jnp.where(jnp.isnan(factor)[:, None], jnp.nan, jnp.where(valid, vectors, 1.0).astype(vectors.dtype))
        random = self.adapter.dropout > 0.0 or getattr(self.adapter, "stochastic_depth", 0.0) > 0.0
        streams = {}
        if random and not deterministic:  # each row draws its own masks
            streams = {"dropout": jax.random.split(self.make_rng("dropout"), sample.shape[0])}

        def one_row(p, x, rng):
            rngs = {"dropout": rng} if rng is not None else {}
            extra = {"layer": layer} if kind == _LORA else {}
            if kind == _BOTTLENECK:
                return inner.apply({"params": p}, x[None], None, deterministic=deterministic, rngs=rngs)[0]
            return inner.apply({"params": p}, x[None], deterministic=deterministic, rngs=rngs, **extra)[0]

        out = jax.vmap(one_row)(row_params, sample, streams.get("dropout"))
        out = out * factor.reshape((-1,) + (1,) * (out.ndim - 1)).astype(out.dtype)
        if kind == _BOTTLENECK and len(args) > 1 and args[1] is not None:
            out = out + args[1]
        return out


def _row_ids(adapter_ids: Any, rows: int | None, creating: bool, slots: int, path: Sequence[str]) -> jax.Array:
    where = "/".join(str(p) for p in path)
    if adapter_ids is None:
        if creating:
            return jnp.full((rows or 1,), -1, jnp.int32)
        raise AdapterError(
            f"the adapter bank at {where!r} needs adapter_ids=: one slot id per row (-1: the base alone), "
            f"e.g. adapted.apply(variables, x, adapter_ids=jnp.array([0, 2, -1]))"
        )
    ids = jnp.asarray(adapter_ids)
    if ids.ndim != 1 or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise AdapterError(f"adapter_ids must be a 1-D integer array (one id per row), got shape {ids.shape} "
                           f"dtype {ids.dtype}")
    if rows is not None and ids.shape[0] != rows:
        raise AdapterError(
            f"the adapter bank at {where!r}: adapter_ids has {ids.shape[0]} entries but the layer's input has "
            f"{rows} rows (axis 0)"
        )
    return ids


def check_adapter_ids(adapter_ids: Any, slots: int) -> None:
    """Raises :class:`AdapterError` if concrete ``adapter_ids`` hold an id outside ``[-1, slots)``.

    Example:
        >>> check_adapter_ids(np.array([0, 3, -1]), slots=3)
        Traceback (most recent call last):
        ...
        jadapters.errors.AdapterError: adapter_ids must be in [-1, 3) (-1: the base alone), got [3] at rows [1]
    """
    if isinstance(adapter_ids, jax.core.Tracer):
        return
    ids = np.asarray(adapter_ids)
    bad = np.nonzero((ids < -1) | (ids >= slots))[0]
    if bad.size:
        raise AdapterError(f"adapter_ids must be in [-1, {slots}) (-1: the base alone), got "
                           f"{ids[bad].tolist()[:8]} at rows {bad.tolist()[:8]}")


@register_method("bank")
@dataclasses.dataclass(frozen=True)
class AdapterBankConfig(MethodConfig):
    """A bank of ``slots`` adapters of the method ``config``, placed where that method goes.

    Example:
        >>> from jadapters import LoraConfig
        >>> AdapterBankConfig(LoraConfig(r=4), slots=16).slots
        16
    """

    method: ClassVar[str] = "bank"
    config: Any = None
    slots: int = 8

    def __post_init__(self) -> None:
        check_positive_int("slots", self.slots)

    def place(self, placement: Any, where: tuple[str, ...] | None = None) -> Placed:
        from jadapters.configs import as_config

        if self.config is None:
            raise AdapterError("AdapterBankConfig needs config=, the method of its slots (e.g. LoraConfig(r=8))")
        placed = as_config(self.config).place(placement, where)
        check_bank_strategy(placed.strategy)
        return Placed(placed.modules, placed.targets, AdapterBank(placed.adapter, self.slots), placed.strategy)


# ---------------------------------------------------------------------------------------------- slots


def bank_spec(adapted: Any, bank: str) -> Any:
    """The spec of the bank adapter ``bank``; a clear error if it is no bank."""
    spec = adapted.get_adapter(bank)
    if not isinstance(spec.adapter, AdapterBank):
        raise AdapterError(f"adapter {bank!r} is a {type(spec.adapter).__name__}, not an AdapterBank")
    return spec


def _bank_nodes(variables: Mapping[str, Any], bank: str) -> dict[str, dict]:
    """Module path -> the bank's params node there."""
    nodes: dict[str, dict] = {}
    for path in adapter_locations({"params": variables.get("params", {})}).get(bank, []):
        node = variables["params"]
        for key in (path.split("/") if path else []) + [ADAPTERS_KEY, bank]:
            node = node[key]
        nodes[path] = node
    if not nodes:
        raise AdapterError(f"the variables hold no params of the bank {bank!r}: initialise it with init_adapters")
    return nodes


def _check_slot(spec: Any, slot: int) -> None:
    if isinstance(slot, bool) or not isinstance(slot, (int, np.integer)) or not 0 <= slot < spec.adapter.slots:
        raise AdapterError(f"bank {spec.name!r} has slots 0..{spec.adapter.slots - 1}, got slot {slot!r}")


def _with_nodes(variables: Mapping[str, Any], bank: str, nodes: Mapping[str, Mapping]) -> dict:
    flat = _flat(variables)
    for path, node in nodes.items():
        prefix = ("params",) + tuple(path.split("/") if path else ()) + (ADAPTERS_KEY, bank)
        for keys, leaf in _flat(node).items():
            flat[prefix + keys] = leaf
    return _unflat(flat)


def _set_slot(leaf: Any, slot: int, value: np.ndarray | float, stacked: tuple[int, ...]) -> jax.Array:
    """``leaf`` (``stacked + (slots,) + shape``) with slot ``slot`` replaced, on the host: nothing compiles."""
    host = np.array(leaf)
    host[(slice(None),) * len(stacked) + (slot,)] = value
    sharding = getattr(leaf, "sharding", None)
    return jax.device_put(host, sharding) if sharding is not None else jnp.asarray(host)


def clear_slot(adapted: Any, variables: Mapping[str, Any], bank: str, slot: int) -> dict:
    """``variables`` with slot ``slot`` of ``bank`` emptied: zero weights and gain, so its rows compute the base.

    Nothing is compiled; the arrays keep their shapes (and shardings).

    Example:
        >>> import jax, jax.numpy as jnp, flax.linen as nn
        >>> import jadapters
        >>> x = jnp.ones((2, 4))
        >>> params = nn.Dense(4).init(jax.random.key(0), x)
        >>> bank = AdapterBank(jadapters.LoRA(rank=2, init_weights="random"), slots=2)
        >>> adapted = jadapters.with_adapters(nn.Dense(4), {"d": ""}).add_adapter("tasks", bank)
        >>> variables = clear_slot(adapted, jadapters.init_adapters(adapted, params, jax.random.key(1), x), "tasks", 0)
        >>> out = adapted.apply(variables, x, adapter_ids=jnp.array([0, 0]))
        >>> bool((out == nn.Dense(4).apply(params, x)).all())
        True
    """
    spec = bank_spec(adapted, bank)
    _check_slot(spec, slot)
    new_nodes = {path: _emptied(node, slot, spec.adapter.kind) for path, node in _bank_nodes(variables, bank).items()}
    return _with_nodes(variables, bank, new_nodes)


def _emptied(node: Mapping[str, Any], slot: int, kind: str) -> dict:
    """A bank's node at one layer with ``slot`` empty: identity weights (IA3's ones, else zeros), gain 0."""
    stacked = tuple(node[DATA_KEY][GAIN].shape[:-1])
    fill = 1.0 if kind == _IA3 else 0.0
    slots = jax.tree_util.tree_map(lambda leaf: _set_slot(leaf, slot, fill, stacked), node[SLOTS_KEY])
    return {SLOTS_KEY: slots, DATA_KEY: {GAIN: _set_slot(node[DATA_KEY][GAIN], slot, 0.0, stacked)}}


def _compatible(bank_adapter: nn.Module, source: nn.Module) -> None:
    kind = _kind(bank_adapter)
    if _kind(source) != kind:
        raise AdapterError(f"a {type(source).__name__} cannot go into a bank of {type(bank_adapter).__name__}")
    try:
        check_bankable(source.clone(rank_pattern=(), alpha_pattern=()) if kind == _LORA else source)
    except ValueError as e:
        raise AdapterError(str(e)) from None
    if kind == _BOTTLENECK:
        free = {"reduction_factor", "init_weights", "dropout", "stochastic_depth", "name", "parent"}
        differ = [f.name for f in dataclasses.fields(source) if f.name not in free
                  and getattr(source, f.name) != getattr(bank_adapter, f.name)]
        if differ:
            raise AdapterError(f"the bottleneck differs from the bank's in {differ}; only its width may differ")


def hotswap_adapter(
    adapted: Any,
    variables: Mapping[str, Any],
    bank: str,
    slot: int,
    source: Any,
    source_variables: Mapping[str, Any] | None = None,
    name: str | None = None,
) -> dict:
    """``variables`` with adapter ``name`` of ``source`` loaded into slot ``slot`` of ``bank``: no recompilation.

    ``source`` is an adapted model holding the adapter (with ``source_variables``),
    or the path of an adapter checkpoint (:func:`jadapters.save_adapters`), loaded
    onto this model's base. ``name`` may be left out when the source holds one
    adapter. The adapter must be of the bank's kind and sit on a subset of the
    bank's layers (the slot is empty on the others); a smaller rank or width is
    zero-padded to the bank's (exact), and LoRA's ``alpha / r`` (per layer, with
    rank/alpha patterns) becomes the slot's gain there. The arrays keep their
    shapes, dtypes and shardings, so a function compiled for the bank runs on
    without compiling again.

    Example:
        >>> import jax, jax.numpy as jnp, flax.linen as nn
        >>> import jadapters
        >>> x = jnp.ones((2, 4))
        >>> params = nn.Dense(4).init(jax.random.key(0), x)
        >>> base = jadapters.with_adapters(nn.Dense(4), {"d": ""})
        >>> single = base.add_adapter("a", jadapters.LoRA(rank=1, alpha=3.0, init_weights="random"))
        >>> single_vars = jadapters.init_adapters(single, params, jax.random.key(1), x)
        >>> banked = base.add_adapter("tasks", AdapterBank(jadapters.LoRA(rank=4), slots=3))
        >>> variables = jadapters.init_adapters(banked, params, jax.random.key(2), x)
        >>> variables = hotswap_adapter(banked, variables, "tasks", 2, single, single_vars)
        >>> out = banked.apply(variables, x, adapter_ids=jnp.array([2, -1]))
        >>> bool(jnp.allclose(out[0], single.apply(single_vars, x)[0], atol=1e-6))
        True
    """
    spec = bank_spec(adapted, bank)
    _check_slot(spec, slot)
    if not isinstance(source, nn.Module):
        from jadapters.checkpoint import load_adapters

        source, source_variables = load_adapters(source, adapted.model, split_adapters(variables)[1])
    if source_variables is None:
        raise AdapterError("hotswap_adapter: give source_variables with an adapted source model")
    names = source.adapter_names()
    if name is None:
        if len(names) != 1:
            raise AdapterError(f"hotswap_adapter: the source holds adapters {names}; say which with name=")
        name = names[0]
    source_spec = source.get_adapter(name)
    _compatible(spec.adapter.adapter, source_spec.adapter)
    if source_spec.strategy != spec.strategy:
        raise AdapterError(f"adapter {name!r} joins with {source_spec.strategy!r}, the bank {bank!r} with "
                           f"{spec.strategy!r}")
    source_nodes = _bank_nodes(source_variables, name)
    bank_nodes = _bank_nodes(variables, bank)
    stray = sorted(set(source_nodes) - set(bank_nodes))
    if stray:
        raise AdapterError(f"adapter {name!r} sits at {stray}, where the bank {bank!r} is not (it is at "
                           f"{sorted(bank_nodes)[:8]})")
    new_nodes = {}
    for path, node in bank_nodes.items():
        if path not in source_nodes:
            new_nodes[path] = _emptied(node, slot, spec.adapter.kind)
            continue
        stacked = tuple(node[DATA_KEY][GAIN].shape[:-1])
        given = _flat(source_nodes[path])
        wanted = _flat(node[SLOTS_KEY])
        extra = sorted("/".join(k) for k in given if k not in wanted)
        if extra:
            raise AdapterError(f"adapter {name!r} at {path!r} has {extra}, which the bank {bank!r} does not hold")
        slots = {}
        for keys, leaf in wanted.items():
            slots[keys] = _set_slot(leaf, slot, _padded(given.get(keys), leaf, stacked, name, path, keys), stacked)
        gain = 1.0
        if spec.adapter.kind == _LORA:
            source_adapter = source_spec.adapter
            gain = source_adapter.scaling_for(*source_adapter.rank_and_alpha(path))
        new_nodes[path] = {SLOTS_KEY: _unflat(slots),
                           DATA_KEY: {GAIN: _set_slot(node[DATA_KEY][GAIN], slot, gain, stacked)}}
    return _with_nodes(variables, bank, new_nodes)


def _padded(given: Any, leaf: Any, stacked: tuple[int, ...], name: str, path: str, keys: tuple) -> np.ndarray:
    """The source array zero-padded to one slot of ``leaf``: shape ``stacked + leaf.shape[len(stacked) + 1:]``."""
    target = tuple(stacked) + tuple(leaf.shape[len(stacked) + 1:])
    if given is None:
        return np.zeros(target, leaf.dtype)
    value = np.asarray(given).astype(leaf.dtype)
    if value.ndim != len(target) or any(g > t for g, t in zip(value.shape, target)):
        raise AdapterError(
            f"adapter {name!r} at {path!r}: {'/'.join(keys)} has shape {value.shape}, which does not fit the "
            f"bank's {target} (only a rank or width up to the bank's is padded)"
        )
    return np.pad(value, [(0, t - g) for g, t in zip(value.shape, target)])


def bank_slot_axes(variables: Mapping[str, Any], bank: str, data_only: bool = False) -> dict[tuple[str, ...], int]:
    """Params path (keys under ``params``) -> slot axis, for every trainable leaf of ``bank``.

    ``data_only``: ``variables`` holds only the bank's data (its gains), as
    the frozen part of a training state does; the weights are matched by
    their path prefix.
    """
    axes = {}
    for path, node in _bank_nodes(variables, bank).items():
        axis = node[DATA_KEY][GAIN].ndim - 1
        prefix = tuple(path.split("/") if path else ()) + (ADAPTERS_KEY, bank, SLOTS_KEY)
        if data_only:
            axes[prefix] = axis
            continue
        for keys in _flat(node[SLOTS_KEY]):
            axes[prefix + keys] = axis
    return axes


def slots_present(adapter_ids: jax.Array, slots: int) -> jax.Array:
    """A ``(slots,)`` bool array: which slots at least one row names.

    Example:
        >>> slots_present(jnp.array([2, -1, 2, 0]), 4).tolist()
        [True, False, True, False]
    """
    ids = jnp.asarray(adapter_ids)
    hits = jax.nn.one_hot(jnp.where(ids < 0, slots, ids), slots + 1, dtype=jnp.int32)[:, :slots]
    return hits.sum(axis=0) > 0


def slotwise(tx: optax.GradientTransformation, slot_axes: Mapping[tuple[str, ...], int]
             ) -> optax.GradientTransformationExtraArgs:
    """``tx`` with its own state per slot on the leaves in ``slot_axes``; slots absent from a batch stay as they were.

    ``update(grads, state, params, present=...)`` takes the ``(slots,)`` mask
    of the slots in the batch (:func:`slots_present`). Each slot's optimizer
    state (Adam's moments and step count included) advances only on steps
    whose batch holds its rows, so training several adapters in mixed batches
    equals training each on its own rows. Leaves not in ``slot_axes`` get
    ``tx`` as usual. :func:`jadapters.make_train_step` uses it for banks.
    """
    axes = dict(slot_axes)

    def axis_of(keys: tuple[str, ...]) -> int | None:
        """The slot axis of the leaf at ``keys`` (under ``params``), matched by itself or its bank's prefix."""
        for end in range(len(keys), 0, -1):
            if keys[:end] in axes:
                return axes[keys[:end]]
        return None

    def split(tree):
        flat = _flat(tree)
        found = {k: axis_of(k[1:]) for k in flat}
        banked = {k: jnp.moveaxis(v, found[k], 0) for k, v in flat.items() if found[k] is not None}
        rest = {k: v for k, v in flat.items() if found[k] is None}
        return banked, rest

    def init(params):
        banked, rest = split(params)
        return (jax.vmap(tx.init)(banked) if banked else None, tx.init(_unflat(rest)) if rest else None)

    def update(updates, state, params=None, *, present=None, **extra):
        banked_g, rest_g = split(updates)
        banked_p, rest_p = split(params) if params is not None else ({}, {})
        banked_state, rest_state = state
        out = {}
        if rest_g:
            new, rest_state = tx.update(_unflat(rest_g), rest_state, _unflat(rest_p) if rest_p else None)
            out.update(_flat(new))
        if banked_g:
            new, new_state = jax.vmap(lambda g, s, p: tx.update(g, s, p))(banked_g, banked_state, banked_p or None)
            if present is not None:
                keep = lambda n, o: jnp.where(present.reshape((-1,) + (1,) * (n.ndim - 1)), n, o)
                new = jax.tree_util.tree_map(lambda n: keep(n, jnp.zeros_like(n)), new)
                new_state = jax.tree_util.tree_map(keep, new_state, banked_state)
            banked_state = new_state
            out.update({k: jnp.moveaxis(v, 0, axis_of(k[1:])) for k, v in new.items()})
        return _unflat(out), (banked_state, rest_state)

    return optax.GradientTransformationExtraArgs(init, update)
