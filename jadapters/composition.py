"""AdapterHub's composition blocks: how several adapters at one module combine.

``adapted.set_active(setup)`` makes ``setup`` the *active setup*: at every
module where its adapters sit, they run as the blocks say instead of being
chained in insertion order. A setup is a plain adapter name or a block:

* :class:`Stack` ``(a, b)``: ``b`` reads ``a``'s output;
* :class:`Parallel` ``(a, b)``: the batch is replicated N times; child ``i``
  owns rows ``[i*B, (i+1)*B)``; the output has ``N*B`` rows;
* :class:`BatchSplit` ``(a, b, batch_sizes=[2, 1])``: consecutive row groups;
* :class:`Split` ``(a, b, splits=[4, 3])``: consecutive sequence segments
  (axis 1), outputs concatenated;
* :class:`Average` ``(a, b, weights=[2, 1])``: ``sum_i w_i h_i``, the weights
  divided by their sum unless ``normalize_weights=False`` (AdapterHub 1.3
  also divides by N; jadapters does not);
* :class:`Fuse` ``(a, b)``: AdapterFusion, attention over the adapters'
  outputs with its own params (:class:`FusionConfig`).

Blocks are frozen, hashable dataclasses, so a setup is static like the
enabled mask: a jitted function never replays a trace made for another setup.
Nesting follows AdapterHub: ``Stack`` holds names, Fuse, Split, Parallel,
BatchSplit, Average; ``Fuse`` names or Stack; ``Split`` names, Split, Stack,
BatchSplit, Average; ``Parallel`` names, Stack, BatchSplit, Average;
``BatchSplit`` names, Stack, Split, BatchSplit, Average; ``Average`` names,
Stack, Split, BatchSplit; below the first level only Stack or names.

Where the blocks act:

* bottleneck adapters inside a residual block (:class:`jadapters.InResidualBlock`,
  AdapterHub's ``pre_forward`` / ``post_forward``): all six blocks;
* adapters joined by :class:`jadapters.ParallelAdd` (LoRA): Stack (each
  adapter reads the previous one's delta, as AdapterHub's LoRA does; the
  layer needs as many inputs as outputs), Parallel, BatchSplit, Average.

``Parallel`` without touching the model's code: the adapted call replicates,
N times along axis 0, every array argument whose leading axis is the batch
(that of the first array argument). The base computes the same rows for
every copy up to the first adapted layer, so this equals AdapterHub's
replication at the first parallel layer.

While a setup is active only the adapters it names run (AdapterHub's
``set_active_adapters``); they must be enabled (``enabled`` still chooses what
trains). A block child whose adapters do not sit at a module passes its share
through there (AdapterHub's rule). An adapter reached through Stacks alone
runs with its own strategy wherever it is the only one of the setup at a
module, so any method can be stacked (prefix tuning under a Parallel, say).

Fusion params live at ``<module>/__adapters__/<fusion name>/`` (``"a,b"`` for
``Fuse("a", "b")``, AdapterHub's name), created by
:func:`jadapters.init_adapters` while the setup is active. Its attention
probabilities are sown in the ``'intermediates'`` collection as
``<module>/__adapters__/<fusion name>/attention_scores``, shape (B, T, N)
(apply with ``mutable=['intermediates']``); its regularisation loss
``0.01 * sum((I - W_value)**2)`` is recorded in training mode.

Example:
    >>> import jadapters
    >>> setup = Stack("a", Fuse("b", "c"))
    >>> setup
    Stack('a', Fuse('b', 'c'))
    >>> sorted(setup.names()), setup.fusions()[0].name
    (['a', 'b', 'c'], 'b,c')
    >>> Parallel("a", Parallel("b", "c"))
    Traceback (most recent call last):
    ...
    jadapters.errors.AdapterError: cannot nest Parallel('b', 'c') in Parallel: it holds adapter names, Stack, BatchSplit, Average
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, NamedTuple, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jadapters.checks import check_dropout
from jadapters.errors import AdapterError
from jadapters.tree import ADAPTERS_KEY

Setup = Union[str, "Block"]


class Block:
    """Base of the composition blocks: ``children`` are adapter names or nested blocks."""

    children: tuple
    allowed: ClassVar[tuple[str, ...]] = ()

    def _set_children(self, children: Sequence[Any]) -> None:
        if not children:
            raise AdapterError(f"{type(self).__name__} needs at least one adapter name or block")
        for child in children:
            if not isinstance(child, (str, Block)) or child == "":
                raise AdapterError(f"{type(self).__name__}: children are adapter names or blocks, got {child!r}")
            if not _allowed(self, child):
                raise AdapterError(f"cannot nest {child!r} in {type(self).__name__}: it holds {_described(self)}")
        object.__setattr__(self, "children", tuple(children))
        validate(self)

    def __repr__(self) -> str:
        extra = "".join(f", {f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)
                        if f.name != "children" and getattr(self, f.name) != f.default)
        return f"{type(self).__name__}({', '.join(map(repr, self.children))}{extra})"

    def names(self) -> set[str]:
        """Every adapter name in the block, nested blocks included."""
        return set().union(*({c} if isinstance(c, str) else c.names() for c in self.children))

    def first(self) -> str:
        """The first adapter name, depth first (AdapterHub's ``first()``)."""
        child = self.children[0]
        return child if isinstance(child, str) else child.first()

    def last(self) -> str:
        """The last adapter name, depth first (AdapterHub's ``last()``)."""
        child = self.children[-1]
        return child if isinstance(child, str) else child.last()

    @property
    def parallel_channels(self) -> int:
        """How many copies of the batch the block needs (1 without a :class:`Parallel`)."""
        return max(c.parallel_channels if isinstance(c, Block) else 1 for c in self.children)

    def fusions(self) -> tuple["Fuse", ...]:
        """The :class:`Fuse` blocks inside, outermost first."""
        own = (self,) if isinstance(self, Fuse) else ()
        return own + tuple(f for c in self.children if isinstance(c, Block) for f in c.fusions())

    def to_json(self) -> dict:
        """A JSON description, read back by :func:`setup_from_json` (AdapterHub's ``to_dict`` layout)."""
        out: dict[str, Any] = {"type": type(self).__name__,
                               "children": [c.to_json() if isinstance(c, Block) else c for c in self.children]}
        kwargs = {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "children"}
        if kwargs:
            out["kwargs"] = kwargs
        return out


def _plain(value: Any) -> Any:
    if isinstance(value, FusionConfig):
        return dataclasses.asdict(value)
    return list(value) if isinstance(value, tuple) else value


def _allowed(parent: Block, child: Any) -> bool:
    return type(child).__name__ in parent.allowed if isinstance(child, Block) else "str" in parent.allowed


def _described(parent: Block) -> str:
    return ", ".join("adapter names" if a == "str" else a for a in parent.allowed)


def validate(setup: Setup, level: int = 0) -> None:
    """Raises :class:`AdapterError` if ``setup`` breaks AdapterHub's nesting rules.

    Example:
        >>> validate(Stack("a", BatchSplit("b", Average("c", "d"), batch_sizes=1)))
        Traceback (most recent call last):
        ...
        jadapters.errors.AdapterError: adapter setup too deep: Average('c', 'd') sits at level 2, where only Stack or adapter names may
    """
    if isinstance(setup, str):
        return
    if not isinstance(setup, Block):
        raise AdapterError(f"an adapter setup is an adapter name or a composition block, got {setup!r}")
    if level > 1 and not isinstance(setup, Stack):
        raise AdapterError(f"adapter setup too deep: {setup!r} sits at level {level}, where only Stack or "
                           f"adapter names may")
    for child in setup.children:
        validate(child, level + 1)


def _sizes(what: str, value: Any, n: int) -> tuple[int, ...]:
    sizes = (value,) * n if isinstance(value, int) and not isinstance(value, bool) else value
    try:
        sizes = tuple(sizes)
    except TypeError:
        raise AdapterError(f"{what} must be an int or a list of ints, got {value!r}") from None
    if len(sizes) != n or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0 for s in sizes):
        raise AdapterError(f"{what} must be {n} ints >= 0 (one per child), got {value!r}")
    return tuple(int(s) for s in sizes)


