"""LoRA and its PEFT variants: rsLoRA, DoRA, PiSSA and OLoRA inits, bias options, rank patterns.

``LoRA`` runs beside a linear layer (Dense, multi-head DenseGeneral, Conv,
Embed, Einsum, GPT-2's Conv1D) and adds ``scaling * B(A(dropout(x)))`` to its
output, ``scaling = alpha / r`` (rsLoRA: ``alpha / sqrt(r)``). ``LoraConfig``
is the same method with PEFT's field names, placed through the model's roles.

Inits (``init_weights``) as PEFT's ``init_lora_weights``:

* ``"default"``: A Kaiming-uniform (a = sqrt(5)), B zero: identity at init;
* ``"gaussian"``: A normal with std 1/r, B zero;
* ``"pissa"`` / ``"olora"``: A and B from the top-r SVD (PiSSA) or the QR
  decomposition (OLoRA) of the layer's weight, and the weight replaced by the
  residual ``W - scaling * B A``, so the model still computes ``W x`` at init.
  This changes base params: :func:`jadapters.init_adapters` returns variables
  whose targeted weights hold the residual (the arrays passed in are untouched).
  :func:`residual_to_lora` turns a trained PiSSA/OLoRA adapter into a plain
  LoRA of rank 2r that applies to the original weights, as PEFT saves it;
* ``"random"``: B random too (not identity at init; for tests).

DoRA (``use_dora``): ``y = (m / ||W'||) (W' x) + b`` with ``W' = W + scaling * B A``,
the norm taken per output feature over the input features and treated as a
constant (no gradient through it), ``m`` (``lora_magnitude``, one per output
feature) initialised to ``||W'||``; the bias is not rescaled.

Bias options: ``bias="lora_only"`` trains the targeted layer's own bias (an
adapter param ``bias`` initialised from the base bias, which it replaces);
``lora_bias=True`` gives B a bias inside the scaled branch:
``scaling * (B A x + b_B)``.

Gating (AdapterHub's ``use_gating``, UniPELT's): a gate ``Linear(in, 1)`` reads
the layer's input and REPLACES the scaling: ``y = W x + b + g * B A x`` with
``g = mean over the positions of sigmoid(gate(x))`` (every axis between the
batch and the features, padding included), one value per sample, sown as
``intermediates/.../gate_score`` (apply with ``mutable=['intermediates']``).
``alpha`` then has no effect, as in AdapterHub.

All of these merge into the layer's weights (:func:`jadapters.merge_adapters`),
except a gated LoRA: its gate depends on the input.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, ClassVar, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from jadapters.adapters.linear import torch_linear_init
from jadapters.adapters.prefix import torch_bias_init
from jadapters.checks import check_dropout, check_finite, check_positive_int
from jadapters.configs import MethodConfig, Placed, check_options, register_method, resolve_roles
from jadapters.errors import AdapterError
from jadapters.layers import CONV, EMBED, LayerInfo
from jadapters.registry import register_adapter
from jadapters.strategies import ParallelAdd, Strategy

#: LoRA's initialisations: PEFT's default (Kaiming-uniform A, zero B), ``"gaussian"`` (A normal
#: with std 1/r, zero B), ``"pissa"`` and ``"olora"`` (from the base weight, which becomes the
#: residual), and ``"random"`` (B random too: not identity at init, for tests).
LORA_INITS = ("default", "gaussian", "random", "pissa", "olora")
#: Inits that replace the layer's weight by a residual.
RESIDUAL_INITS = ("pissa", "olora")
#: PEFT's ``bias`` options that jadapters supports (see :class:`LoraConfig`).
BIAS_OPTIONS = ("none", "lora_only")


@register_adapter
class LoRA(nn.Module):
    """``x -> scaling * B(A(dropout(x)))``, sized from the layer it joins; DoRA and PEFT's options.

    Placed on a layer with its default :class:`ParallelAdd` strategy it reads
    the layer's input and adds to its output: ``W x + (alpha/r) B A x``. It
    sizes itself from the layer it joins (see :mod:`jadapters.layers`):

    * Dense-like layers (Dense, multi-head DenseGeneral, Einsum, GPT-2's Conv1D):
      ``lora_a`` kernel ``(in, r)``, ``lora_b`` kernel ``(r, out)``, with the
      contracted input axes and the output feature axes flattened;
    * Conv: ``lora_a`` a Conv with the layer's window, strides and padding to
      ``r`` channels, ``lora_b`` a 1x1 Conv (grouped like the layer, as PEFT does);
    * Embed: ``lora_embedding_a`` ``(num_embeddings, r)`` (zero at init, as in
      PEFT) and ``lora_embedding_b`` ``(r, features)`` (standard normal); no dropout.

    Used on its own, ``features`` is the output width (default: the input width).
    See the module docstring for ``init_weights``, ``use_dora``, ``bias``, ``lora_bias`` and
    ``use_gating``.

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
    use_dora: bool = False
    bias: str = "none"
    lora_bias: bool = False
    use_gating: bool = False
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
        if self.bias not in BIAS_OPTIONS:
            raise ValueError(f"bias must be one of {BIAS_OPTIONS}, got {self.bias!r}")
        if self.lora_bias and self.use_dora:
            raise ValueError("lora_bias=True is not supported with DoRA (use_dora=True), as in PEFT")
        if self.lora_bias and self.init_weights not in ("default", "random"):
            raise ValueError(f"lora_bias=True needs the default (or random) init, as in PEFT, got {self.init_weights!r}")
        if self.use_gating and (self.use_dora or self.rewrites_base):
            raise ValueError("use_gating=True (a gate instead of the scaling) does not combine with DoRA or the "
                             "'pissa' / 'olora' inits")
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

    @property
    def merge_is_additive(self) -> bool:
        """Whether merging only adds to the weight (no DoRA rescaling, no bias replacement)."""
        return not self.use_dora and self.bias == "none"

    @property
    def rewrites_base(self) -> bool:
        """Whether creating this adapter replaces the layer's weight (PiSSA and OLoRA)."""
        return self.init_weights in RESIDUAL_INITS

    @nn.nowrap
    def rank_and_alpha(self, path: str) -> tuple[int, float]:
        """PEFT's rank_pattern / alpha_pattern: the first pattern matching the end of ``path`` wins."""
        return _by_pattern(self.rank_pattern, path, self.rank), _by_pattern(self.alpha_pattern, path, self.alpha)

    @nn.nowrap
    def scaling_for(self, rank: int, alpha: float) -> float:
        """``alpha / rank``, or rsLoRA's ``alpha / sqrt(rank)``."""
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        layer: LayerInfo | None = None,
        output: jax.Array | None = None,
        deterministic: bool = True,
    ) -> jax.Array:
        if layer is None:
            layer = LayerInfo.dense(x.shape[-1], self.features or x.shape[-1])
        rank, alpha = self.rank_and_alpha(layer.path)
        scaling = 1.0 if self.use_gating else self.scaling_for(rank, alpha)
        self._check_layer(layer, rank)
        creating = self.is_mutable_collection("params") and not self.variables.get("params")
        if layer.kind == EMBED:
            delta = self._embedding(x, rank, scaling, layer)
            dropped, deterministic = x, True  # no dropout on token ids
        else:
            dropped = x
            if self.dropout > 0.0:
                dropped = nn.Dropout(self.dropout, name="dropout")(x, deterministic=deterministic)
            inits = self._residual_init(layer, rank, scaling) if creating and self.rewrites_base else None
            delta = self._linear(dropped, rank, scaling, layer, inits)
            if self.use_gating:
                delta = delta * self._gate(x, layer, delta.ndim)
        result = delta
        if self.use_dora:
            result = self._dora(dropped, layer, delta, output, scaling, deterministic or self.dropout == 0.0)
        if self.bias != "none":
            base_bias = _module_param(layer, "bias", "bias='lora_only'")
            bias = self.param("bias", lambda *_: base_bias.astype(self.param_dtype), base_bias.shape, self.param_dtype)
            # The difference is in the bias's own layout (an Einsum's follows its output axes, not its kernel's).
            broadcast = layer.output_vector(jnp.zeros(layer.out_features), result.ndim).shape
            result = result + (bias - base_bias).reshape(broadcast).astype(result.dtype)
        return result

    # ------------------------------------------------------------------ forward pieces

    @nn.nowrap
    def _check_layer(self, layer: LayerInfo, rank: int) -> None:
        if layer.kind == EMBED and self.use_gating:
            raise AdapterError(f"LoRA on the Embed at {layer.path!r}: use_gating needs a linear or conv layer")
        if layer.kind == EMBED and (self.lora_bias or self.bias != "none"):
            raise AdapterError(f"LoRA on the Embed at {layer.path!r}: an embedding has no bias (bias and lora_bias)")
        if layer.kind == EMBED and self.rewrites_base:
            raise AdapterError(f"LoRA on the Embed at {layer.path!r}: init {self.init_weights!r} supports linear layers only")
        if layer.kind == CONV:
            conv = layer.module
            groups = conv.feature_group_count
            if self.rewrites_base:
                raise AdapterError(f"LoRA on the Conv at {layer.path!r}: init {self.init_weights!r} supports linear layers only")
            if groups != 1 and (rank % groups or layer.out_features % groups):
                raise AdapterError(
                    f"LoRA on the grouped Conv at {layer.path!r} (feature_group_count={groups}): B is a grouped 1x1 "
                    f"convolution, as in PEFT, so the rank ({rank}) and the output channels ({layer.out_features}) "
                    f"must be multiples of {groups}"
                )
            if groups != 1 and self.use_dora:
                raise AdapterError(
                    f"DoRA on the grouped Conv at {layer.path!r}: the LoRA update of a grouped convolution is not "
                    f"grouped, so it has no weight norm in the layer's kernel"
                )

    @nn.nowrap
    def _inits(self, rank: int) -> tuple[Any, Any]:
        a_init = nn.initializers.normal(1.0 / rank) if self.init_weights == "gaussian" else torch_linear_init
        b_init = torch_linear_init if self.init_weights == "random" else nn.initializers.zeros
        return a_init, b_init

    def _gate(self, x: jax.Array, layer: LayerInfo, ndim: int) -> jax.Array:
        """AdapterHub's gate: ``mean over the positions of sigmoid(Linear(in, 1)(x))``, one per sample."""
        flat = x if layer.kind == CONV else layer.flatten_input(x)
        gate = nn.Dense(1, kernel_init=nn.initializers.normal(0.02), bias_init=torch_bias_init(flat.shape[-1]),
                        dtype=self.dtype, param_dtype=self.param_dtype, name="gate")(flat)
        gate = jnp.mean(jax.nn.sigmoid(gate), axis=tuple(range(1, gate.ndim)))
        if not self.is_mutable_collection("params"):  # not while init_adapters creates variables
            self.sow("intermediates", "gate_score", gate)
        return gate.reshape(gate.shape + (1,) * (ndim - 1))

    def _embedding(self, ids: jax.Array, rank: int, scaling: float, layer: LayerInfo) -> jax.Array:
        _, b_init = self._inits(rank)
        a = self.param("lora_embedding_a", b_init, (layer.in_features, rank), self.param_dtype)
        b = self.param("lora_embedding_b", nn.initializers.normal(1.0), (rank, layer.out_features), self.param_dtype)
        a, b = nn.dtypes.promote_dtype(a, b, dtype=self.dtype)
        return (jnp.take(a, ids, axis=0) @ b) * scaling

    def _linear(self, x: jax.Array, rank: int, scaling: float, layer: LayerInfo, inits: Any) -> jax.Array:
        a_init, b_init = self._inits(rank)
        if inits is not None:
            a0, b0 = inits
            a_init, b_init = (lambda *_: a0), (lambda *_: b0)
        if layer.kind == CONV:
            conv = layer.module
            h = nn.Conv(
                rank, conv.kernel_size, strides=conv.strides, padding=conv.padding,
                input_dilation=conv.input_dilation, kernel_dilation=conv.kernel_dilation, use_bias=False,
                kernel_init=a_init, dtype=self.dtype, param_dtype=self.param_dtype, name="lora_a",
            )(x)
            window = (1,) * len(conv.kernel_size)
            out = nn.Conv(layer.out_features, window, feature_group_count=conv.feature_group_count,
                          use_bias=self.lora_bias, kernel_init=b_init, dtype=self.dtype,
                          param_dtype=self.param_dtype, name="lora_b")(h)
            return out * scaling
        dense = lambda n, init, bias, name: nn.Dense(
            n, use_bias=bias, kernel_init=init, dtype=self.dtype, param_dtype=self.param_dtype, name=name
        )
        h = dense(rank, a_init, False, "lora_a")(layer.flatten_input(x))
        out = dense(layer.out_features, b_init, self.lora_bias, "lora_b")(h)
        return layer.unflatten_output(out) * scaling

    def _residual_init(self, layer: LayerInfo, rank: int, scaling: float) -> tuple[jax.Array, jax.Array]:
        """PiSSA's / OLoRA's A and B from the layer's weight; the weight is replaced by the residual."""
        name = layer.weight_name()
        kernel = _module_param(layer, name, f"init {self.init_weights!r}")
        a, b = residual_factors(self.init_weights, layer.kernel_matrix(kernel), rank, scaling, layer.path)
        residual = layer.kernel_matrix(kernel).astype(jnp.float32) - scaling * (a @ b)
        layer.module.put_variable("params", name, layer.matrix_kernel(residual.astype(kernel.dtype), kernel.shape))
        return a.astype(self.param_dtype), b.astype(self.param_dtype)

    def _dora(self, x, layer: LayerInfo, delta, output, scaling: float, reuse_output: bool) -> jax.Array:
        if output is None:
            raise AdapterError(
                f"DoRA at {layer.path!r} rescales the layer's output, which it was not given: use the "
                f"ParallelAdd strategy"
            )
        weight = _module_param(layer, layer.weight_name(), "DoRA")
        matrix = layer.kernel_matrix(weight).astype(jnp.float32)
        update = jax.lax.stop_gradient(scaling * lora_update(self.variables["params"], layer))
        norm = jnp.sqrt(jnp.sum(jnp.square(matrix + update), axis=0))
        magnitude = self.param("lora_magnitude", lambda *_: norm.astype(self.param_dtype), norm.shape, self.param_dtype)
        scale = magnitude.astype(jnp.float32) / jax.lax.stop_gradient(norm)
        has_bias = layer.kind != EMBED and layer.module.has_variable("params", "bias")
        if reuse_output:
            base = output
        else:  # PEFT's dropout path: the layer recomputed on the dropped input. A detached copy: calling
            # the bound layer again from inside its own call would re-enter it (and its adapters).
            base = layer.module.clone(parent=None).apply({"params": layer.module.variables["params"]}, x)
        if has_bias:
            base = base - layer.output_vector(layer.module.get_variable("params", "bias").reshape(-1), base.ndim)
        scale = layer.output_vector(scale, delta.ndim)
        return ((scale - 1.0) * base + scale * delta).astype(delta.dtype)

    # ------------------------------------------------------------------ merging

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
        """The layer's params with this adapter folded in (see :func:`jadapters.merge_adapters`).

        ``params`` are the layer's current params (earlier adapters already
        merged), ``original`` its params as the forward pass sees them,
        ``variables`` this adapter's variables.
        """
        _check_parallel(self, strategy)
        _check_ungated(self)
        name = layer.weight_name()
        rank, alpha = self.rank_and_alpha(layer.path)
        scaling = self.scaling_for(rank, alpha)
        update = scaling * lora_update(variables["params"], layer)
        merged = dict(params)
        if self.use_dora:
            base = layer.kernel_matrix(original[name]).astype(jnp.float32)
            norm = jnp.sqrt(jnp.sum(jnp.square(base + update), axis=0))
            scale = variables["params"]["lora_magnitude"].astype(jnp.float32) / norm
            matrix = (layer.kernel_matrix(params[name]).astype(jnp.float32) + update) * scale[None, :]
            merged[name] = layer.matrix_kernel(matrix, params[name].shape).astype(params[name].dtype)
        else:
            merged[name] = params[name] + _kernel_update(update, layer, params[name])
        if self.lora_bias and "bias" not in params:
            raise AdapterError(f"LoRA at {layer.path!r}: lora_bias=True cannot merge into a layer without a bias")
        bias_delta = self._bias_delta(variables["params"], layer, scaling, original)
        if bias_delta is not None:
            merged["bias"] = params["bias"] + bias_delta.astype(params["bias"].dtype)
        return merged

    @nn.nowrap
    def unmerge_from(
        self, params: Mapping[str, jax.Array], variables: Mapping[str, Any], layer: LayerInfo, *, strategy: Strategy
    ) -> dict:
        """The inverse of :meth:`merge_into` (float rounding aside); DoRA and ``bias='lora_only'`` cannot be undone."""
        _check_parallel(self, strategy)
        _check_ungated(self)
        if self.use_dora:
            raise AdapterError(
                "DoRA's merge cannot be undone from the merged weights: it divides by the norm of W + s B A, which "
                "the merged weights no longer hold (their norms are the magnitudes); keep the variables from before "
                "merge_adapters (they are unchanged)"
            )
        if self.bias != "none":
            raise AdapterError(
                "a LoRA with bias='lora_only' replaced the layer's bias, and the merged model no longer holds the "
                "original; keep the variables from before merge_adapters (they are unchanged)"
            )
        name = layer.weight_name()
        rank, alpha = self.rank_and_alpha(layer.path)
        scaling = self.scaling_for(rank, alpha)
        update = scaling * lora_update(variables["params"], layer)
        restored = dict(params)
        restored[name] = params[name] - _kernel_update(update, layer, params[name])
        bias_delta = self._bias_delta(variables["params"], layer, scaling, params)
        if bias_delta is not None:
            restored["bias"] = params["bias"] - bias_delta.astype(params["bias"].dtype)
        return restored

    @nn.nowrap
    def _bias_delta(self, p: Mapping[str, Any], layer: LayerInfo, scaling: float, original: Mapping[str, Any]):
        """What this adapter adds to the layer's bias, in the bias's layout (None: nothing)."""
        delta = None
        if self.bias != "none":
            delta = (p["bias"] - original["bias"]).astype(jnp.float32)
        if self.lora_bias:
            lora_b = _as_bias(scaling * p["lora_b"]["bias"].reshape(-1).astype(jnp.float32), layer, original["bias"])
            delta = lora_b if delta is None else delta + lora_b
        return delta


