"""LoRA: a low-rank update that runs beside a layer, zero at init."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jadapters.adapters.linear import torch_linear_init
from jadapters.checks import check_dropout, check_finite, check_positive_int
from jadapters.layers import CONV, EMBED, LayerInfo
from jadapters.registry import register_adapter
from jadapters.strategies import ParallelAdd, Strategy


@register_adapter
class LoRA(nn.Module):
    """``x -> (alpha / rank) * B(A(dropout(x)))`` with B zero-initialised.

    Placed on a layer with its default :class:`ParallelAdd` strategy it reads
    the layer's input and adds to its output: ``W x + (alpha/r) B A x``. It
    sizes itself from the layer it joins (see :mod:`jadapters.layers`):

    * Dense-like layers (Dense, multi-head DenseGeneral, GPT-2's Conv1D):
      ``lora_a`` kernel ``(in, r)``, ``lora_b`` kernel ``(r, out)``, with the
      multi-head axes flattened;
    * Conv: ``lora_a`` a Conv with the layer's window, strides and padding to
      ``r`` channels, ``lora_b`` a 1x1 Conv;
    * Embed: ``lora_embedding_a`` ``(num_embeddings, r)`` (zero at init, as in
      PEFT) and ``lora_embedding_b`` ``(r, features)`` (standard normal); no dropout.

    Used on its own, ``features`` is the output width (default: the input width).

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
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def __post_init__(self) -> None:
        check_positive_int("rank", self.rank)
        check_finite("alpha", self.alpha)
        check_dropout(self.dropout)
        if self.features is not None:
            check_positive_int("features", self.features)
        super().__post_init__()

    @nn.nowrap
    def default_strategy(self) -> Strategy:
        return ParallelAdd()

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @nn.compact
    def __call__(self, x: jax.Array, layer: LayerInfo | None = None, deterministic: bool = True) -> jax.Array:
        if layer is None:
            layer = LayerInfo.dense(x.shape[-1], self.features or x.shape[-1])
        if layer.kind == EMBED:
            a = self.param("lora_embedding_a", nn.initializers.zeros, (layer.in_features, self.rank), self.param_dtype)
            b = self.param("lora_embedding_b", nn.initializers.normal(1.0), (self.rank, layer.out_features), self.param_dtype)
            a, b = nn.dtypes.promote_dtype(a, b, dtype=self.dtype)
            return (jnp.take(a, x, axis=0) @ b) * self.scaling
        if self.dropout > 0.0:
            x = nn.Dropout(self.dropout, name="dropout")(x, deterministic=deterministic)
        if layer.kind == CONV:
            conv = layer.module
            if conv.feature_group_count != 1:
                raise ValueError(
                    f"LoRA on a grouped convolution (feature_group_count={conv.feature_group_count}) is not supported"
                )
            h = nn.Conv(
                self.rank, conv.kernel_size, strides=conv.strides, padding=conv.padding,
                input_dilation=conv.input_dilation, kernel_dilation=conv.kernel_dilation, use_bias=False,
                kernel_init=torch_linear_init, dtype=self.dtype, param_dtype=self.param_dtype, name="lora_a",
            )(x)
            window = (1,) * len(conv.kernel_size)
            out = nn.Conv(layer.out_features, window, use_bias=False, kernel_init=nn.initializers.zeros,
                          dtype=self.dtype, param_dtype=self.param_dtype, name="lora_b")(h)
            return out * self.scaling
        dense = lambda n, init, name: nn.Dense(
            n, use_bias=False, kernel_init=init, dtype=self.dtype, param_dtype=self.param_dtype, name=name
        )
        h = dense(self.rank, torch_linear_init, "lora_a")(layer.flatten_input(x))
        out = dense(layer.out_features, nn.initializers.zeros, "lora_b")(h)
        return layer.unflatten_output(out) * self.scaling
