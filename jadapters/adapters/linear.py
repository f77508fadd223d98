"""NeMo's LinearAdapter: a bottleneck MLP with a LayerNorm, zero output at init."""

from __future__ import annotations

import flax.linen as nn
import jax

from jadapters.adapters.activations import get_activation
from jadapters.registry import register_adapter
from jadapters.strategies import ResidualAdd, Strategy

#: PyTorch's default Linear initialisation, U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
#: which NeMo's adapters inherit.
torch_linear_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

NORM_POSITIONS = ("pre", "post")


@register_adapter
class LinearAdapter(nn.Module):
    """``LayerNorm -> Dense(dim) -> act -> Dense(in)`` ('pre') or the norm last ('post').

    The input width is taken from the input. Both Dense layers have no bias.
    'pre' zero-initialises the last Dense; 'post' zero-initialises the final
    LayerNorm's scale and bias: either way the output is exactly 0 at init.
    Dropout, when > 0, applies to the output. LayerNorm epsilon is 1e-5 as in
    PyTorch. Default strategy: :class:`ResidualAdd`.

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

    def __post_init__(self) -> None:
        if self.norm_position not in NORM_POSITIONS:
            raise ValueError(f"norm_position must be one of {NORM_POSITIONS}, got {self.norm_position!r}")
        get_activation(self.activation)
        if not isinstance(self.dim, int) or self.dim < 1:
            raise ValueError(f"dim must be a positive int, got {self.dim!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        super().__post_init__()

    @nn.nowrap
    def default_strategy(self) -> Strategy:
        return ResidualAdd()

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        features = x.shape[-1]
        act = get_activation(self.activation)
        if self.norm_position == "pre":
            h = nn.LayerNorm(epsilon=1e-5, name="norm")(x)
            h = nn.Dense(self.dim, use_bias=False, kernel_init=torch_linear_init, name="down")(h)
            h = nn.Dense(features, use_bias=False, kernel_init=nn.initializers.zeros, name="up")(act(h))
        else:
            h = nn.Dense(self.dim, use_bias=False, kernel_init=torch_linear_init, name="down")(x)
            h = nn.Dense(features, use_bias=False, kernel_init=torch_linear_init, name="up")(act(h))
            h = nn.LayerNorm(
                epsilon=1e-5, scale_init=nn.initializers.zeros, bias_init=nn.initializers.zeros, name="norm"
            )(h)
        if self.dropout > 0.0:
            h = nn.Dropout(self.dropout, name="dropout")(h, deterministic=deterministic)
        return h