@dataclasses.dataclass(frozen=True, init=False, repr=False)
class Stack(Block):
    """Adapters in sequence: each reads the previous one's output.

    Example:
        >>> Stack("a", "b").children
        ('a', 'b')
    """

    children: tuple
    allowed: ClassVar[tuple[str, ...]] = ("str", "Fuse", "Split", "Parallel", "BatchSplit", "Average")

    def __init__(self, *children: Setup):
        self._set_children(children)


@dataclasses.dataclass(frozen=True, init=False, repr=False)
class Parallel(Block):
    """The same input through each child: the batch is replicated, child ``i`` owns the ``i``-th copy.

    Example:
        >>> Parallel("a", "b").parallel_channels
        2
    """

    children: tuple
    allowed: ClassVar[tuple[str, ...]] = ("str", "Stack", "BatchSplit", "Average")

    def __init__(self, *children: Setup):
        self._set_children(children)

    @property
    def parallel_channels(self) -> int:
        return len(self.children)


@dataclasses.dataclass(frozen=True, init=False, repr=False)
class BatchSplit(Block):
    """Consecutive row groups through different children; ``batch_sizes`` (an int is repeated) sum to the batch.

    Example:
        >>> BatchSplit("a", "b", batch_sizes=2).batch_sizes
        (2, 2)
    """

    children: tuple
    batch_sizes: tuple = ()
    allowed: ClassVar[tuple[str, ...]] = ("str", "Stack", "Split", "BatchSplit", "Average")

    def __init__(self, *children: Setup, batch_sizes: int | Sequence[int]):
        object.__setattr__(self, "batch_sizes", _sizes("BatchSplit: batch_sizes", batch_sizes, len(children)))
        self._set_children(children)


