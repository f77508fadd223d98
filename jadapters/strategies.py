"""Strategies: how an adapter's result joins the value flowing through the model.

A strategy is a frozen (hence hashable) dataclass. Most need only a pure
``__call__``::

    strategy(adapter, value, ctx) -> new value

``adapter`` calls the adapter network; ``value`` is the intercepted module's
output, or the previous adapter's result when several are chained;
``ctx`` (:class:`jadapters.AdapterContext`) gives the module, its inputs, the
training flag, PRNG keys and auxiliary-loss recording. A custom strategy is a
few lines::

    @dataclasses.dataclass(frozen=True)
    class Multiply(jadapters.Strategy):
        scale: float = 1.0

        def __call__(self, adapter, value, ctx):
            return self.scale * value * adapter(value)

A strategy that must act before the module runs (scale its input, change
its arguments) or inside it overrides :meth:`Strategy.around` instead, which
receives ``call``, the module's own call. The result must keep the hooked
value's shapes and dtypes unless the strategy sets ``changes_shape = True``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, ClassVar

import jax
import jax.numpy as jnp

from jadapters.checks import check_probability
from jadapters.context import AdapterContext
from jadapters.errors import AdapterError
from jadapters.layers import describe_layer
from jadapters.registry import register_strategy

AdapterFn = Callable[..., Any]


class Strategy:
    """Base class of strategies. Subclasses are ``@dataclasses.dataclass(frozen=True)``.

    Settings are checked by :meth:`validate` when the strategy is built.
    """

    #: Whether the strategy may change the hooked value's shape (prompt and prefix tuning do).
    changes_shape: ClassVar[bool] = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raises ``ValueError`` for settings out of range."""

    def around(self, adapter: AdapterFn, call: Callable[..., Any], ctx: AdapterContext) -> Any:
        """Runs the intercepted call with the adapter joined; the default joins after the call.

        ``call(*args, **kwargs)`` runs the module (and the adapters closer to
        it); ``ctx.args`` / ``ctx.kwargs`` are the arguments it was called with.
        """
        return self(adapter, call(*ctx.args, **ctx.kwargs), ctx)

    def __call__(self, adapter: AdapterFn, value: Any, ctx: AdapterContext) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must define __call__ or around")


def _structure(tree: Any, dtypes: bool) -> Any:
    if dtypes:
        return jax.tree_util.tree_map(lambda leaf: (tuple(jnp.shape(leaf)), jnp.result_type(leaf).name), tree)
    return jax.tree_util.tree_map(lambda leaf: tuple(jnp.shape(leaf)), tree)


def check_like(result: Any, value: Any, ctx: AdapterContext, what: str = "its output", *, dtypes: bool = True) -> None:
    """Raises :class:`AdapterError` unless ``result`` has the shapes (and dtypes) of ``value``.

    Example:
        >>> import jax.numpy as jnp
        >>> ctx = AdapterContext("a", "enc", False, (), {})
        >>> check_like(jnp.zeros(3), jnp.zeros(3), ctx)
        >>> check_like(jnp.zeros(2), jnp.zeros(3), ctx)
        Traceback (most recent call last):
        ...
        jadapters.errors.AdapterError: adapter 'a' at 'enc': its output has (shape, dtype) ((2,), 'float32'), but the hooked value has ((3,), 'float32')
    """
    try:
        got, expected = _structure(result, dtypes), _structure(value, dtypes)
        same = got == expected
    except Exception:  # structures that cannot be mapped are not the same
        got, expected, same = type(result).__name__, type(value).__name__, False
    if not same:
        raise AdapterError(
            f"{ctx.where()}: {what} has {'(shape, dtype)' if dtypes else 'shape'} {got}, "
            f"but the hooked value has {expected}"
        )


def require_array(value: Any, ctx: AdapterContext, strategy: Strategy) -> None:
    """Raises a clear :class:`AdapterError` unless the hooked ``value`` is one array.

    Example:
        >>> import jax.numpy as jnp
        >>> ctx = AdapterContext("a", "enc", False, (), {})
        >>> require_array((jnp.zeros(2), jnp.zeros(2)), ctx, ResidualAdd())
        Traceback (most recent call last):
        ...
        jadapters.errors.AdapterError: adapter 'a' at 'enc': ResidualAdd joins an array, but the module returns a tuple of 2; target a submodule that returns one array, or use a strategy written for this output
    """
    if not hasattr(value, "shape") or not hasattr(value, "dtype"):
        what = f"a {type(value).__name__} of {len(value)}" if isinstance(value, (tuple, list, dict)) else repr(type(value).__name__)
        raise AdapterError(
            f"{ctx.where()}: {type(strategy).__name__} joins an array, but the module returns {what}; "
            f"target a submodule that returns one array, or use a strategy written for this output"
        )


@register_strategy
@dataclasses.dataclass(frozen=True)
class ReturnResult(Strategy):
    """``value -> adapter(value)``: the adapter's result replaces the value.

    The result is cast to the value's dtype.

    Example:
        >>> import jax.numpy as jnp
        >>> ctx = AdapterContext("a", "m", False, (), {})
        >>> ReturnResult()(lambda v: v * 2, jnp.ones(2), ctx)
        Array([2., 2.], dtype=float32)
    """

    def __call__(self, adapter: AdapterFn, value: Any, ctx: AdapterContext) -> Any:
        result = adapter(value)
        check_like(result, value, ctx, dtypes=False)
        return jax.tree_util.tree_map(lambda r, v: jnp.asarray(r).astype(jnp.result_type(v)), result, value)


