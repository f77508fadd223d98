"""LoRA: a low-rank update that runs beside a layer, zero at init."""

from __future__ import annotations

import flax.linen as nn
import jax

from jadapters.adapters.linear import torch_linear_init
from jadapters.registry import register_adapter
from jadapters.strategies import ParallelAdd, Strategy


@register_adapter
class LoRA(nn.Module):
    """``x -> (alpha / rank) * B(A(dropout(x)))`` with B zero-initialised.

    Placed on a Dense layer with its default :class:`ParallelAdd` strategy it
    reads the layer's input and adds to its output: ``W x + (alpha/r) B A x``.
    ``features`` is the output width (default: the input width).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> lora = LoRA(rank=2, features=3)
        >>> x = jnp.ones((4, 5))
        >>> params = lora.init(jax.random.key(0), x)
        >>> lora.apply(params, x).shape
        (4, 3)
    """

    rank: int = 8
    alpha: float = 8.0
    features: int | None = None
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank must be a positive int, got {self.rank!r}")
        super().__post_init__()

    @nn.nowrap
    def default_strategy(self) -> Strategy:
        return ParallelAdd()

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        if self.dropout > 0.0:
            x = nn.Dropout(self.dropout, name="dropout")(x, deterministic=deterministic)
        h = nn.Dense(self.rank, use_bias=False, kernel_init=torch_linear_init, name="lora_a")(x)
        out = nn.Dense(self.features or x.shape[-1], use_bias=False, kernel_init=nn.initializers.zeros, name="lora_b")(h)
        return out * (self.alpha / self.rank)
