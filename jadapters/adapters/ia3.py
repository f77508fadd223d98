"""IA3: learned vectors that scale a layer's output or its input, ones at initialisation.

PEFT's IA3 scales the OUTPUT of the key and value projections,
``(W x + b) * l`` (the bias is scaled too), and the INPUT of the feed-forward
layers it is told about (``feedforward_modules``), ``W (l * x) + b``.
AdapterHub's IA3 scales the output of the key, value and intermediate
(first feed-forward) projections: ``"ia3_adapterhub"`` places it that way.
The vector ``l`` (``ia3_l``) has one entry per output (or input) feature;
both forms fold into the layer's weights (:func:`jadapters.merge_adapters`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from jadapters.configs import MethodConfig, Placed, register_method, resolve_roles
from jadapters.context import AdapterContext
from jadapters.errors import AdapterError
from jadapters.layers import CONV, EMBED, LayerInfo, describe_input, describe_layer
from jadapters.naming import path_matches
from jadapters.registry import register_adapter, register_strategy
from jadapters.strategies import Strategy, require_array


@register_adapter
class IA3(nn.Module):
    """A learned vector ``ia3_l`` of ``features`` entries, ones at init (standard normal with ``init_ones=False``).

    Its strategy, :class:`IA3Scale`, multiplies the layer's output or input by it.

    Example:
        >>> import jax
        >>> params = IA3().init(jax.random.key(0), 3)
        >>> params["params"]["ia3_l"]
        Array([1., 1., 1.], dtype=float32)
    """

    init_ones: bool = True
    param_dtype: Any = jnp.float32

    @nn.nowrap
    def default_strategy(self) -> Strategy:
        return IA3Scale()

    @nn.compact
    def __call__(self, features: int) -> jax.Array:
        init = nn.initializers.ones if self.init_ones else nn.initializers.normal(1.0)
        return self.param("ia3_l", init, (features,), self.param_dtype)

    @nn.nowrap
    def merge_into(
        self,
        params: Mapping[str, jax.Array],
        variables: Mapping[str, Any],
        layer: LayerInfo,
        *,
        strategy: Strategy,
        original: Mapping[str, jax.Array],
    ) -> dict:
        """The layer's params with the scaling folded in: columns (and the bias) for output scaling, rows for input."""
        return _rescale(params, variables, layer, strategy, invert=False)

    @nn.nowrap
    def unmerge_from(
        self, params: Mapping[str, jax.Array], variables: Mapping[str, Any], layer: LayerInfo, *, strategy: Strategy
    ) -> dict:
        """Divides the scaling out again; a zero entry of ``l`` cannot be undone (an error)."""
        scale = variables["params"]["ia3_l"]
        if bool(jnp.any(scale == 0)):
            raise AdapterError("IA3's merge multiplied by a zero scale, which cannot be divided out again")
        return _rescale(params, variables, layer, strategy, invert=True)