def _as_bias(delta: jax.Array, layer: LayerInfo, bias: jax.Array) -> jax.Array:
    """A per-output-feature vector in the layer's bias layout (an Einsum orders its bias as its output)."""
    return layer.output_vector(delta, bias.ndim).reshape(bias.shape)


def lora_update(p: Mapping[str, Any], layer: LayerInfo) -> jax.Array:
    """``B A`` of a LoRA's params as an ``(in_features, out_features)`` matrix (float32), unscaled.

    For a Conv, the update of its kernel flattened like :meth:`LayerInfo.kernel_matrix`.
    """
    if layer.kind == EMBED:
        return p["lora_embedding_a"].astype(jnp.float32) @ p["lora_embedding_b"].astype(jnp.float32)
    a = p["lora_a"]["kernel"].astype(jnp.float32)
    b = p["lora_b"]["kernel"].astype(jnp.float32)
    if layer.kind == CONV:
        if layer.module is not None and layer.module.feature_group_count != 1:
            raise AdapterError(
                f"LoRA on the grouped Conv at {layer.path!r}: its update is a full (ungrouped) convolution, which "
                f"cannot be folded into the layer's grouped kernel"
            )
        kernel = jnp.einsum("...ir,ro->...io", a, b.reshape(b.shape[-2], b.shape[-1]))
        return kernel.reshape(-1, kernel.shape[-1])
    return a @ b