@dataclasses.dataclass(frozen=True, init=False, repr=False)
class Split(Block):
    """Consecutive sequence segments (axis 1) through different children; ``splits`` sum to the length.

    Example:
        >>> Split("a", "b", splits=[4, 3]).splits
        (4, 3)
    """

    children: tuple
    splits: tuple = ()
    allowed: ClassVar[tuple[str, ...]] = ("str", "Split", "Stack", "BatchSplit", "Average")

    def __init__(self, *children: Setup, splits: int | Sequence[int]):
        object.__setattr__(self, "splits", _sizes("Split: splits", splits, len(children)))
        self._set_children(children)


@dataclasses.dataclass(frozen=True, init=False, repr=False)
class Average(Block):
    """The same input through each child; the output is exactly ``sum_i w_i h_i``.

    ``weights`` default to ``1/N`` each; they are divided by their sum unless
    ``normalize_weights=False``. (AdapterHub 1.3 takes a further mean, an
    extra ``1/N``; jadapters does not.)

    Example:
        >>> Average("a", "b", weights=[2, 1]).effective_weights
        (0.6666666666666666, 0.3333333333333333)
    """

    children: tuple
    weights: tuple | None = None
    normalize_weights: bool = True
    allowed: ClassVar[tuple[str, ...]] = ("str", "Stack", "Split", "BatchSplit")

    def __init__(self, *children: Setup, weights: Sequence[float] | None = None, normalize_weights: bool = True):
        if weights is not None:
            weights = tuple(float(w) for w in weights)
            if len(weights) != len(children) or not all(np.isfinite(weights)):
                raise AdapterError(f"Average: weights must be {len(children)} finite numbers, got {weights!r}")
            if normalize_weights and sum(weights) == 0:
                raise AdapterError(f"Average: the weights {weights!r} sum to 0 and cannot be normalised")
        object.__setattr__(self, "weights", weights)
        object.__setattr__(self, "normalize_weights", bool(normalize_weights))
        self._set_children(children)

    @property
    def effective_weights(self) -> tuple[float, ...]:
        """The weights the outputs are summed with."""
        n = len(self.children)
        if self.weights is None:
            return (1.0 / n,) * n
        total = sum(self.weights) if self.normalize_weights else 1.0
        return tuple(w / total for w in self.weights)


