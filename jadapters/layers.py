"""What kind of layer an adapter sits beside, and the shapes it maps between.

Linear-family adapters (LoRA and its variants) must produce exactly what the
layer they join produces, whatever the layer: a ``Dense``, a multi-head
``DenseGeneral`` (``(..., d) -> (..., heads, head_dim)`` or back), a
``Conv``, an ``Embed``, an ``Einsum``, or a third-party linear layer such as
GPT-2's ``Conv1D``. :func:`describe_layer` reads that from the intercepted
module and the shapes of its input and output; adapters size themselves from it.

Every such layer is, for an adapter, a matrix ``(in_features, out_features)``
applied to the flattened contracted input axes: :meth:`LayerInfo.kernel_matrix`
reads the layer's weight in that layout and :meth:`LayerInfo.matrix_kernel`
writes it back, which is what DoRA's weight norm, PiSSA's SVD and merging use.
For an ``Einsum`` the equation decides: letters of the input and the kernel that
the output lacks are contracted (the input features), letters of the kernel
that the output has are the output features; a kernel letter that is also in
the input and the output (a per-head weight, ``'bnd,ndh->bnh'``) is not a
matrix and is refused.
"""

from __future__ import annotations

import dataclasses
import math
import string
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jadapters.errors import AdapterError

DENSE, CONV, EMBED, EINSUM = "dense", "conv", "embed", "einsum"


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """A linear layer as an adapter sees it.

    Attributes:
        kind: ``'dense'`` (any layer contracting trailing input axes into
            trailing output axes: Dense, DenseGeneral, GPT-2's Conv1D),
            ``'conv'``, ``'embed'`` or ``'einsum'``.
        in_axes: the input axes it contracts (negative, in the kernel's order).
        in_shape: the contracted input feature shape (``(num_embeddings,)`` for Embed).
        out_shape: the output feature shape (an Einsum's in the kernel's order).
        module: the intercepted module (for a Conv: its window, strides, padding).
        path: the intercepted module's path (for per-path settings such as PEFT's rank_pattern).
        equation: an Einsum's equation, explicit (``'...'`` spelled out as letters).
        kernel_transposed: the 2-D kernel is stored ``(out, in)`` (GPT-2's Conv1D), not ``(in, out)``.
    """

    kind: str
    in_axes: tuple[int, ...]
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    module: Any = dataclasses.field(default=None, compare=False, repr=False)
    path: str = ""
    equation: str = ""
    kernel_transposed: bool = False

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
        """``(..., out_features)`` back to the layer's output layout (``(..., *out_shape)`` but for an Einsum)."""
        y = y.reshape(y.shape[:-1] + self.out_shape)
        if self.kind == EINSUM:
            y = jnp.transpose(y, _einsum_output_order(self.equation))
        return y

    def output_vector(self, v: jax.Array, ndim: int) -> jax.Array:
        """A per-output-feature vector ``(out_features,)`` shaped to broadcast against an output of rank ``ndim``."""
        v = v.reshape(self.out_shape)
        if self.kind != EINSUM:
            return v
        inputs, out = self.equation.split("->")
        kernel = inputs.split(",")[1]
        kernel_out = [c for c in kernel if c in out]
        v = jnp.transpose(v, [kernel_out.index(c) for c in out if c in kernel_out])
        return v.reshape([self.out_shape[kernel_out.index(c)] if c in kernel_out else 1 for c in out])

    def input_vector(self, v: jax.Array, ndim: int) -> jax.Array:
        """A per-input-feature vector ``(in_features,)`` shaped to broadcast against the layer's input of rank ``ndim``."""
        axes = [a % ndim for a in self.in_axes]
        v = v.reshape(self.in_shape)
        order = sorted(range(len(axes)), key=lambda i: axes[i])
        v = jnp.transpose(v, order)
        return v.reshape([self.in_shape[axes.index(a)] if a in axes else 1 for a in range(ndim)])

    def kernel_matrix(self, kernel: jax.Array) -> jax.Array:
        """The layer's weight as the ``(in_features, out_features)`` matrix an adapter sees.

        A Conv's kernel becomes ``(window * in_channels / groups, out_channels)``.

        Example:
            >>> info = LayerInfo(DENSE, (-1,), (4,), (2, 3))
            >>> info.kernel_matrix(jnp.zeros((4, 2, 3))).shape
            (4, 6)
        """
        if self.kind == EINSUM:
            inputs, out = self.equation.split("->")
            x_letters, k_letters = inputs.split(",")
            order = [c for c in k_letters if c not in out] + [c for c in k_letters if c in out]
            kernel = jnp.transpose(kernel, [k_letters.index(c) for c in order])
            return kernel.reshape(self.in_features, self.out_features)
        if self.kind == CONV:
            return kernel.reshape(-1, kernel.shape[-1])
        if self.kernel_transposed:
            return kernel.T
        return kernel.reshape(self.in_features, self.out_features)

    def matrix_kernel(self, matrix: jax.Array, kernel_shape: tuple[int, ...]) -> jax.Array:
        """The inverse of :meth:`kernel_matrix`: a matrix back in the layer's kernel layout."""
        if self.kind == EINSUM:
            inputs, out = self.equation.split("->")
            k_letters = inputs.split(",")[1]
            order = [c for c in k_letters if c not in out] + [c for c in k_letters if c in out]
            kernel = matrix.reshape([kernel_shape[k_letters.index(c)] for c in order])
            return jnp.transpose(kernel, [order.index(c) for c in k_letters])
        if self.kernel_transposed:
            return matrix.T
        return matrix.reshape(kernel_shape)

    def bias_vector(self, bias: jax.Array) -> jax.Array:
        """The layer's bias as ``(out_features,)``."""
        return bias.reshape(-1)

    def weight_name(self) -> str:
        """The name of the layer's weight parameter: ``'embedding'`` for Embed, else ``'kernel'``."""
        return "embedding" if self.kind == EMBED else "kernel"