def _kernel_update(update: jax.Array, layer: LayerInfo, kernel: jax.Array) -> jax.Array:
    return layer.matrix_kernel(update, kernel.shape).astype(kernel.dtype)


def _check_ungated(adapter: nn.Module) -> None:
    if adapter.use_gating:
        raise AdapterError(
            "a gated LoRA (use_gating=True) cannot be merged into the layer's weights: its gate, which replaces the "
            "scaling, depends on each input; keep it unmerged"
        )


def _check_parallel(adapter: nn.Module, strategy: Strategy) -> None:
    if not isinstance(strategy, ParallelAdd) or strategy.input_index != 0:
        raise AdapterError(
            f"{type(adapter).__name__} merges only with its ParallelAdd strategy (reading the layer's first "
            f"argument), got {strategy!r}"
        )


def _module_param(layer: LayerInfo, name: str, what: str) -> jax.Array:
    module = layer.module
    if module is None or not module.has_variable("params", name):
        raise AdapterError(
            f"{what} at {layer.path!r} needs the layer's parameter {name!r}, which "
            f"{type(module).__name__} does not have"
        )
    return module.get_variable("params", name)


def residual_factors(init: str, matrix: jax.Array, rank: int, scaling: float, path: str = "") -> tuple[jax.Array, jax.Array]:
    """PiSSA's or OLoRA's ``(A, B)`` kernels ``(in, r)`` and ``(r, out)`` for a weight ``matrix`` ``(in, out)``.

    PiSSA: with ``W^T = V S U^T`` (torch's ``(out, in)`` weight), ``A = sqrt(S_r / scaling) U_r^T``
    and ``B = V_r sqrt(S_r / scaling)``; OLoRA: ``W^T = Q R``, ``A = R_r``, ``B = Q_r``
    (PEFT's formulas, in Flax's transposed layout). Either way ``W - scaling * A B``
    is the residual. Signs of singular vectors may differ from torch's; the
    residual and ``A B`` do not.

    Example:
        >>> import jax.numpy as jnp
        >>> w = jnp.arange(12.0).reshape(4, 3)
        >>> a, b = residual_factors("pissa", w, 3, 1.0)
        >>> bool(jnp.allclose(a @ b, w, atol=1e-4))
        True
    """
    weight = matrix.astype(jnp.float32).T  # torch's (out, in)
    if rank > min(weight.shape):
        raise AdapterError(f"init {init!r} at {path!r}: rank {rank} exceeds min(in, out) = {min(weight.shape)}")
    if init == "pissa":
        v, s, uh = jnp.linalg.svd(weight, full_matrices=False)
        root = jnp.sqrt(s[:rank] / scaling)
        a_t, b_t = root[:, None] * uh[:rank], v[:, :rank] * root[None, :]
    else:
        q, r = jnp.linalg.qr(weight)
        a_t, b_t = r[:rank], q[:, :rank]
    return a_t.T, b_t.T


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


