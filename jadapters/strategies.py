"""Strategies: how an adapter's result joins the value flowing through the model.

A strategy is a frozen (hence hashable) dataclass with a pure ``__call__``::

    strategy(adapter, value, ctx) -> new value

``adapter`` calls the adapter network; ``value`` is the intercepted module's
output, or the previous adapter's result when several are chained;
``ctx`` (:class:`jadapters.AdapterContext`) gives the module's inputs, the
training flag, PRNG keys and auxiliary-loss recording. A custom strategy is a
few lines::

    @dataclasses.dataclass(frozen=True)
    class Multiply(jadapters.Strategy):
        scale: float = 1.0

        def __call__(self, adapter, value, ctx):
            return self.scale * value * adapter(value)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jadapters.context import AdapterContext
from jadapters.errors import AdapterError

AdapterFn = Callable[..., Any]


class Strategy:
    """Base class of strategies. Subclasses are ``@dataclasses.dataclass(frozen=True)``."""

    def validate(self) -> None:
        """Raises ``ValueError`` for settings out of range; called when an adapter is added."""

    def __call__(self, adapter: AdapterFn, value: Any, ctx: AdapterContext) -> Any:
        raise NotImplementedError


def check_same_shape(result: Any, value: Any, ctx: AdapterContext, what: str = "its output") -> None:
    """Raises :class:`AdapterError` unless ``result`` has the shape of ``value``.

    Example:
        >>> import jax.numpy as jnp
        >>> ctx = AdapterContext("a", "enc", False, (), {}, None)
        >>> check_same_shape(jnp.zeros(3), jnp.zeros(3), ctx)
        >>> check_same_shape(jnp.zeros(2), jnp.zeros(3), ctx)
        Traceback (most recent call last):
        ...
        jadapters.errors.AdapterError: adapter 'a' at 'enc': its output has shape (2,), but the hooked value has shape (3,)
    """
    shape = lambda t: jax.tree_util.tree_map(jnp.shape, t)
    try:
        same = shape(result) == shape(value)
    except Exception:  # structures that cannot be mapped are not the same
        same = False
    if not same:
        raise AdapterError(
            f"adapter {ctx.name!r} at {ctx.path!r}: {what} has shape {shape(result)}, "
            f"but the hooked value has shape {shape(value)}"
        )


@dataclasses.dataclass(frozen=True)
class ReturnResult(Strategy):
    """``value -> adapter(value)``: the adapter's result replaces the value.

    Example:
        >>> import jax.numpy as jnp
        >>> ctx = AdapterContext("a", "m", False, (), {}, None)
        >>> ReturnResult()(lambda v: v * 2, jnp.ones(2), ctx)
        Array([2., 2.], dtype=float32)
    """

    def __call__(self, adapter: AdapterFn, value: Any, ctx: AdapterContext) -> Any:
        result = adapter(value)
        check_same_shape(result, value, ctx)
        return result


@dataclasses.dataclass(frozen=True)
class ResidualAdd(Strategy):
    """``value -> value + adapter(value)``, NeMo's residual strategy.

    In training mode only:

    * ``stochastic_depth`` p in [0, 1] drops the adapter's output: one
      Bernoulli(1 - p) draw for the whole batch, as NeMo does (or one per
      sample along axis 0 with ``per_sample=True``), rescaled by 1 / (1 - p)
      when 1 - p > 0. It needs the ``'dropout'`` PRNG stream.
    * ``l2_lambda`` > 0 records the auxiliary loss
      ``l2_lambda * mean_over_batch(sum_over_other_axes((value - result)**2))``
      in the ``'adapter_losses'`` collection.

    Example:
        >>> import jax.numpy as jnp
        >>> ctx = AdapterContext("a", "m", False, (), {}, None)
        >>> ResidualAdd()(lambda v: v * 2, jnp.ones(2), ctx)
        Array([3., 3.], dtype=float32)
    """

    stochastic_depth: float = 0.0
    l2_lambda: float = 0.0
    per_sample: bool = False

    def validate(self) -> None:
        p = self.stochastic_depth
        if not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
            raise ValueError(f"stochastic_depth must be a probability in [0, 1], got {p!r}")
        if not isinstance(self.l2_lambda, (int, float)) or self.l2_lambda < 0.0:
            raise ValueError(f"l2_lambda must be >= 0, got {self.l2_lambda!r}")

    def adapter_output(self, adapter: AdapterFn, value: Any, ctx: AdapterContext) -> Any:
        """What is added to the residual; subclasses change what the adapter reads."""
        return adapter(value)

    def __call__(self, adapter: AdapterFn, value: Any, ctx: AdapterContext) -> Any:
        self.validate()
        return self.add(value, self.adapter_output(adapter, value, ctx), ctx)

    def add(self, residual: jax.Array, out: jax.Array, ctx: AdapterContext) -> jax.Array:
        """``residual + out`` with stochastic depth and the L2 auxiliary loss."""
        if not isinstance(residual, jax.Array) and not hasattr(residual, "shape"):
            raise AdapterError(
                f"adapter {ctx.name!r} at {ctx.path!r}: residual add needs an array to add to, "
                f"but the hooked value is {type(residual).__name__}"
            )
        check_same_shape(out, residual, ctx)
        out = out.astype(residual.dtype)
        p = self.stochastic_depth
        if ctx.training and p > 0.0:
            keep = 1.0 - p
            shape = (residual.shape[0],) + (1,) * (residual.ndim - 1) if self.per_sample else (1,) * residual.ndim
            noise = jax.random.bernoulli(ctx.make_rng("dropout"), keep, shape).astype(residual.dtype)
            if keep > 0.0:
                noise = noise / keep
            out = noise * out
        result = residual + out
        if ctx.training and self.l2_lambda > 0.0:
            diff = (residual - result).astype(jnp.float32)
            per_sample = jnp.sum(jnp.square(diff).reshape(diff.shape[0], -1), axis=-1)
            ctx.add_loss(self.l2_lambda * jnp.mean(per_sample))
        return result


@dataclasses.dataclass(frozen=True)
class ParallelAdd(ResidualAdd):
    """``output -> output + adapter(module input)``: the adapter runs beside the module.

    This is how LoRA joins a layer: it reads the intercepted module's input
    (positional argument ``input_index``) and adds to its output. Stochastic
    depth and ``l2_lambda`` behave as in :class:`ResidualAdd`.

    Example:
        >>> import jax.numpy as jnp
        >>> ctx = AdapterContext("a", "m", False, (jnp.ones(2),), {}, None)
        >>> ParallelAdd()(lambda x: x * 5, jnp.zeros(2), ctx)
        Array([5., 5.], dtype=float32)
    """

    input_index: int = 0

    def adapter_output(self, adapter: AdapterFn, value: Any, ctx: AdapterContext) -> Any:
        return adapter(ctx.argument(self.input_index))


@dataclasses.dataclass(frozen=True)
class MHAResidualAdd(ResidualAdd):
    """NeMo's attention-adapter strategy: ``value + mha(value, value, value, mask)``.

    The hooked value serves as query, key and value; the result is added to it.
    ``mask_argument`` names the intercepted module's keyword argument (str) or
    positional index (int) holding the attention mask; None means no mask.

    Example:
        >>> import jax.numpy as jnp
        >>> ctx = AdapterContext("a", "m", False, (), {}, None)
        >>> MHAResidualAdd()(lambda q, k, v, mask: q + k, jnp.ones(2), ctx)
        Array([3., 3.], dtype=float32)
    """

    mask_argument: int | str | None = None

    def adapter_output(self, adapter: AdapterFn, value: Any, ctx: AdapterContext) -> Any:
        mask = None if self.mask_argument is None else ctx.argument(self.mask_argument)
        return adapter(value, value, value, mask)