def _normalise_axes(axes: Any, ndim: int) -> tuple[int, ...]:
    # DenseGeneral sorts its contracted axes: its kernel lists them in increasing order, whatever order
    # the module's ``axis`` field gives.
    axes = (axes,) if isinstance(axes, int) else tuple(axes)
    return tuple(sorted(a % ndim - ndim for a in axes))


def _explicit_equation(equation: str, x_ndim: int) -> str:
    """``equation`` with ``'...'`` replaced by fresh letters for an input of rank ``x_ndim``."""
    equation = equation.replace(" ", "")
    if "..." not in equation:
        return equation
    used = set(equation)
    inputs, out = equation.split("->")
    x_letters = inputs.split(",")[0]
    n = x_ndim - (len(x_letters) - 3)
    fresh = "".join([c for c in string.ascii_letters if c not in used][:n])
    return equation.replace("...", fresh)


def _einsum_output_order(equation: str) -> tuple[int, ...]:
    """The transposition from ``(input batch letters, kernel output letters)`` to the equation's output order."""
    inputs, out = equation.split("->")
    x_letters, k_letters = inputs.split(",")
    produced = [c for c in x_letters if c in out and c not in k_letters] + [c for c in k_letters if c in out]
    return tuple(produced.index(c) for c in out)


def _describe_einsum(ctx: Any, module: nn.Einsum, x: jax.Array) -> LayerInfo:
    equation = module.einsum_str
    if equation is None:
        equation = ctx.kwargs.get("einsum_str", ctx.args[1] if len(ctx.args) > 1 else None)
    equation = _explicit_equation(str(equation), x.ndim)
    inputs, out = equation.split("->")
    x_letters, k_letters = inputs.split(",")
    shared = [c for c in k_letters if c in x_letters and c in out]
    stray = [c for c in x_letters if c not in k_letters and c not in out] + [
        c for c in k_letters if c not in x_letters and c not in out
    ]
    if stray:
        raise AdapterError(
            f"{ctx.where()}: the Einsum {equation!r} sums over axes {stray} of one operand only; linear adapters "
            f"need every input axis contracted with the kernel or kept, and every kernel axis contracted or output"
        )
    if shared or "." in k_letters:
        raise AdapterError(
            f"{ctx.where()}: the Einsum {equation!r} keeps kernel axes {shared or k_letters} in the input and the "
            f"output (a weight per head or group), which is not one matrix; linear adapters need kernel axes that "
            f"are either contracted or output features"
        )
    contracted = [c for c in k_letters if c not in out]
    kernel_shape = tuple(module.shape)
    in_axes = tuple(x_letters.index(c) - len(x_letters) for c in contracted)
    in_shape = tuple(kernel_shape[k_letters.index(c)] for c in contracted)
    out_shape = tuple(kernel_shape[k_letters.index(c)] for c in k_letters if c in out)
    return LayerInfo(EINSUM, in_axes, in_shape, out_shape, module, ctx.path, equation=equation)