_INIT_NAMES = {True: "default", False: "random", "gaussian": "gaussian", "pissa": "pissa", "olora": "olora"}


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
        init_lora_weights: ``True`` (PEFT's default), ``"gaussian"``, ``"pissa"``, ``"olora"``
            (these two replace the targeted weights by a residual at init), or ``False``
            (random B: not identity at init).
        rank_pattern / alpha_pattern: ``{pattern: r}`` / ``{pattern: alpha}``, a regex matched
            against the end of the module path (PEFT's rule; ``.`` in names may be written as ``/``).
        use_dora: DoRA (a learned magnitude per output feature).
        bias: ``"none"`` or ``"lora_only"`` (the targeted layers' biases train, replacing the
            base biases). PEFT's ``"all"`` (every bias of the model) is refused: jadapters keeps an
            adapter to its targets.
        lora_bias: a bias on B, inside the scaled branch.
        use_gating: AdapterHub's gate (UniPELT's) in place of the scaling (then ``lora_alpha``
            has no effect); such a LoRA does not merge. PEFT has no such option.

    Example:
        >>> LoraConfig(r=4, target_modules=("query", "value")).lora_alpha
        8
        >>> LoraConfig(use_dora=True).adapter().use_dora
        True
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
    use_dora: bool = False
    bias: str = "none"
    lora_bias: bool = False
    use_gating: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, list):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        for name in ("rank_pattern", "alpha_pattern"):
            object.__setattr__(self, name, _pairs(getattr(self, name)))
        if self.bias == "all":
            raise ValueError(
                "bias='all' trains every bias of the model in PEFT; jadapters keeps an adapter to its targets: use "
                "bias='lora_only' (the targeted layers' biases)"
            )
        check_options("lora", [self.bias], ("none", "lora_only"), "bias")
        self.adapter()  # validates every field now

    def adapter(self) -> LoRA:
        init = self.init_lora_weights
        init = _INIT_NAMES.get(init.lower() if isinstance(init, str) else init)
        if init is None:
            raise ValueError(
                f"init_lora_weights must be True, False, 'gaussian', 'pissa' or 'olora', got {self.init_lora_weights!r}"
            )
        return LoRA(rank=self.r, alpha=float(self.lora_alpha), dropout=self.lora_dropout, use_rslora=self.use_rslora,
                    init_weights=init, rank_pattern=self.rank_pattern, alpha_pattern=self.alpha_pattern,
                    use_dora=self.use_dora, bias=self.bias, lora_bias=self.lora_bias, use_gating=self.use_gating)

    def place(self, placement: Any, where: tuple[str, ...] | None = None) -> Placed:
        return place_on_layers(self, placement, where)