@dataclasses.dataclass(frozen=True)
class FusionConfig:
    """AdapterFusion's options, AdapterHub's field names; :meth:`dynamic` (the default) and :meth:`static`.

    ``temperature`` (AdapterHub anneals T from 50 to 1 over training calls) is
    not supported; the others are as in AdapterHub's ``BertFusion``.
    ``dropout_prob`` (on the attention scores, in training) None means no
    dropout, where AdapterHub falls back to the model's
    ``attention_probs_dropout_prob``: set it to train as AdapterHub does.

    Example:
        >>> FusionConfig.static().value, FusionConfig.dynamic().value
        (False, True)
    """

    key: bool = True
    query: bool = True
    value: bool = True
    query_before_ln: bool = False
    regularization: bool = True
    residual_before: bool = False
    temperature: bool = False
    value_before_softmax: bool = True
    value_initialized: bool = True
    dropout_prob: float | None = None

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if f.name != "dropout_prob" and not isinstance(getattr(self, f.name), bool):
                raise AdapterError(f"FusionConfig: {f.name} must be True or False, got {getattr(self, f.name)!r}")
        if self.temperature:
            raise AdapterError("FusionConfig: temperature=True (AdapterHub's annealed softmax temperature) is not "
                               "supported; use temperature=False")
        if self.dropout_prob is not None:
            check_dropout(self.dropout_prob)

    @classmethod
    def dynamic(cls) -> "FusionConfig":
        """AdapterHub's ``"dynamic"``: query, key, value (identity-initialised), regularisation."""
        return cls()

    @classmethod
    def static(cls) -> "FusionConfig":
        """AdapterHub's ``"static"``: query and key, no value matrix, no regularisation."""
        return cls(value=False, regularization=False, value_initialized=False)

    @classmethod
    def load(cls, config: "FusionConfig | str | dict") -> "FusionConfig":
        """A config from itself, ``"dynamic"`` / ``"static"``, or AdapterHub's dict (unknown keys ignored)."""
        if isinstance(config, FusionConfig):
            return config
        if isinstance(config, str):
            presets = {"dynamic": cls.dynamic, "static": cls.static}
            if config not in presets:
                raise AdapterError(f"unknown fusion config {config!r}; use 'dynamic', 'static' or a FusionConfig")
            return presets[config]()
        if isinstance(config, dict):
            known = {f.name for f in dataclasses.fields(cls)}
            return cls(**{k: (bool(v) if k != "dropout_prob" else v) for k, v in config.items() if k in known})
        raise AdapterError(f"a fusion config is a FusionConfig, 'dynamic', 'static' or a dict, got {config!r}")


@dataclasses.dataclass(frozen=True, init=False, repr=False)
class Fuse(Block):
    """AdapterFusion over the children's outputs; ``name`` defaults to AdapterHub's ``"a,b"``.

    Example:
        >>> Fuse("a", Stack("b", "c")).name
        'a,c'
    """

    children: tuple
    config: FusionConfig = FusionConfig()
    fusion_name: str | None = None
    allowed: ClassVar[tuple[str, ...]] = ("str", "Stack")

    def __init__(self, *children: Setup, config: FusionConfig | str | dict = "dynamic", name: str | None = None):
        object.__setattr__(self, "config", FusionConfig.load(config))
        if name is not None and (not isinstance(name, str) or not name or "/" in name):
            raise AdapterError(f"Fuse: name must be a non-empty string without '/', got {name!r}")
        object.__setattr__(self, "fusion_name", None)
        self._set_children(children)
        if name is not None and name != self.name:
            object.__setattr__(self, "fusion_name", name)

    @property
    def name(self) -> str:
        """Where its params live, under ``__adapters__``."""
        return self.fusion_name or ",".join(c if isinstance(c, str) else c.last() for c in self.children)


_BLOCKS = {cls.__name__: cls for cls in (Stack, Parallel, BatchSplit, Split, Average, Fuse)}


def setup_from_json(data: Any) -> Setup | None:
    """The setup :meth:`Block.to_json` describes (None stays None).

    Example:
        >>> setup_from_json(Average("a", "b", weights=[2, 1]).to_json())
        Average('a', 'b', weights=(2.0, 1.0))
    """
    if data is None or isinstance(data, str):
        return data
    try:
        cls = _BLOCKS[data["type"]]
        children = [setup_from_json(c) for c in data["children"]]
        kwargs = dict(data.get("kwargs", {}))
    except (KeyError, TypeError):
        raise AdapterError(f"not a composition block's description: {data!r}") from None
    if cls is Fuse:
        kwargs["name"] = kwargs.pop("fusion_name", None)
    return cls(*children, **kwargs)


