"""NeMo's LinearAdapter: a bottleneck MLP with a LayerNorm, zero output at init."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jadapters.adapters.activations import get_activation
from jadapters.checks import check_dropout, check_positive_int
from jadapters.registry import register_adapter
from jadapters.strategies import ResidualAdd, Strategy

#: PyTorch's default Linear initialisation, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (Kaiming-uniform
#: with a = sqrt(5)), which NeMo's adapters and PEFT's LoRA A inherit.
torch_linear_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

NORM_POSITIONS = ("pre", "post")


def layer_norm(name: str, dtype: Any, param_dtype: Any, zero: bool = False) -> nn.LayerNorm:
    """PyTorch's LayerNorm: epsilon 1e-5 and the two-pass variance E[(x - E[x])^2].

    Flax's default (``use_fast_variance``) computes E[x^2] - E[x]^2, which
    loses precision on inputs far from zero; NeMo and torch do not.
    """
    init = nn.initializers.zeros if zero else None
    extra = {"scale_init": init, "bias_init": init} if zero else {}
    return nn.LayerNorm(
        epsilon=1e-5, use_fast_variance=False, dtype=dtype, param_dtype=param_dtype, name=name, **extra
    )


@register_adapter
class LinearAdapter(nn.Module):
    """``LayerNorm -> Dense(dim) -> act -> Dense(in)`` ('pre') or the norm last ('post').

    The input width is taken from the input. Both Dense layers have no bias.
    'pre' zero-initialises the last Dense; 'post' zero-initialises the final
    LayerNorm's scale and bias: either way the output is exactly 0 at init.
    Dropout, when > 0, applies to the output. The LayerNorm is PyTorch's
    (epsilon 1e-5, two-pass variance). ``dtype`` is the computation dtype
    (None: from the inputs and params), ``param_dtype`` the params' dtype, as
    on ``nn.Dense``. Default strategy: :class:`ResidualAdd`.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> adapter = LinearAdapter(dim=4)
        >>> x = jnp.ones((2, 8))
        >>> params = adapter.init(jax.random.key(0), x)
        >>> float(abs(adapter.apply(params, x)).sum())
        0.0
    """

    dim: int
    activation: str = "swish"
    norm_position: str = "pre"
    dropout: float = 0.0
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def __post_init__(self) -> None:
        if self.norm_position not in NORM_POSITIONS:
            raise ValueError(f"norm_position must be one of {NORM_POSITIONS}, got {self.norm_position!r}")
        get_activation(self.activation)
        check_positive_int("dim", self.dim)
        check_dropout(self.dropout)
        super().__post_init__()

    @nn.nowrap
    def default_strategy(self) -> Strategy:
        return ResidualAdd()

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        features = x.shape[-1]
        act = get_activation(self.activation)
        dense = lambda n, init, name: nn.Dense(
            n, use_bias=False, kernel_init=init, dtype=self.dtype, param_dtype=self.param_dtype, name=name
        )
        if self.norm_position == "pre":
            h = layer_norm("norm", self.dtype, self.param_dtype)(x)
            h = dense(self.dim, torch_linear_init, "down")(h)
            h = dense(features, nn.initializers.zeros, "up")(act(h))
        else:
            h = dense(self.dim, torch_linear_init, "down")(x)
            h = dense(features, torch_linear_init, "up")(act(h))
            h = layer_norm("norm", self.dtype, self.param_dtype, zero=True)(h)
        if self.dropout > 0.0:
            h = nn.Dropout(self.dropout, name="dropout")(h, deterministic=deterministic)
        return h