def _rescale(params, variables, layer: LayerInfo, strategy: Strategy, invert: bool) -> dict:
    if not isinstance(strategy, IA3Scale):
        raise AdapterError(f"IA3 merges only with its IA3Scale strategy, got {strategy!r}")
    if layer.kind == EMBED:
        raise AdapterError("IA3 on an Embed cannot be merged")
    scale = variables["params"]["ia3_l"].astype(jnp.float32)
    if invert:
        scale = 1.0 / scale
    name = layer.weight_name()
    kernel = params[name]
    matrix = layer.kernel_matrix(kernel).astype(jnp.float32)
    merged = dict(params)
    if strategy.scales_input(layer.path):
        if layer.kind == CONV and layer.module is not None and layer.module.feature_group_count != 1:
            raise AdapterError("IA3's input scaling of a grouped Conv cannot be folded into its kernel")
        if layer.kind == CONV:  # rows of the flattened kernel are (window position, input channel)
            scale = jnp.tile(scale, matrix.shape[0] // scale.shape[0])
        matrix = matrix * scale[:, None]
    else:
        matrix = matrix * scale[None, :]
        if "bias" in params:
            bias = params["bias"]
            merged["bias"] = (bias.reshape(-1).astype(jnp.float32) * scale).reshape(bias.shape).astype(bias.dtype)
    merged[name] = layer.matrix_kernel(matrix, kernel.shape).astype(kernel.dtype)
    return merged


@register_strategy
@dataclasses.dataclass(frozen=True)
class IA3Scale(Strategy):
    """IA3's join: ``(W x + b) * l``, or ``W (l * x) + b`` on the paths matching ``input_targets``.

    ``input_targets`` are canonical targets (see :mod:`jadapters.naming`); the
    layer's input is its positional argument ``input_index``.

    Example:
        >>> import jax.numpy as jnp, flax.linen as nn
        >>> ctx = AdapterContext("a", "ff", False, (jnp.ones((1, 2)),), {}, module=nn.Dense(3))
        >>> IA3Scale().around(lambda n: 2 * jnp.ones(n), lambda x: jnp.ones((1, 3)), ctx)
        Array([[2., 2., 2.]], dtype=float32)
    """

    input_targets: tuple[str, ...] = ()
    input_index: int = 0

    def scales_input(self, path: str) -> bool:
        """Whether the layer at ``path`` gets its input scaled (else its output)."""
        return any(path_matches(path, t) for t in self.input_targets)

    def around(self, adapter, call, ctx: AdapterContext) -> Any:
        if self.scales_input(ctx.path):
            x = ctx.argument(self.input_index)
            layer = describe_input(ctx, x)
            scale = _per_row(adapter(layer.in_features), x, layer.input_vector, ctx)
            args = list(ctx.args)
            args[self.input_index] = x * scale.astype(x.dtype)
            return call(*args, **ctx.kwargs)
        value = call(*ctx.args, **ctx.kwargs)
        require_array(value, ctx, self)
        layer = describe_layer(ctx, ctx.argument(self.input_index), value)
        return value * _per_row(adapter(layer.out_features), value, layer.output_vector, ctx).astype(value.dtype)


def _per_row(vector: jax.Array, value: jax.Array, shaped, ctx: AdapterContext) -> jax.Array:
    """The scale vector shaped for ``value``; a ``(rows, features)`` one (an adapter bank's) scales each row."""
    if vector.ndim == 1:
        return shaped(vector, value.ndim)
    if vector.shape[0] != value.shape[0]:
        raise AdapterError(f"{ctx.where()}: {vector.shape[0]} per-row scales for a value of {value.shape[0]} rows")

    def full_rank(v):
        s = shaped(v, value.ndim)
        return s.reshape((1,) * (value.ndim - s.ndim) + s.shape)

    return jax.vmap(full_rank)(vector)[:, 0]  # the rows replace the (size 1) batch axis


def _entries(value: Any) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)


@register_method("ia3")
@dataclasses.dataclass(frozen=True)
class IA3Config(MethodConfig):
    """IA3 with PEFT's field names.

    Attributes:
        target_modules: roles or module names/paths; None: the ``key``, ``value`` and
            ``ffn_output`` roles (PEFT's BERT placement).
        feedforward_modules: which of the targets get their INPUT scaled (PEFT requires them to
            be among ``target_modules``); None: the ``ffn_output`` role when it is targeted.
        init_ia3_weights: ones at init (``False``: standard normal, not identity).

    ``"ia3_adapterhub"`` is AdapterHub's placement: the outputs of ``key``,
    ``value`` and ``ffn_intermediate`` are scaled, no input.

    Example:
        >>> IA3Config().feedforward_modules is None
        True
    """

    method: ClassVar[str] = "ia3"
    target_modules: tuple[str, ...] | str | None = None
    feedforward_modules: tuple[str, ...] | str | None = None
    init_ia3_weights: bool = True

    def __post_init__(self) -> None:
        for name in ("target_modules", "feedforward_modules"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))

    def adapter(self) -> IA3:
        return IA3(init_ones=bool(self.init_ia3_weights))

    def place(self, placement: Any, where: tuple[str, ...] | None = None) -> Placed:
        if self.target_modules is None:
            entries = ("key", "value", "ffn_output")
            roles, targets = resolve_roles(placement, entries, self.method, roles_only=True)
        else:
            entries = _entries(self.target_modules)
            roles, targets = resolve_roles(placement, entries, self.method, roles_only=False)
        feedforward = self.feedforward_modules
        if feedforward is None:
            feedforward = ("ffn_output",) if "ffn_output" in entries else ()
        feedforward = _entries(feedforward)
        stray = [f for f in feedforward if f not in entries]
        if stray:
            raise AdapterError(f"ia3: feedforward_modules {stray} must be among target_modules {list(entries)}")
        input_targets = resolve_roles(placement, feedforward, self.method, roles_only=False)[1] if feedforward else ()
        if where is not None:
            roles, targets = (), where
        return Placed(roles, targets, self.adapter(), IA3Scale(input_targets=input_targets))


@register_method("ia3_adapterhub")
def ia3_adapterhub(**overrides: Any) -> IA3Config:
    """AdapterHub's IA3: the outputs of key, value and the intermediate feed-forward layer are scaled.

    Example:
        >>> from jadapters.configs import parse_method
        >>> parse_method("ia3_adapterhub").target_modules
        ('key', 'value', 'ffn_intermediate')
    """
    return IA3Config(target_modules=("key", "value", "ffn_intermediate"), feedforward_modules=(), **overrides)