def only_stacked(setup: Setup, name: str) -> bool:
    """Whether every occurrence of adapter ``name`` in ``setup`` is reached through Stacks alone.

    Example:
        >>> only_stacked(Stack("p", Parallel("a", "b")), "p"), only_stacked(Stack("p", Parallel("a", "b")), "a")
        (True, False)
    """
    if isinstance(setup, str):
        return True
    if not isinstance(setup, Stack):
        return name not in setup.names()
    return all(only_stacked(c, name) for c in setup.children)


def as_setup(setup: Setup | None) -> Block | None:
    """``setup`` as a block: a plain name is ``Stack(name)`` (AdapterHub's parse), None stays None."""
    if setup is None or isinstance(setup, Block):
        return setup
    if isinstance(setup, str) and setup:
        return Stack(setup)
    raise AdapterError(f"an adapter setup is an adapter name, a composition block or None, got {setup!r}")


# ----------------------------------------------------------------------------- Parallel: the model's entry


def replicate_inputs(setup: Block | None, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """``(args, kwargs)`` with every batch-leading array repeated ``setup.parallel_channels`` times on axis 0.

    The batch is the leading axis of the first array argument; arrays with
    another leading size (or none) are left as they are.

    Example:
        >>> import jax.numpy as jnp
        >>> (x, flag), kw = replicate_inputs(Parallel("a", "b"), (jnp.ones((2, 3)), True), {"m": jnp.ones((2,))})
        >>> x.shape, flag, kw["m"].shape
        ((4, 3), True, (4,))
    """
    n = setup.parallel_channels if setup is not None else 1
    if n == 1:
        return args, kwargs
    leaves = [x for x in jax.tree_util.tree_leaves((args, kwargs)) if _is_array(x) and np.ndim(x) > 0]
    if not leaves:
        raise AdapterError(f"{setup!r} replicates the batch, but the call has no array argument")
    batch = np.shape(leaves[0])[0]

    def repeat(x: Any) -> Any:
        if _is_array(x) and np.ndim(x) > 0 and np.shape(x)[0] == batch:
            return jnp.concatenate([jnp.asarray(x)] * n, axis=0)
        return x

    return jax.tree_util.tree_map(repeat, (args, kwargs))


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray))


# ----------------------------------------------------------------------------- AdapterFusion


class Fusion(nn.Module):
    """AdapterHub's ``BertFusion``: attention of a query over the adapters' outputs.

    ``__call__(query, outputs, residual)``: ``query`` (B, T, D), ``outputs``
    (B, T, N, D), ``residual`` (B, T, D). Linear layers are initialised as
    AdapterHub's (N(0, 0.02), zero biases; the value matrix is the identity
    plus 1e-6 off the diagonal with ``value_initialized``).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> fusion = Fusion(FusionConfig.dynamic())
        >>> q, u = jnp.ones((1, 2, 4)), jnp.ones((1, 2, 3, 4))
        >>> variables = fusion.init(jax.random.key(0), q, u, q)
        >>> sorted(variables["params"]), fusion.apply(variables, q, u, q).shape
        (['key', 'query', 'value'], (1, 2, 4))
    """

    config: FusionConfig = FusionConfig()

    @nn.compact
    def __call__(self, query: jax.Array, outputs: jax.Array, residual: jax.Array,
                 deterministic: bool = True) -> jax.Array:
        cfg, width = self.config, query.shape[-1]
        normal = nn.initializers.normal(0.02)
        if cfg.residual_before:  # AdapterHub adds it in place, to keys and values alike
            outputs = outputs + residual[:, :, None, :]
        q = nn.Dense(width, kernel_init=normal, name="query")(query) if cfg.query else query
        k = nn.Dense(width, kernel_init=normal, name="key")(outputs) if cfg.key else outputs
        value = None
        if cfg.value:
            init = _near_identity if cfg.value_initialized else normal
            value = nn.Dense(width, use_bias=False, kernel_init=init, name="value")
        v = value(outputs) if value is not None and cfg.value_before_softmax else outputs
        scores = jnp.einsum("btd,btnd->btn", q, k)
        if cfg.dropout_prob:
            scores = nn.Dropout(cfg.dropout_prob)(scores, deterministic=deterministic)
        probs = jax.nn.softmax(scores, axis=-1)
        if not self.is_mutable_collection("params"):
            self.sow("intermediates", "attention_scores", probs)
        out = jnp.einsum("btn,btnd->btd", probs, v)
        if value is not None and not cfg.value_before_softmax:
            out = value(out)
        return out if cfg.residual_before else out + residual

    def regularization_loss(self) -> jax.Array:
        """AdapterHub's ``0.01 * sum((I - W_value)**2)``."""
        kernel = self.variables["params"]["value"]["kernel"].astype(jnp.float32)
        return 0.01 * jnp.sum(jnp.square(jnp.eye(kernel.shape[0], dtype=jnp.float32) - kernel))