@register_strategy
@dataclasses.dataclass(frozen=True)
class ResidualAdd(Strategy):
    """``value -> value + adapter(value)``, NeMo's residual strategy.

    In training mode only:

    * ``stochastic_depth`` p in [0, 1] drops the adapter's output: one
      Bernoulli(1 - p) draw for the whole batch, as NeMo does (or one per
      sample along axis 0 with ``per_sample=True``), rescaled by 1 / (1 - p)
      when 1 - p > 0. It needs the ``'dropout'`` PRNG stream; inside
      ``nn.scan`` split that stream (``split_rngs={'dropout': True}``) or
      every layer draws the same mask.
    * ``l2_lambda`` >= 0 records the auxiliary loss
      ``l2_lambda * mean_over_batch(sum_over_other_axes((value - result)**2))``
      in the ``'adapter_losses'`` collection, computed in float32 whatever
      the activations' dtype.

    Example:
        >>> import jax.numpy as jnp
        >>> ctx = AdapterContext("a", "m", False, (), {})
        >>> ResidualAdd()(lambda v: v * 2, jnp.ones(2), ctx)
        Array([3., 3.], dtype=float32)
        >>> ResidualAdd(l2_lambda=float("nan"))
        Traceback (most recent call last):
        ...
        ValueError: l2_lambda must be a finite number >= 0, got nan
    """

    stochastic_depth: float = 0.0
    l2_lambda: float = 0.0
    per_sample: bool = False

    def validate(self) -> None:
        check_probability("stochastic_depth", self.stochastic_depth)
        lam = self.l2_lambda
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0.0:
            raise ValueError(f"l2_lambda must be a finite number >= 0, got {lam!r}")

    def adapter_output(self, adapter: AdapterFn, value: Any, ctx: AdapterContext) -> Any:
        """What is added to the residual; subclasses change what the adapter reads."""
        return adapter(value)

    def __call__(self, adapter: AdapterFn, value: Any, ctx: AdapterContext) -> Any:
        require_array(value, ctx, self)
        return self.add(value, self.adapter_output(adapter, value, ctx), ctx)

    def add(self, residual: jax.Array, out: jax.Array, ctx: AdapterContext) -> jax.Array:
        """``residual + out`` with stochastic depth and the L2 auxiliary loss."""
        require_array(residual, ctx, self)
        check_like(out, residual, ctx, dtypes=False)
        p = self.stochastic_depth
        if ctx.training and p > 0.0:
            keep = 1.0 - p
            shape = (residual.shape[0],) + (1,) * (residual.ndim - 1) if self.per_sample else (1,) * residual.ndim
            noise = jax.random.bernoulli(ctx.make_rng("dropout"), keep, shape).astype(out.dtype)
            if keep > 0.0:
                noise = noise / keep
            out = noise * out
        if ctx.training and self.l2_lambda > 0.0:
            # (value - result) == -out; squared in float32 so small outputs of a bf16 model count.
            delta = out.astype(jnp.float32)
            per_sample = jnp.sum(jnp.square(delta).reshape(delta.shape[0], -1), axis=-1)
            ctx.add_loss(self.l2_lambda * jnp.mean(per_sample))
        return residual + out.astype(residual.dtype)


@register_strategy
@dataclasses.dataclass(frozen=True)
class ParallelAdd(ResidualAdd):
    """``output -> output + adapter(module input)``: the adapter runs beside the module.

    This is how LoRA joins a layer: it reads the intercepted module's input
    (positional argument ``input_index``) and adds to its output. An adapter
    whose ``__call__`` takes a ``layer`` argument gets a
    :class:`jadapters.layers.LayerInfo` describing the module (Dense,
    DenseGeneral, Conv, Embed, ...), so it can size itself to the output;
    one whose ``__call__`` takes ``output`` gets the module's output (DoRA
    rescales it).
    Stochastic depth and ``l2_lambda`` behave as in :class:`ResidualAdd`.

    Example:
        >>> import jax.numpy as jnp
        >>> ctx = AdapterContext("a", "m", False, (jnp.ones(2),), {})
        >>> ParallelAdd()(lambda x: x * 5, jnp.zeros(2), ctx)
        Array([5., 5.], dtype=float32)
    """

    input_index: int = 0

    def adapter_output(self, adapter: AdapterFn, value: Any, ctx: AdapterContext) -> Any:
        x = ctx.argument(self.input_index)
        accepts = getattr(adapter, "accepts", lambda _: False)
        kwargs = {"output": value} if accepts("output") else {}
        if accepts("layer"):
            return adapter(x, layer=describe_layer(ctx, x, value), **kwargs)
        return adapter(x, **kwargs)


@register_strategy
@dataclasses.dataclass(frozen=True)
class MHAResidualAdd(ResidualAdd):
    """NeMo's attention-adapter strategy: ``value + mha(value, value, value, mask)``.

    The hooked value serves as query, key and value; the result is added to it.
    ``mask_argument`` names the intercepted module's keyword argument (str) or
    positional index (int) holding the attention mask; None means no mask.

    Example:
        >>> import jax.numpy as jnp
        >>> ctx = AdapterContext("a", "m", False, (), {})
        >>> MHAResidualAdd()(lambda q, k, v, mask: q + k, jnp.ones(2), ctx)
        Array([3., 3.], dtype=float32)
    """

    mask_argument: int | str | None = None

    def adapter_output(self, adapter: AdapterFn, value: Any, ctx: AdapterContext) -> Any:
        mask = None if self.mask_argument is None else ctx.argument(self.mask_argument)
        return adapter(value, value, value, mask)
