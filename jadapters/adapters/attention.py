"""NeMo's ASR MultiHeadAttentionAdapter: attention over the hooked sequence, zero output at init."""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jadapters.adapters.linear import layer_norm, torch_linear_init
from jadapters.checks import check_dropout, check_positive_int
from jadapters.registry import register_adapter
from jadapters.strategies import MHAResidualAdd, Strategy

#: The score NeMo gives masked positions before the softmax.
MASKED_SCORE = -10000.0


@register_adapter
class MultiHeadAttentionAdapter(nn.Module):
    """Multi-head attention with a shared LayerNorm on query, key and value.

    ``proj_dim`` None projects to ``n_feat`` (which must divide by ``n_head``);
    ``proj_dim < 1`` means ``n_head``; otherwise it must divide by ``n_head``.
    The output projection (weight and bias) starts at zero, so the output is 0.
    ``dtype`` / ``param_dtype`` as on ``nn.Dense``; the LayerNorm is PyTorch's.
    ``mask`` is boolean ``[batch, time_q, time_k]`` (or broadcastable), True
    where attention is allowed (Flax's convention; NeMo's is the negation).
    Default strategy: :class:`MHAResidualAdd`, which adds the output to the value.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> mha = MultiHeadAttentionAdapter(n_head=2, n_feat=8)
        >>> x = jnp.ones((2, 5, 8))
        >>> params = mha.init(jax.random.key(0), x, x, x)
        >>> mha.apply(params, x, x, x).shape
        (2, 5, 8)
    """

    n_head: int
    n_feat: int
    dropout_rate: float = 0.0
    proj_dim: int | None = None
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def __post_init__(self) -> None:
        check_positive_int("n_head", self.n_head)
        check_positive_int("n_feat", self.n_feat)
        check_dropout(self.dropout_rate, "dropout_rate")
        width = self.projection_width
        if width % self.n_head:
            what = "proj_dim" if self.proj_dim is not None else "n_feat"
            raise ValueError(f"{what} ({width}) must be divisible by n_head ({self.n_head})")
        super().__post_init__()

    @property
    def projection_width(self) -> int:
        """Width of the q/k/v projections: n_feat, n_head (proj_dim < 1) or proj_dim."""
        if self.proj_dim is None:
            return self.n_feat
        return self.n_head if self.proj_dim < 1 else self.proj_dim

    @nn.nowrap
    def default_strategy(self) -> Strategy:
        return MHAResidualAdd()

    @nn.compact
    def __call__(
        self,
        query: jax.Array,
        key: jax.Array,
        value: jax.Array,
        mask: jax.Array | None = None,
        deterministic: bool = True,
    ) -> jax.Array:
        width, heads = self.projection_width, self.n_head
        d_k = width // heads
        norm = layer_norm("pre_norm", self.dtype, self.param_dtype)
        dense = lambda n, name, **init: nn.Dense(n, dtype=self.dtype, param_dtype=self.param_dtype, name=name, **init)

        def project(x, name):
            y = dense(width, name, kernel_init=torch_linear_init, bias_init=_torch_bias_init(self.n_feat))(norm(x))
            return y.reshape(y.shape[:-1] + (heads, d_k))

        q, k, v = project(query, "linear_q"), project(key, "linear_k"), project(value, "linear_v")
        scores = jnp.einsum("...qhd,...khd->...hqk", q, k) / math.sqrt(d_k)
        if mask is not None:
            allowed = jnp.expand_dims(mask, -3)  # broadcast over heads
            scores = jnp.where(allowed, scores, MASKED_SCORE)
            attn = jnp.where(allowed, jax.nn.softmax(scores, axis=-1), 0.0)
        else:
            attn = jax.nn.softmax(scores, axis=-1)
        attn = nn.Dropout(self.dropout_rate, name="dropout")(attn, deterministic=deterministic or self.dropout_rate == 0)
        context = jnp.einsum("...hqk,...khd->...qhd", attn, v).reshape(query.shape[:-1] + (width,))
        zeros = nn.initializers.zeros
        return dense(self.n_feat, "linear_out", kernel_init=zeros, bias_init=zeros)(context)


def _torch_bias_init(fan_in: int):
    """PyTorch's Linear bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init
