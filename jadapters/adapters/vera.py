"""VeRA: frozen random projections shared by every adapted layer, and two trained vectors per layer.

``y = W x + b + lambda_b * (B (lambda_d * (A x)))`` with ``A`` ``(in, r)`` and
``B`` ``(r, out)`` frozen and random, ``lambda_d`` ``(r,)`` (``d_initial`` at
init) and ``lambda_b`` ``(out,)`` (zero at init, so identity) trained, no
``alpha / r`` factor: PEFT's VeRA.

The projections are a function of ``projection_prng_key`` only: entry
``(i, j)`` of A and of B is drawn from ``fold_in(fold_in(key, i), j)`` with
JAX's threefry2x32 key (not torch's generator: PEFT's matrices cannot be
regenerated in JAX, but they can be supplied, below). So every layer's A is
the first ``in`` columns, and its B the first ``out`` rows, of one pair of
unbounded size: the layers share their projections as in PEFT (which slices
one pair sized to the largest layer), whatever the set of adapted layers.
B's entries are uniform in ``+-sqrt(6 / r)`` (PEFT's Kaiming-uniform bound);
A's in ``+-sqrt(6 / in)``, with ``in`` the layer's own input width, where PEFT
uses the widest targeted layer's (the same when all have one width, the usual
query/value case).

Storage: by default the matrices are not stored at all (a checkpoint holds
the seed, in the adapter's config) and are regenerated in every forward pass.
With ``save_projection=True`` they are created once by
:func:`jadapters.init_adapters` in the ``'vera_projection'`` collection
(frozen: training differentiates only ``'params'``) and saved with the
adapter. A loader puts a file's matrices there (``vera_a`` ``(in, r)``,
``vera_b`` ``(r, out)`` per layer, the slices of PEFT's ``vera_A`` /
``vera_B``, transposed); whenever they are present they are used. Inside an
``nn.scan`` that collection must be in the scan's ``variable_axes``, like any
collection (else the variables are invisible there: an error, never a silent
fallback to the seed).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from jadapters.adapters.lora import place_on_layers
from jadapters.checks import check_dropout, check_finite, check_positive_int
from jadapters.configs import MethodConfig, Placed, register_method
from jadapters.errors import AdapterError
from jadapters.layers import CONV, EMBED, LayerInfo
from jadapters.registry import register_adapter
from jadapters.strategies import ParallelAdd, Strategy

#: The variable collection holding VeRA's frozen projections, when they are stored.
VERA_COLLECTION = "vera_projection"


def _unit_uniform(key: jax.Array, rows: int, cols: int) -> jax.Array:
    """``(rows, cols)`` uniform in [-1, 1); entry (i, j) depends on ``key``, i and j alone."""

    def entry(i, j):
        bits = jax.random.key_data(jax.random.fold_in(jax.random.fold_in(key, i), j))[0]
        mantissa = (bits >> jnp.uint32(9)) | jnp.uint32(0x3F800000)  # a float in [1, 2)
        return 2.0 * (jax.lax.bitcast_convert_type(mantissa, jnp.float32) - 1.0) - 1.0

    i = jnp.arange(rows, dtype=jnp.uint32)
    j = jnp.arange(cols, dtype=jnp.uint32)
    return jax.vmap(lambda a: jax.vmap(lambda b: entry(a, b))(j))(i)


def vera_projection(seed: int, rank: int, in_features: int, out_features: int) -> tuple[jax.Array, jax.Array]:
    """VeRA's frozen ``(A, B)``, ``(in, r)`` and ``(r, out)``, for one layer, from ``seed``.

    Example:
        >>> a, b = vera_projection(0, 4, 6, 3)
        >>> a.shape, b.shape
        ((6, 4), (4, 3))
        >>> big_a, big_b = vera_projection(0, 4, 6, 10)
        >>> bool((big_b[:, :3] == b).all())
        True
    """
    key = jax.random.key(seed, impl="threefry2x32")
    a = _unit_uniform(jax.random.fold_in(key, 0), rank, in_features).T * math.sqrt(6.0 / in_features)
    b = _unit_uniform(jax.random.fold_in(key, 1), out_features, rank).T * math.sqrt(6.0 / rank)
    return a, b


@register_adapter
class VeRA(nn.Module):
    """``x -> lambda_b * (B (lambda_d * (A dropout(x))))`` with frozen random A, B (see the module docstring).

    Dense-like layers only (Dense, DenseGeneral, Einsum, GPT-2's Conv1D), as in PEFT.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> vera = VeRA(rank=4)
        >>> x = jnp.ones((2, 6))
        >>> variables = vera.init(jax.random.key(0), x)
        >>> sorted(variables["params"]), float(abs(vera.apply(variables, x)).sum())
        (['vera_lambda_b', 'vera_lambda_d'], 0.0)
    """

    #: Its merge adds to the weight, whatever else was merged there (see :func:`jadapters.merge_adapters`).
    merge_is_additive: ClassVar[bool] = True

    rank: int = 256
    projection_prng_key: int = 0
    d_initial: float = 0.1
    dropout: float = 0.0
    save_projection: bool = False
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def __post_init__(self) -> None:
        check_positive_int("rank", self.rank)
        check_finite("d_initial", self.d_initial)
        check_dropout(self.dropout)
        if isinstance(self.projection_prng_key, bool) or not isinstance(self.projection_prng_key, int):
            raise ValueError(f"projection_prng_key must be an int, got {self.projection_prng_key!r}")
        super().__post_init__()

    @nn.nowrap
    def default_strategy(self) -> Strategy:
        return ParallelAdd()

    @nn.compact
    def __call__(self, x: jax.Array, layer: LayerInfo | None = None, deterministic: bool = True) -> jax.Array:
        if layer is None:
            layer = LayerInfo.dense(x.shape[-1], x.shape[-1])
        if layer.kind in (CONV, EMBED):
            raise AdapterError(f"VeRA at {layer.path!r}: supports linear layers only (as PEFT), not {layer.kind}")
        a, b = self._projection(layer)
        d = self.param("vera_lambda_d", nn.initializers.constant(self.d_initial), (self.rank,), self.param_dtype)
        scale_b = self.param("vera_lambda_b", nn.initializers.zeros, (layer.out_features,), self.param_dtype)
        if self.dropout > 0.0:
            x = nn.Dropout(self.dropout, name="dropout")(x, deterministic=deterministic)
        h, a, b, d, scale_b = nn.dtypes.promote_dtype(layer.flatten_input(x), a, b, d, scale_b, dtype=self.dtype)
        return layer.unflatten_output((((h @ a) * d) @ b) * scale_b)

    def _projection(self, layer: LayerInfo) -> tuple[jax.Array, jax.Array]:
        if self.has_variable(VERA_COLLECTION, "vera_a"):
            a, b = self.get_variable(VERA_COLLECTION, "vera_a"), self.get_variable(VERA_COLLECTION, "vera_b")
            expected = ((layer.in_features, self.rank), (self.rank, layer.out_features))
            if (a.shape, b.shape) != expected:
                raise AdapterError(
                    f"VeRA at {layer.path!r}: its stored projections have shapes {a.shape} and {b.shape}, expected "
                    f"{expected[0]} and {expected[1]}"
                )
            return jax.lax.stop_gradient(a), jax.lax.stop_gradient(b)
        generate = lambda: vera_projection(self.projection_prng_key, self.rank, layer.in_features, layer.out_features)
        if not self.save_projection:
            return generate()
        if self.is_mutable_collection(VERA_COLLECTION):
            a, b = generate()
            self.put_variable(VERA_COLLECTION, "vera_a", a.astype(self.param_dtype))
            self.put_variable(VERA_COLLECTION, "vera_b", b.astype(self.param_dtype))
            return a, b
        raise AdapterError(
            f"VeRA at {layer.path!r} (save_projection=True) finds no stored projections in the "
            f"{VERA_COLLECTION!r} collection: initialise it with jadapters.init_adapters, pass that collection to "
            f"apply, and inside nn.scan add {VERA_COLLECTION!r}: 0 to the scan's variable_axes"
        )

    @nn.nowrap
    def projection_from(self, variables: Mapping[str, Any], layer: LayerInfo) -> tuple[jax.Array, jax.Array]:
        """The layer's ``(A, B)`` from an adapter's variables (stored) or the seed."""
        stored = variables.get(VERA_COLLECTION, {})
        if "vera_a" in stored:
            return stored["vera_a"], stored["vera_b"]
        return vera_projection(self.projection_prng_key, self.rank, layer.in_features, layer.out_features)

    @nn.nowrap
    def update(self, variables: Mapping[str, Any], layer: LayerInfo) -> jax.Array:
        """The weight update ``(A * lambda_d) B * lambda_b`` as an ``(in, out)`` matrix (float32)."""
        a, b = (m.astype(jnp.float32) for m in self.projection_from(variables, layer))
        p = variables["params"]
        return ((a * p["vera_lambda_d"].astype(jnp.float32)) @ b) * p["vera_lambda_b"].astype(jnp.float32)

    @nn.nowrap
    def merge_into(self, params, variables, layer: LayerInfo, *, strategy: Strategy, original) -> dict:
        """The layer's params with ``W + (A * lambda_d) B * lambda_b`` (see :func:`jadapters.merge_adapters`)."""
        _check_parallel(strategy)
        name = layer.weight_name()
        merged = dict(params)
        kernel = params[name]
        merged[name] = kernel + layer.matrix_kernel(self.update(variables, layer), kernel.shape).astype(kernel.dtype)
        return merged

    @nn.nowrap
    def unmerge_from(self, params, variables, layer: LayerInfo, *, strategy: Strategy) -> dict:
        """Subtracts the update again."""
        _check_parallel(strategy)
        name = layer.weight_name()
        restored = dict(params)
        kernel = params[name]
        restored[name] = kernel - layer.matrix_kernel(self.update(variables, layer), kernel.shape).astype(kernel.dtype)
        return restored


def _check_parallel(strategy: Strategy) -> None:
    if not isinstance(strategy, ParallelAdd) or strategy.input_index != 0:
        raise AdapterError(f"VeRA merges only with its ParallelAdd strategy, got {strategy!r}")


@register_method("vera")
@dataclasses.dataclass(frozen=True)
class VeraConfig(MethodConfig):
    """VeRA with PEFT's field names.

    Attributes:
        r: the rank of the shared projections (PEFT's default 256).
        target_modules: roles or module names/paths; None: the query and value projections
            (or a fused qkv).
        projection_prng_key: the seed of the projections.
        save_projection: store the projections in the variables (and checkpoints); PEFT's
            default is True because torch cannot promise to regenerate them, JAX's threefry
            can, so here the default is False: the checkpoint stores the seed.
        vera_dropout: dropout on the input.
        d_initial: the initial value of ``lambda_d``.

    Example:
        >>> VeraConfig(r=16).adapter().rank
        16
    """

    method: ClassVar[str] = "vera"
    r: int = 256
    target_modules: tuple[str, ...] | str | None = None
    projection_prng_key: int = 0
    save_projection: bool = False
    vera_dropout: float = 0.0
    d_initial: float = 0.1

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, list):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        self.adapter()

    def adapter(self) -> VeRA:
        return VeRA(rank=self.r, projection_prng_key=self.projection_prng_key, d_initial=float(self.d_initial),
                    dropout=self.vera_dropout, save_projection=bool(self.save_projection))

    def place(self, placement: Any, where: tuple[str, ...] | None = None) -> Placed:
        return place_on_layers(self, placement, where)