def place_on_layers(config: Any, placement: Any, where: tuple[str, ...] | None) -> Placed:
    """Where a LoRA-like config (``target_modules``, ``adapter()``) goes: on ``where`` if given, else on
    its ``target_modules`` (roles, names or paths), else on the preset's default LoRA roles."""
    if where is not None:
        return Placed((), where, config.adapter(), ParallelAdd())
    if config.target_modules is None:
        roles, targets = resolve_roles(placement, default_lora_roles(placement), config.method, roles_only=True)
    else:
        entries = (config.target_modules,) if isinstance(config.target_modules, str) else config.target_modules
        roles, targets = resolve_roles(placement, entries, config.method, roles_only=False)
    return Placed(roles, targets, config.adapter(), ParallelAdd())


@register_method("dora")
def dora(**overrides: Any) -> LoraConfig:
    """``"dora"``: LoRA with DoRA's magnitude (``LoraConfig(use_dora=True)``).

    Example:
        >>> from jadapters.configs import parse_method
        >>> parse_method("dora[r=4]").use_dora
        True
    """
    return LoraConfig(use_dora=True, **overrides)


def residual_to_lora(
    adapted: Any, variables: Mapping[str, Any], initial: Mapping[str, Any], base: Mapping[str, Any], name: Any = None
) -> tuple[Any, dict]:
    """A trained PiSSA/OLoRA adapter as a plain LoRA of rank 2r on the ORIGINAL weights, as PEFT saves it.

    PiSSA and OLoRA train ``W_res + s B A`` where ``W = W_res + s B0 A0``; the
    same model is ``W + s [B | -B0] [A ; A0]``: a LoRA of rank ``2r`` (and alpha
    doubled, or times sqrt(2) with rsLoRA, so the scaling is unchanged) that
    applies to the original ``W`` and can be shared like any LoRA.

    Args:
        adapted: the adapted model.
        variables: its trained variables (residual weights and trained A, B).
        initial: what :func:`jadapters.init_adapters` returned (A0, B0).
        base: the original base variables (those passed to ``init_adapters``).
        name: the adapter(s) to convert; None: every LoRA with a residual init.

    Returns:
        ``(adapted, variables)``: the converted adapters (plain init, rank 2r) on ``base``'s
        weights; other adapters keep their variables.
    """
    from jadapters.transform import AdaptedModule

    if not isinstance(adapted, AdaptedModule):
        raise AdapterError(f"residual_to_lora expects an AdaptedModule, got {type(adapted).__name__}")
    candidates = [s for s in adapted.adapters if isinstance(s.adapter, LoRA) and s.adapter.rewrites_base]
    names = [s.name for s in candidates] if name is None else sorted(adapted._resolve_names(name))
    specs = {s.name: s for s in adapted.adapters}
    for n in names:
        if n not in {s.name for s in candidates}:
            raise AdapterError(f"adapter {n!r} is not a LoRA with a 'pissa' or 'olora' init; nothing to convert")
        if specs[n].adapter.use_dora:
            raise AdapterError(f"adapter {n!r}: a DoRA adapter cannot be converted to a plain LoRA")
    if not names:
        raise AdapterError(f"no LoRA with a 'pissa' or 'olora' init to convert; the model has {adapted.adapter_names()}")
    from jadapters.tree import merge_trees, split_adapters

    trained, _ = split_adapters(variables)
    starting, _ = split_adapters(initial)
    _, base_only = split_adapters(base)

    def convert(tree, start, path=()):
        out = {}
        for key, sub in tree.items():
            here = path + (key,)
            if isinstance(sub, Mapping):
                out[key] = convert(sub, start[key], here)
            elif here[-2:] == ("lora_a", "kernel") and _owner(here) in names:
                out[key] = jnp.concatenate([sub, start[key]], axis=-1)
            elif here[-2:] == ("lora_b", "kernel") and _owner(here) in names:
                out[key] = jnp.concatenate([sub, -start[key]], axis=-2)
            else:
                out[key] = sub
        return out

    converted = convert(trained, starting)
    factor = math.sqrt(2.0)
    new_specs = []
    for spec in adapted.adapters:
        if spec.name in names:
            lora = spec.adapter
            grow = factor if lora.use_rslora else 2.0
            adapter = lora.clone(
                rank=2 * lora.rank, alpha=grow * lora.alpha, init_weights="default",
                rank_pattern=tuple((p, 2 * r) for p, r in lora.rank_pattern),
                alpha_pattern=tuple((p, grow * a) for p, a in lora.alpha_pattern),
            )
            config = spec.config
            if isinstance(config, LoraConfig):
                config = dataclasses.replace(
                    config, r=2 * config.r, lora_alpha=grow * config.lora_alpha, init_lora_weights=True,
                    rank_pattern=adapter.rank_pattern, alpha_pattern=adapter.alpha_pattern,
                )
            spec = dataclasses.replace(spec, adapter=adapter, config=config)
        new_specs.append(spec)
    return adapted.clone(adapters=tuple(new_specs)), merge_trees(base_only, converted)


def _owner(path: tuple[str, ...]) -> str | None:
    from jadapters.tree import adapter_name_at

    return adapter_name_at(path)
