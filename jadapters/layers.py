"""What kind of layer an adapter sits beside, and the shapes it maps between.

Linear-family adapters (LoRA and its variants) must produce exactly what the
layer they join produces, whatever the layer: a ``Dense``, a multi-head
``DenseGeneral`` (``(..., d) -> (..., heads, head_dim)`` or back), a
``Conv``, an ``Embed``, or a third-party linear layer such as GPT-2's
``Conv1D``. :func:`describe_layer` reads that from the intercepted module and
the shapes of its input and output; adapters size themselves from it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jadapters.errors import AdapterError

DENSE, CONV, EMBED = "dense", "conv", "embed"


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """A linear layer as an adapter sees it.

    Attributes:
        kind: ``'dense'`` (any layer contracting trailing input axes into
            trailing output axes: Dense, DenseGeneral, GPT-2's Conv1D),
            ``'conv'`` or ``'embed'``.
        in_axes: for ``'dense'``, the input axes it contracts (negative, in order).
        in_shape: the contracted input feature shape (``(num_embeddings,)`` for Embed).
        out_shape: the trailing output feature shape.
        module: the intercepted module (for a Conv: its window, strides, padding).
        path: the intercepted module's path (for per-path settings such as PEFT's rank_pattern).
    """

    kind: str
    in_axes: tuple[int, ...]
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    module: Any = dataclasses.field(default=None, compare=False, repr=False)
    path: str = ""

    @property
    def in_features(self) -> int:
        return math.prod(self.in_shape)

    @property
    def out_features(self) -> int:
        return math.prod(self.out_shape)

    @classmethod
    def dense(cls, in_features: int, out_features: int) -> "LayerInfo":
        """A plain ``(..., in) -> (..., out)`` layer.

        Example:
            >>> LayerInfo.dense(4, 6).out_shape
            (6,)
        """
        return cls(DENSE, (-1,), (in_features,), (out_features,))

    def flatten_input(self, x: jax.Array) -> jax.Array:
        """``x`` with the contracted axes moved last and flattened into one."""
        k = len(self.in_axes)
        x = jnp.moveaxis(x, self.in_axes, tuple(range(-k, 0)))
        return x.reshape(x.shape[: x.ndim - k] + (self.in_features,))

    def unflatten_output(self, y: jax.Array) -> jax.Array:
        """``(..., out_features)`` back to ``(..., *out_shape)``."""
        return y.reshape(y.shape[:-1] + self.out_shape)


def _normalise_axes(axes: Any, ndim: int) -> tuple[int, ...]:
    axes = (axes,) if isinstance(axes, int) else tuple(axes)
    return tuple(sorted(a % ndim - ndim for a in axes))


def describe_layer(ctx: Any, x: Any, value: Any) -> LayerInfo:
    """The :class:`LayerInfo` of the module a strategy intercepts, from its input ``x`` and output ``value``.

    Example:
        >>> import flax.linen as nn, jax.numpy as jnp
        >>> from jadapters.context import AdapterContext
        >>> ctx = AdapterContext("lora", "q", False, (), {}, module=nn.DenseGeneral((2, 3)))
        >>> describe_layer(ctx, jnp.ones((1, 5, 8)), jnp.ones((1, 5, 2, 3)))
        LayerInfo(kind='dense', in_axes=(-1,), in_shape=(8,), out_shape=(2, 3), path='q')
    """
    module = ctx.module
    if isinstance(module, nn.Embed):
        return LayerInfo(EMBED, (), (module.num_embeddings,), (module.features,), module, ctx.path)
    if not hasattr(x, "shape") or not hasattr(value, "shape"):
        raise AdapterError(
            f"{ctx.where()}: a linear adapter needs one array in and one out, got {type(x).__name__} -> "
            f"{type(value).__name__} from {type(module).__name__}"
        )
    if isinstance(module, nn.Conv):
        return LayerInfo(CONV, (-1,), (x.shape[-1],), (value.shape[-1],), module, ctx.path)
    if isinstance(module, nn.DenseGeneral):
        if module.batch_dims:
            raise AdapterError(f"{ctx.where()}: DenseGeneral with batch_dims is not supported by linear adapters")
        axes = _normalise_axes(module.axis, x.ndim)
        features = (module.features,) if isinstance(module.features, int) else tuple(module.features)
        return LayerInfo(DENSE, axes, tuple(x.shape[a] for a in axes), features, module, ctx.path)
    if isinstance(module, nn.Dense) or x.shape[:-1] == value.shape[:-1]:
        # Dense, and any layer mapping (..., in) -> (..., out), such as GPT-2's Conv1D.
        return LayerInfo(DENSE, (-1,), (x.shape[-1],), (value.shape[-1],), module, ctx.path)
    raise AdapterError(
        f"{ctx.where()}: cannot tell how {type(module).__name__} maps its input {tuple(x.shape)} to its output "
        f"{tuple(value.shape)}; linear adapters support Dense, DenseGeneral, Conv, Embed and layers that map "
        f"(..., in) -> (..., out)"
    )
