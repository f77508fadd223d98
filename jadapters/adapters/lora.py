"""LoRA: a low-rank update that runs beside a layer, zero at init."""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from jadapters.adapters.linear import torch_linear_init
from jadapters.checks import check_dropout, check_finite, check_positive_int
from jadapters.configs import MethodConfig, Placed, register_method, resolve_roles
from jadapters.errors import AdapterError
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
    use_rslora: bool = False
    init_weights: str = "default"
    rank_pattern: tuple[tuple[str, int], ...] = ()
    alpha_pattern: tuple[tuple[str, float], ...] = ()
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def __post_init__(self) -> None:
        check_positive_int("rank", self.rank)
        check_finite("alpha", self.alpha)
        check_dropout(self.dropout)
        if self.features is not None:
            check_positive_int("features", self.features)
        if self.init_weights not in LORA_INITS:
            raise ValueError(f"init_weights must be one of {LORA_INITS}, got {self.init_weights!r}")
        for pattern, rank in self.rank_pattern:
            _compile_pattern(pattern)
            check_positive_int(f"rank_pattern[{pattern!r}]", rank)
        for pattern, alpha in self.alpha_pattern:
            _compile_pattern(pattern)
            check_finite(f"alpha_pattern[{pattern!r}]", alpha)
        super().__post_init__()

    @nn.nowrap
    def default_strategy(self) -> Strategy:
        return ParallelAdd()

    @nn.nowrap
    def rank_and_alpha(self, path: str) -> tuple[int, float]:
        """PEFT's rank_pattern / alpha_pattern: the first pattern matching the end of ``path`` wins."""
        return _by_pattern(self.rank_pattern, path, self.rank), _by_pattern(self.alpha_pattern, path, self.alpha)

    @nn.nowrap
    def scaling_for(self, rank: int, alpha: float) -> float:
        """``alpha / rank``, or rsLoRA's ``alpha / sqrt(rank)``."""
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    @nn.compact
    def __call__(self, x: jax.Array, layer: LayerInfo | None = None, deterministic: bool = True) -> jax.Array:
        if layer is None:
            layer = LayerInfo.dense(x.shape[-1], self.features or x.shape[-1])
        rank, alpha = self.rank_and_alpha(layer.path)
        scaling = self.scaling_for(rank, alpha)
        a_init = nn.initializers.normal(1.0 / rank) if self.init_weights == "gaussian" else torch_linear_init
        b_init = torch_linear_init if self.init_weights == "random" else nn.initializers.zeros
        if layer.kind == EMBED:
            a = self.param("lora_embedding_a", b_init, (layer.in_features, rank), self.param_dtype)
            b = self.param("lora_embedding_b", nn.initializers.normal(1.0), (rank, layer.out_features), self.param_dtype)
            a, b = nn.dtypes.promote_dtype(a, b, dtype=self.dtype)
            return (jnp.take(a, x, axis=0) @ b) * scaling
        if self.dropout > 0.0:
            x = nn.Dropout(self.dropout, name="dropout")(x, deterministic=deterministic)
        if layer.kind == CONV:
            conv = layer.module
            if conv.feature_group_count != 1:
                raise ValueError(
                    f"LoRA on a grouped convolution (feature_group_count={conv.feature_group_count}) is not supported"
                )
            h = nn.Conv(
                rank, conv.kernel_size, strides=conv.strides, padding=conv.padding,
                input_dilation=conv.input_dilation, kernel_dilation=conv.kernel_dilation, use_bias=False,
                kernel_init=a_init, dtype=self.dtype, param_dtype=self.param_dtype, name="lora_a",
            )(x)
            window = (1,) * len(conv.kernel_size)
            out = nn.Conv(layer.out_features, window, use_bias=False, kernel_init=b_init,
                          dtype=self.dtype, param_dtype=self.param_dtype, name="lora_b")(h)
            return out * scaling
        dense = lambda n, init, name: nn.Dense(
            n, use_bias=False, kernel_init=init, dtype=self.dtype, param_dtype=self.param_dtype, name=name
        )
        h = dense(rank, a_init, "lora_a")(layer.flatten_input(x))
        out = dense(layer.out_features, b_init, "lora_b")(h)
        return layer.unflatten_output(out) * scaling