def _near_identity(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
    del key
    eye = jnp.eye(*shape, dtype=dtype)
    return (1e-6 * (1 - eye) + eye).astype(dtype)


# ----------------------------------------------------------------------------- running a setup at one module


class Member(NamedTuple):
    """One adapter of the setup at the module being run: its spec, its call and its context."""

    spec: Any
    call: Any
    ctx: Any


def _check_sizes(block: Block, sizes: Sequence[int], total: int, axis: str, shape: tuple, ctx: Any) -> None:
    if sum(sizes) != total:
        field = "batch_sizes" if isinstance(block, BatchSplit) else "splits"
        raise AdapterError(f"{ctx.where()}: {block!r}: its {field} {list(sizes)} sum to {sum(sizes)}, but the "
                           f"{axis} is {total} (hidden states of shape {shape})")


class Composer:
    """AdapterHub's ``compose_*`` over a state; subclasses say what a state is and how an adapter acts on it."""

    supported: ClassVar[tuple[type, ...]] = (Stack, Parallel, BatchSplit, Split, Average, Fuse)

    def __init__(self, members: dict[str, Member], where: Any):
        self.members, self.where = members, where

    # What subclasses define.
    def rows(self, state: Any) -> int: ...
    def pre(self, name: str, state: Any) -> Any: return state
    def single(self, name: str, state: Any, want_up: bool = False) -> Any: ...
    def take(self, state: Any, axis: int, lo: int, hi: int) -> Any: ...
    def join(self, states: Sequence[Any], axis: int) -> Any: ...
    def weighted(self, states: Sequence[Any], weights: Sequence[float]) -> Any: ...
    def fuse(self, block: Fuse, state: Any) -> Any: ...

    def compose(self, setup: Setup, state: Any, want_up: bool = False) -> Any:
        if isinstance(setup, str):
            return self.single(setup, state, want_up) if setup in self.members else state
        if not self.present(setup):
            return state
        if not isinstance(setup, self.supported):
            raise AdapterError(f"{self.where.where()}: {type(setup).__name__} is not defined for "
                               f"{self.kind}, as in AdapterHub")
        if isinstance(setup, Stack):
            for child in setup.children:
                if isinstance(child, str) and child in self.members:
                    state = self.single(child, self.pre(child, state), want_up)
                else:
                    state = self.compose(child, state, want_up)
            return state
        if isinstance(setup, Fuse):
            return self.fuse(setup, state)
        state = self.pre(self._first_present(setup), state)
        if isinstance(setup, Average):
            kept = [(c, w) for c, w in zip(setup.children, setup.effective_weights) if self.present(c)]
            return self.weighted([self.compose(c, state, want_up) for c, _ in kept], [w for _, w in kept])
        if isinstance(setup, Parallel):
            n, total = len(setup.children), self.rows(state)
            if total % n:
                raise AdapterError(f"{self.where.where()}: {setup!r} needs a batch divisible by {n}, got {total} rows")
            sizes, axis = (total // n,) * n, 0
        elif isinstance(setup, BatchSplit):
            sizes, axis = setup.batch_sizes, 0
            _check_sizes(setup, sizes, self.rows(state), "batch", self.shape(state), self.where)
        else:
            sizes, axis = setup.splits, 1
            _check_sizes(setup, sizes, self.shape(state)[1], "sequence length", self.shape(state), self.where)
        bounds = np.cumsum((0,) + tuple(sizes))
        parts = [self.compose(c, self.take(state, axis, int(lo), int(hi)), want_up)
                 for c, lo, hi in zip(setup.children, bounds[:-1], bounds[1:])]
        return self.join(parts, axis)

    def present(self, setup: Setup) -> bool:
        names = {setup} if isinstance(setup, str) else setup.names()
        return any(n in self.members for n in names)

    def _first_present(self, block: Block) -> str:
        first = block.first()
        if first in self.members:
            return first
        return next(n for n in _ordered_names(block) if n in self.members)


def _ordered_names(setup: Setup) -> list[str]:
    if isinstance(setup, str):
        return [setup]
    return [n for c in setup.children for n in _ordered_names(c)]


class _Bottleneck(NamedTuple):
    hidden: jax.Array
    x: jax.Array
    residual: jax.Array
    up: Any = None
    last: str | None = None


class BottleneckComposer(Composer):
    """Bottleneck adapters in a residual block: AdapterHub's ``BottleneckLayer``."""

    kind = "bottleneck adapters"

    def __init__(self, members, where, site: str | None, layer_norm: Callable[[Any], Any] | None, nested: bool):
        super().__init__(members, where)
        self.site, self.layer_norm, self.nested = site, layer_norm, nested

    def call(self, name: str) -> Any:
        member = self.members[name]
        return member.call.nested(self.site) if self.nested else member.call

    def rows(self, state):
        return state.hidden.shape[0]

    def shape(self, state):
        return tuple(state.hidden.shape)

    def strategy(self, name: str) -> Any:
        return self.members[name].spec.strategy

    def pre(self, name, state, query_before_ln: bool | None = None):
        s = self.strategy(name)
        hidden, residual = state.hidden, None
        query = hidden if query_before_ln else None
        if s.residual_before_ln is True:
            residual = hidden
        if s.original_ln_before:
            hidden = hidden + state.x
            if s.residual_before_ln == "post_add":
                residual = hidden
            if self.layer_norm is not None:
                hidden = self.layer_norm(hidden)
        if s.residual_before_ln is False:
            residual = hidden
        if query_before_ln is False:
            query = hidden
        state = state._replace(hidden=hidden, residual=residual)
        return (state, query) if query_before_ln is not None else state

    def single(self, name, state, want_up=False):
        adapter = self.call(name)
        cast = lambda v: v.astype(state.hidden.dtype)
        out = cast(adapter(state.hidden, state.residual))
        up = cast(adapter(state.hidden, None)) if want_up else None
        return state._replace(hidden=out, up=up, last=name)

    def take(self, state, axis, lo, hi):
        cut = lambda v: None if v is None else jax.lax.slice_in_dim(v, lo, hi, axis=axis)
        return _Bottleneck(cut(state.hidden), cut(state.x), cut(state.residual), cut(state.up), state.last)

    def join(self, states, axis):
        cat = lambda vs: None if vs[0] is None else jnp.concatenate(vs, axis=axis)
        last = next((s.last for s in reversed(states) if s.last), None)
        return _Bottleneck(*(cat([getattr(s, f) for s in states]) for f in ("hidden", "x", "residual", "up")), last)

    def weighted(self, states, weights):
        hidden = sum(w * s.hidden for s, w in zip(states, weights)).astype(states[0].hidden.dtype)
        return states[0]._replace(hidden=hidden, last=states[-1].last)

    def fuse(self, block, state):
        last = block.last()
        if last not in self.members:
            last = [n for n in _ordered_names(block) if n in self.members][-1]
        state, query = self.pre(last, state, query_before_ln=block.config.query_before_ln)
        children = [c for c in block.children if self.present(c)]
        ups = jnp.stack([self.compose(c, state, want_up=True).up for c in children], axis=2)
        ctx = self.members[last].ctx
        scope = ctx.module.scope.push(ADAPTERS_KEY, reuse=True).push(block.name, reuse=True)
        if self.nested:
            scope = scope.push(self.site, reuse=True)
        fusion = Fusion(block.config, parent=scope)
        hidden = fusion(query, ups, state.residual, deterministic=not ctx.training)
        if ctx.training and block.config.value and block.config.regularization:
            ctx.add_loss(fusion.regularization_loss(), name="fusion_regularization")
        return state._replace(hidden=hidden.astype(state.hidden.dtype), last=last)

    def finish(self, state, h):
        s = self.strategy(state.last)
        out = state.hidden
        if self.layer_norm is None:
            return out if s.original_ln_after else out - state.x
        return self.layer_norm(out + state.x) if s.original_ln_after else out


class _Lora(NamedTuple):
    x: jax.Array
    delta: Any
    output: jax.Array
    last: str | None = None


class LoraComposer(Composer):
    """Adapters beside a layer (:class:`jadapters.ParallelAdd`): AdapterHub's ``LoRALinear``."""

    kind = "adapters joined by ParallelAdd (LoRA)"
    supported = (Stack, Parallel, BatchSplit, Average)

    def __init__(self, members, where, layer):
        super().__init__(members, where)
        self.layer = layer

    def rows(self, state):
        return state.output.shape[0]

    def shape(self, state):
        return tuple(state.output.shape)

    def single(self, name, state, want_up=False):
        member = self.members[name]
        inp = state.x if state.delta is None else state.delta
        if state.delta is not None and inp.shape[-1] != state.x.shape[-1]:
            raise AdapterError(f"{member.ctx.where()}: in a Stack, each LoRA reads the previous one's output (as in "
                               f"AdapterHub), which needs a layer with as many inputs as outputs; this one maps "
                               f"{state.x.shape[-1]} to {inp.shape[-1]}")
        kwargs = {"layer": self.layer} if member.call.accepts("layer") else {}
        delta = member.call(inp, **kwargs)
        return state._replace(delta=delta, last=name)

    def take(self, state, axis, lo, hi):
        cut = lambda v: None if v is None else jax.lax.slice_in_dim(v, lo, hi, axis=axis)
        return _Lora(cut(state.x), cut(state.delta), cut(state.output), state.last)

    def join(self, states, axis):
        deltas = [s.delta if s.delta is not None else jnp.zeros_like(s.output) for s in states]
        last = next((s.last for s in reversed(states) if s.last), None)
        return _Lora(jnp.concatenate([s.x for s in states]), jnp.concatenate(deltas),
                     jnp.concatenate([s.output for s in states]), last)

    def weighted(self, states, weights):
        delta = sum(w * (s.delta if s.delta is not None else 0.0) for s, w in zip(states, weights))
        return states[0]._replace(delta=delta, last=states[-1].last)


def run_setup(setup: Block, members: list[Member], call: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    """Runs the module call ``call`` with the setup's adapters present at it (``members``), composed."""
    from jadapters.blocks import InResidualBlock
    from jadapters.layers import describe_layer
    from jadapters.strategies import ParallelAdd

    by_name = {m.spec.name: m for m in members}
    first = members[0]
    strategies = [m.spec.strategy for m in members]
    if all(isinstance(s, InResidualBlock) for s in strategies):
        if any(s.is_parallel for s in strategies):
            raise AdapterError(f"{first.ctx.where()}: composition blocks run sequential bottlenecks; a parallel one "
                               f"(is_parallel=True, par_bn) cannot be composed")
        if len({s.sites for s in strategies}) > 1:
            raise AdapterError(f"{first.ctx.where()}: the adapters of {setup!r} here sit in different residual "
                               f"blocks; composition needs them in the same ones")

        def join(site, nested, h, x, norm, again):
            uses = iter([norm])
            layer_norm = None if norm is None else (lambda v: next(uses, again)(v))
            composer = BottleneckComposer(by_name, first.ctx, site, layer_norm, nested)
            state = composer.compose(setup, _Bottleneck(h, x, x))
            return composer.finish(state, h)

        return strategies[0].run_sites(call, first.ctx, join)
    if all(isinstance(s, ParallelAdd) for s in strategies):
        dora = [m.spec.name for m in members if getattr(m.spec.adapter, "use_dora", False)]
        if dora:
            raise AdapterError(f"adapters {dora} at {first.ctx.path!r}: DoRA adapters cannot be composed")
        output = call(*args, **kwargs)
        x = first.ctx.argument(strategies[0].input_index)
        composer = LoraComposer(by_name, first.ctx, describe_layer(first.ctx, x, output))
        state = composer.compose(setup, _Lora(x, None, output))
        if state.delta is None:
            return output
        last = by_name[state.last]
        return last.spec.strategy.add(output, state.delta, last.ctx)
    kinds = sorted({type(s).__name__ for s in strategies})
    raise AdapterError(f"adapters {sorted(by_name)} at {first.ctx.path!r} join with {kinds}: composition blocks are "
                       f"defined for bottlenecks in residual blocks (InResidualBlock) and for ParallelAdd (LoRA) alone")