def _kernel_transposed(module: Any, in_features: int, out_features: int) -> bool:
    """Whether a third-party 2-D kernel is stored ``(out, in)``, as GPT-2's Conv1D stores it."""
    try:
        kernel = module.get_variable("params", "kernel") if module.has_variable("params", "kernel") else None
    except Exception:  # a module whose variables cannot be read here: assume Flax's layout
        kernel = None
    shape = getattr(kernel, "shape", None)
    if shape == (out_features, in_features) and (in_features != out_features or "Conv1D" in type(module).__name__):
        return True
    return False


def describe_layer(ctx: Any, x: Any, value: Any) -> LayerInfo:
    """The :class:`LayerInfo` of the module a strategy intercepts, from its input ``x`` and output ``value``.

    Example:
        >>> import flax.linen as nn, jax.numpy as jnp
        >>> from jadapters.context import AdapterContext
        >>> ctx = AdapterContext("lora", "q", False, (), {}, module=nn.DenseGeneral((2, 3)))
        >>> describe_layer(ctx, jnp.ones((1, 5, 8)), jnp.ones((1, 5, 2, 3)))
        LayerInfo(kind='dense', in_axes=(-1,), in_shape=(8,), out_shape=(2, 3), path='q', equation='', kernel_transposed=False)
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
    if isinstance(module, nn.Einsum):
        return _describe_einsum(ctx, module, x)
    if isinstance(module, nn.DenseGeneral):
        if module.batch_dims:
            raise AdapterError(f"{ctx.where()}: DenseGeneral with batch_dims is not supported by linear adapters")
        axes = _normalise_axes(module.axis, x.ndim)
        features = (module.features,) if isinstance(module.features, int) else tuple(module.features)
        return LayerInfo(DENSE, axes, tuple(x.shape[a] for a in axes), features, module, ctx.path)
    if isinstance(module, nn.Dense) or x.shape[:-1] == value.shape[:-1]:
        # Dense, and any layer mapping (..., in) -> (..., out), such as GPT-2's Conv1D.
        transposed = not isinstance(module, nn.Dense) and _kernel_transposed(module, x.shape[-1], value.shape[-1])
        return LayerInfo(DENSE, (-1,), (x.shape[-1],), (value.shape[-1],), module, ctx.path,
                         kernel_transposed=transposed)
    raise AdapterError(
        f"{ctx.where()}: cannot tell how {type(module).__name__} maps its input {tuple(x.shape)} to its output "
        f"{tuple(value.shape)}; linear adapters support Dense, DenseGeneral, Conv, Embed, Einsum and layers that "
        f"map (..., in) -> (..., out)"
    )


def describe_input(ctx: Any, x: Any) -> LayerInfo:
    """What a layer contracts of its input ``x``, before it runs (``out_shape`` is left empty).

    For adapters that act on a layer's input (IA3's input scaling).

    Example:
        >>> import flax.linen as nn, jax.numpy as jnp
        >>> from jadapters.context import AdapterContext
        >>> ctx = AdapterContext("ia3", "o", False, (), {}, module=nn.DenseGeneral(8, axis=(-2, -1)))
        >>> describe_input(ctx, jnp.ones((1, 5, 2, 4))).in_shape
        (2, 4)
    """
    module = ctx.module
    if isinstance(module, nn.Embed) or not hasattr(x, "shape"):
        raise AdapterError(f"{ctx.where()}: {type(module).__name__} takes no array of features to scale")
    if isinstance(module, nn.Einsum):
        info = _describe_einsum(ctx, module, x)
        return dataclasses.replace(info, out_shape=())
    if isinstance(module, nn.DenseGeneral):
        axes = _normalise_axes(module.axis, x.ndim)
        return LayerInfo(DENSE, axes, tuple(x.shape[a] for a in axes), (), module, ctx.path)
    kind = CONV if isinstance(module, nn.Conv) else DENSE
    return LayerInfo(kind, (-1,), (x.shape[-1],), (), module, ctx.path)