#: LoRA's initialisations: PEFT's default (Kaiming-uniform A, zero B), ``"gaussian"`` (A normal
#: with std 1/r, zero B), and ``"random"`` (B random too: not identity at init, for tests).
LORA_INITS = ("default", "gaussian", "random")


def _compile_pattern(pattern: str) -> "re.Pattern[str]":
    try:
        return re.compile(rf"(.*/)?(?:{pattern})$")
    except re.error as e:
        raise ValueError(f"invalid pattern {pattern!r}: {e}") from None


def _by_pattern(patterns: tuple[tuple[str, Any], ...], path: str, default: Any) -> Any:
    for pattern, value in patterns:
        if _compile_pattern(pattern).match(path):
            return value
    return default


def _pairs(mapping: Any) -> tuple[tuple[str, Any], ...]:
    return tuple((str(k).replace(".", "/"), v) for k, v in dict(mapping or {}).items())


def default_lora_roles(placement: Any) -> tuple[str, ...]:
    """PEFT's default LoRA targets: the query and value projections, or a fused ``qkv``."""
    declared = dict(placement.modules)
    if "query" in declared and "value" in declared:
        return ("query", "value")
    if "qkv" in declared:
        return ("qkv",)
    return ("query", "value")  # resolve_roles then names the missing role


@register_method("lora")
@dataclasses.dataclass(frozen=True)
class LoraConfig(MethodConfig):
    """LoRA with PEFT's field names.

    Attributes:
        r: the rank.
        lora_alpha: scaling numerator: ``lora_alpha / r`` (rsLoRA: ``/ sqrt(r)``).
        target_modules: roles or module names/paths (PEFT's suffix rule); None: the query and
            value projections (or a fused qkv).
        lora_dropout: dropout on the LoRA input.
        use_rslora: rsLoRA's scaling.
        init_lora_weights: ``True`` (PEFT's default), ``"gaussian"``, or ``False`` (random B:
            not identity at init).
        rank_pattern / alpha_pattern: ``{pattern: r}`` / ``{pattern: alpha}``, a regex matched
            against the end of the module path (PEFT's rule; ``.`` in names may be written as ``/``).

    Example:
        >>> LoraConfig(r=4, target_modules=("query", "value")).lora_alpha
        8
    """

    method: ClassVar[str] = "lora"
    r: int = 8
    lora_alpha: float = 8
    target_modules: tuple[str, ...] | str | None = None
    lora_dropout: float = 0.0
    use_rslora: bool = False
    init_lora_weights: bool | str = True
    rank_pattern: Any = ()
    alpha_pattern: Any = ()

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, list):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        for name in ("rank_pattern", "alpha_pattern"):
            object.__setattr__(self, name, _pairs(getattr(self, name)))
        self.adapter()  # validates every field now

    def adapter(self) -> LoRA:
        init = {True: "default", False: "random", "gaussian": "gaussian"}.get(self.init_lora_weights)
        if init is None:
            raise ValueError(f"init_lora_weights must be True, False or 'gaussian', got {self.init_lora_weights!r}")
        return LoRA(rank=self.r, alpha=float(self.lora_alpha), dropout=self.lora_dropout, use_rslora=self.use_rslora,
                    init_weights=init, rank_pattern=self.rank_pattern, alpha_pattern=self.alpha_pattern)

    def place(self, placement: Any, where: tuple[str, ...] | None = None) -> Placed:
        if where is not None:
            return Placed((), where, self.adapter(), ParallelAdd())
        if self.target_modules is None:
            roles, targets = resolve_roles(placement, default_lora_roles(placement), "lora", roles_only=True)
        else:
            entries = (self.target_modules,) if isinstance(self.target_modules, str) else self.target_modules
            roles, targets = resolve_roles(placement, entries, "lora", roles_only=False)
        return Placed(roles, targets, self.adapter(), ParallelAdd())
