"""AdapterHub's bottleneck adapters and Compacter: the network, its PHM layer, and the method configs.

:class:`Bottleneck` is AdapterHub's ``Adapter``: ``[LayerNorm] -> down ->
non-linearity -> up -> * scaling -> dropout [* gate]``, plus a residual that
the caller passes in, where ``down`` and ``up`` are Dense layers or
:class:`PHMLayer` (Compacter). Its variables carry AdapterHub's names
(``adapter_down``, ``adapter_up``, ``gate``, ``scaling``, ``W_left``, ...).

:class:`BnConfig` and its presets (``"seq_bn"``, ``"double_seq_bn"``,
``"par_bn"``, ``"scaled_par_bn"``, ``"compacter"``, ``"compacter++"``, and the
old names ``"pfeiffer"`` and ``"houlsby"``) take AdapterHub's field names and
place the adapter inside the model's attention and feed-forward sub-blocks
through the preset's sites (:class:`jadapters.blocks.ResidualBlock`), where
:class:`jadapters.blocks.InResidualBlock` runs it as AdapterHub does.

Initialisation follows AdapterHub, so most configurations are NOT zero at
init: ``"bert"`` (the default) draws both projections from N(0, 0.02),
``"houlsby"`` from a normal truncated at two standard deviations of 0.01;
``"mam_adapter"`` (``par_bn``'s) zeroes the up projection, so the adapter
starts as identity. PHM layers always use their own initialisation.

Compacter's PHM rule is shared by every layer (``shared_phm_rule``): it lives
once per adapter at the model's root, ``<root>/__adapters__/<name>/__shared__/``,
outside any ``nn.scan`` (never stacked per layer); the adapted model computes it
once per call and every placement reads it, so training updates it once,
with the gradient of every layer, and checkpoints save it with the adapter.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from jadapters.adapters.activations import get_activation
from jadapters.adapters.linear import layer_norm, torch_linear_init
from jadapters.blocks import InResidualBlock, check_joining
from jadapters.checks import check_dropout, check_finite, check_positive_int, check_probability
from jadapters.configs import MethodConfig, Placed, register_method
from jadapters.errors import AdapterError
from jadapters.presets import ATTENTION_BLOCK, CROSS_ATTENTION_BLOCK, FFN_BLOCK
from jadapters.registry import register_adapter
from jadapters.strategies import ResidualAdd, Strategy

#: AdapterHub's initialisations of the down and up projections.
INIT_WEIGHTS = ("bert", "mam_adapter", "houlsby")
#: Learned scalings: one scalar, or one per channel.
LEARNED_SCALINGS = ("learned", "channel")
#: Distributions of the PHM weights W.
PHM_W_INITS = ("glorot-normal", "glorot-uniform", "normal", "phm")
PHM_RULE_INITS = ("normal", "uniform")

#: The collection that holds a PHM rule that does not learn (``learn_phm=False``): never trained.
CONSTANTS = "adapter_constants"

_bert_init = nn.initializers.normal(0.02)
_houlsby_init = nn.initializers.truncated_normal(0.01, lower=-2.0, upper=2.0)


def _torch_bias_init(fan_in: int):
    """PyTorch's default Linear bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / fan_in**0.5
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def _phm_w_init(name: str, init_range: float):
    if name == "normal":
        return nn.initializers.normal(init_range)
    # Glorot over each of the phm_dim matrices (axis 0 is a batch axis).
    distribution = "uniform" if name == "glorot-uniform" else "untruncated_normal"
    return nn.initializers.variance_scaling(1.0, "fan_avg", distribution, batch_axis=(0,))


def _uniform(bound: float):
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def _check_phm_options(owner: Any) -> None:
    check_positive_int("phm_dim", owner.phm_dim)
    check_positive_int("phm_rank", owner.phm_rank)
    check_finite("phm_init_range", owner.phm_init_range)
    if owner.phm_c_init not in PHM_RULE_INITS:
        raise ValueError(f"phm_c_init must be one of {PHM_RULE_INITS}, got {owner.phm_c_init!r}")
    if owner.hypercomplex_nonlinearity not in PHM_W_INITS:
        raise ValueError(f"hypercomplex_nonlinearity must be one of {PHM_W_INITS}, got {owner.hypercomplex_nonlinearity!r}")


def _rule(module: nn.Module, d: int, factorized: bool, init: Any, learn: bool, param_dtype: Any) -> jax.Array:
    """A PHM rule (d, d, d): ``phm_rule``, or ``phm_rule_left`` (d, d, 1) @ ``phm_rule_right`` (d, 1, d)."""

    def get(name: str, shape: tuple[int, ...]) -> jax.Array:
        if learn:
            return module.param(name, init, shape, param_dtype)
        # A rule that does not learn is no parameter: a collection that training never touches.
        return module.variable(CONSTANTS, name, lambda: init(module.make_rng("params"), shape, param_dtype)).value

    if factorized:
        return jnp.matmul(get("phm_rule_left", (d, d, 1)), get("phm_rule_right", (d, 1, d)))
    return get("phm_rule", (d, d, d))


class PHMRule(nn.Module):
    """The PHM rule that every :class:`PHMLayer` of one Compacter adapter shares (AdapterHub's shared parameters).

    Initialised from N(0, ``phm_init_range``) (``phm_c_init='normal'``) or
    U(-1, 1) (``'uniform'``), as AdapterHub does; with ``learn_phm=False`` it
    lives in the ``'adapter_constants'`` collection, which training never changes.

    Example:
        >>> import jax
        >>> rule = PHMRule(phm_dim=4)
        >>> rule.apply(rule.init(jax.random.key(0))).shape
        (4, 4, 4)
    """

    phm_dim: int = 4
    factorized_phm_rule: bool = False
    phm_c_init: str = "normal"
    phm_init_range: float = 1e-4
    learn_phm: bool = True
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self) -> jax.Array:
        init = nn.initializers.normal(self.phm_init_range) if self.phm_c_init == "normal" else _uniform(1.0)
        return _rule(self, self.phm_dim, self.factorized_phm_rule, init, self.learn_phm, self.param_dtype)


@register_adapter
class PHMLayer(nn.Module):
    """Compacter's parameterised hypercomplex multiplication: ``y = x @ H + b``, ``H = sum_i kron(rule_i, W_i)``.

    ``rule`` is ``(phm_dim, phm_dim, phm_dim)``; ``W_i`` is
    ``(in / phm_dim, features / phm_dim)``, factorised as ``W_left[i] @
    W_right[i]`` of rank ``phm_rank`` (``factorized_phm_W``), so ``H`` is
    ``(in, features)``: Flax's kernel layout, as AdapterHub stores it. The
    rule is the ``rule`` argument (shared across layers), or the layer's own
    (``shared_phm_rule=False``; then drawn from N(0, 0.01) or U(-0.01, 0.01),
    AdapterHub's per-layer initialisation). ``W`` is drawn per
    ``hypercomplex_nonlinearity``: ``'glorot-normal'`` (or ``'phm'``),
    ``'glorot-uniform'``, or ``'normal'`` (std ``phm_init_range``); the bias
    starts at zero. (AdapterHub 1.3 draws glorot-normal for every value of
    ``hypercomplex_nonlinearity``: its test is the truthiness of the string.)

    Example:
        >>> import jax, jax.numpy as jnp
        >>> layer = PHMLayer(features=8, shared_phm_rule=False)
        >>> x = jnp.ones((2, 12))
        >>> layer.apply(layer.init(jax.random.key(0), x), x).shape
        (2, 8)
    """

    features: int
    phm_dim: int = 4
    phm_rank: int = 1
    factorized_phm_W: bool = True
    shared_phm_rule: bool = True
    factorized_phm_rule: bool = False
    phm_c_init: str = "normal"
    phm_init_range: float = 1e-4
    hypercomplex_nonlinearity: str = "glorot-uniform"
    phm_bias: bool = True
    learn_phm: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def __post_init__(self) -> None:
        check_positive_int("features", self.features)
        _check_phm_options(self)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, rule: jax.Array | None = None) -> jax.Array:
        d, in_features = self.phm_dim, x.shape[-1]
        for what, size in (("input width", in_features), ("features", self.features)):
            if size % d:
                raise ValueError(f"PHMLayer: the {what} {size} is not divisible by phm_dim {d}")
        a, b = in_features // d, self.features // d
        w_init = _phm_w_init(self.hypercomplex_nonlinearity, self.phm_init_range)
        if self.factorized_phm_W:
            left = self.param("W_left", w_init, (d, a, self.phm_rank), self.param_dtype)
            right = self.param("W_right", w_init, (d, self.phm_rank, b), self.param_dtype)
            w = jnp.matmul(left, right)
        else:
            w = self.param("W", w_init, (d, a, b), self.param_dtype)
        if self.shared_phm_rule:
            if rule is None:
                raise ValueError("PHMLayer with shared_phm_rule=True needs the shared rule: pass rule=")
        else:
            init = nn.initializers.normal(0.01) if self.phm_c_init == "normal" else _uniform(0.01)
            rule = _rule(self, d, self.factorized_phm_rule, init, self.learn_phm, self.param_dtype)
        rule, w = nn.dtypes.promote_dtype(rule, w, dtype=self.dtype)
        # kron(rule_i, W_i)[r * a + i, c * b + j] = rule_i[r, c] * W_i[i, j], summed over i.
        kernel = jnp.einsum("krc,kij->ricj", rule, w).reshape(d * a, d * b)
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
        y = x @ kernel
        if self.phm_bias:
            y = y + self.param("b", nn.initializers.zeros, (self.features,), self.param_dtype).astype(y.dtype)
        return y


@register_adapter
class Bottleneck(nn.Module):
    """AdapterHub's bottleneck adapter: ``[LN] -> down -> act -> up -> * scaling -> dropout [* gate]``, plus ``residual``.

    The bottleneck width is ``max(1, int(width // reduction_factor))`` with
    the width read from the input. In order, on input ``x``:

    1. ``ln_before``: a LayerNorm of its own (PyTorch's);
    2. ``adapter_down`` (Dense, or :class:`PHMLayer` with ``phm_layer``), the
       ``non_linearity`` (AdapterHub's names: relu, swish, gelu, gelu_new, tanh, ...);
    3. ``adapter_up``; stochastic depth in training (one Bernoulli(1 - p) per
       sample, rescaled by 1 / (1 - p); AdapterHub skips it on parallel
       adapters, here it applies to every placement);
    4. ``* scaling``: a number, ``'learned'`` (a scalar parameter, 1 at init)
       or ``'channel'`` (one per channel); then dropout;
    5. ``use_gating``: ``* mean(sigmoid(gate(x)))``, the mean over the
       positions (every axis between the batch and the features), padding
       included, as AdapterHub does; the per-sample gate is sown as
       ``intermediates/.../gate_score`` (apply with ``mutable=['intermediates']``);
    6. ``residual`` (if given) added before (``adapter_residual_before_ln``) or
       after ``ln_after``, a LayerNorm of its own.

    ``init_weights``: ``'bert'`` (N(0, 0.02) weights, zero biases),
    ``'mam_adapter'`` (Kaiming-uniform down, zero up: identity at init), or
    ``'houlsby'`` (truncated normal, std 0.01, zero biases). Placed by
    :class:`BnConfig`, it runs inside the model's residual blocks; on its own
    its default strategy is :class:`jadapters.ResidualAdd`, ``value + A(value)``.
    Used outside an adapted model, a Compacter's shared rule is created locally.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> adapter = Bottleneck(reduction_factor=4, init_weights="mam_adapter")
        >>> x = jnp.ones((2, 5, 8))
        >>> variables = adapter.init(jax.random.key(0), x)
        >>> variables["params"]["adapter_down"]["kernel"].shape
        (8, 2)
        >>> float(abs(adapter.apply(variables, x)).max())
        0.0
    """

    reduction_factor: float = 16
    non_linearity: str = "relu"
    ln_before: bool = False
    ln_after: bool = False
    adapter_residual_before_ln: bool = False
    scaling: float | str = 1.0
    init_weights: str = "bert"
    dropout: float = 0.0
    stochastic_depth: float = 0.0
    use_gating: bool = False
    phm_layer: bool = False
    phm_dim: int = 4
    phm_rank: int = 1
    factorized_phm_W: bool = True
    shared_phm_rule: bool = True
    factorized_phm_rule: bool = False
    phm_c_init: str = "normal"
    phm_init_range: float = 1e-4
    hypercomplex_nonlinearity: str = "glorot-uniform"
    phm_bias: bool = True
    learn_phm: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def __post_init__(self) -> None:
        rf = self.reduction_factor
        if isinstance(rf, bool) or not isinstance(rf, (int, float)) or not rf > 0:
            raise ValueError(f"reduction_factor must be a number > 0, got {rf!r}")
        check_finite("reduction_factor", rf)
        get_activation(str(self.non_linearity).lower())
        if self.init_weights not in INIT_WEIGHTS:
            raise ValueError(f"init_weights must be one of {INIT_WEIGHTS}, got {self.init_weights!r}")
        if isinstance(self.scaling, str):
            if self.scaling not in LEARNED_SCALINGS:
                raise ValueError(f"scaling must be a number, 'learned' or 'channel', got {self.scaling!r}")
        else:
            check_finite("scaling", self.scaling)
        check_dropout(self.dropout)
        check_probability("stochastic_depth", self.stochastic_depth)
        if self.phm_layer:
            _check_phm_options(self)
            if self.init_weights != "bert":
                raise ValueError(
                    f"init_weights={self.init_weights!r} initialises Dense projections; PHM layers (phm_layer=True) "
                    f"use phm_c_init, phm_init_range and hypercomplex_nonlinearity: use init_weights='bert' "
                    f"(AdapterHub fails on this combination too)"
                )
        super().__post_init__()

    @nn.nowrap
    def default_strategy(self) -> Strategy:
        return ResidualAdd()

    @nn.nowrap
    def shared_module(self) -> nn.Module | None:
        """The module whose variables every placement shares: Compacter's PHM rule, else None."""
        if not (self.phm_layer and self.shared_phm_rule):
            return None
        return PHMRule(self.phm_dim, self.factorized_phm_rule, self.phm_c_init, self.phm_init_range, self.learn_phm,
                       self.param_dtype, parent=None)

    def _projection(self, features: int, name: str, up: bool, rule: jax.Array | None):
        def apply(x: jax.Array) -> jax.Array:
            if self.phm_layer:
                return PHMLayer(
                    features, self.phm_dim, self.phm_rank, self.factorized_phm_W, self.shared_phm_rule,
                    self.factorized_phm_rule, self.phm_c_init, self.phm_init_range, self.hypercomplex_nonlinearity,
                    self.phm_bias, self.learn_phm, self.dtype, self.param_dtype, name=name,
                )(x, rule)
            kernel_init = {"bert": _bert_init, "houlsby": _houlsby_init}.get(self.init_weights)
            if kernel_init is None:  # mam_adapter
                kernel_init = nn.initializers.zeros if up else torch_linear_init
            return nn.Dense(features, kernel_init=kernel_init, dtype=self.dtype, param_dtype=self.param_dtype,
                            name=name)(x)

        return apply

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        residual: jax.Array | None = None,
        shared: jax.Array | None = None,
        deterministic: bool = True,
    ) -> jax.Array:
        width = x.shape[-1]
        rule = shared
        if rule is None and self.phm_layer and self.shared_phm_rule:
            rule = self.shared_module().clone(parent=self, name="shared")()
        h = x
        if self.ln_before:
            h = layer_norm("adapter_norm_before", self.dtype, self.param_dtype)(h)
        h = self._projection(max(1, int(width // self.reduction_factor)), "adapter_down", False, rule)(h)
        h = get_activation(str(self.non_linearity).lower())(h)
        out = self._projection(width, "adapter_up", True, rule)(h)
        if self.stochastic_depth > 0.0 and not deterministic:
            keep = 1.0 - self.stochastic_depth
            noise = jax.random.bernoulli(self.make_rng("dropout"), keep, (out.shape[0],) + (1,) * (out.ndim - 1))
            out = out * noise.astype(out.dtype) / (keep if keep > 0.0 else 1.0)
        scaling = self._scaling(width).astype(out.dtype) if isinstance(self.scaling, str) else self.scaling
        out = out * scaling
        if self.dropout > 0.0:
            out = nn.Dropout(self.dropout, name="dropout")(out, deterministic=deterministic)
        if self.use_gating:
            out = out * self._gate(x, width)
        if residual is not None and self.adapter_residual_before_ln:
            out = out + residual
        if self.ln_after:
            out = layer_norm("adapter_norm_after", self.dtype, self.param_dtype)(out)
        if residual is not None and not self.adapter_residual_before_ln:
            out = out + residual
        return out

    def _scaling(self, width: int) -> jax.Array:
        shape = (1,) if self.scaling == "learned" else (width,)
        return self.param("scaling", nn.initializers.ones, shape, self.param_dtype)

    def _gate(self, x: jax.Array, width: int) -> jax.Array:
        if self.init_weights == "houlsby":  # AdapterHub leaves the gate at PyTorch's default there
            inits = {"kernel_init": torch_linear_init, "bias_init": _torch_bias_init(width)}
        else:
            inits = {"kernel_init": _bert_init}
        gate = jax.nn.sigmoid(nn.Dense(1, dtype=self.dtype, param_dtype=self.param_dtype, name="gate", **inits)(x))
        gate = jnp.mean(gate, axis=tuple(range(1, x.ndim - 1)), keepdims=True)
        if not self.is_mutable_collection("params"):  # not while init_adapters creates variables
            self.sow("intermediates", "gate_score", gate.reshape(gate.shape[0]))
        return gate


@dataclasses.dataclass(frozen=True)
class BnConfig(MethodConfig):
    """A bottleneck adapter with AdapterHub's ``BnConfig`` fields, placed as AdapterHub places it.

    Where it goes: ``mh_adapter`` (after the attention, the preset's site
    ``'attention_block'``), ``output_adapter`` (after the feed-forward,
    ``'ffn_block'``), ``cross_adapter`` (after a decoder's cross-attention,
    ``'cross_attention_block'``); a site the model's preset lacks is an error
    naming it. ``leave_out`` lists layer numbers to skip (on T5 each stack
    counts from 0: AdapterHub numbers the decoder's blocks after the encoder's).

    How it joins the block (:class:`jadapters.blocks.InResidualBlock`):
    ``original_ln_before``, ``original_ln_after``, ``residual_before_ln``
    (True, False or ``'post_add'``), ``is_parallel``. What it is
    (:class:`Bottleneck`): ``reduction_factor``, ``non_linearity``,
    ``ln_before``, ``ln_after``, ``adapter_residual_before_ln``, ``scaling``,
    ``init_weights``, ``dropout``, ``stochastic_depth``, ``use_gating`` and the
    PHM fields (``phm_layer``, ``phm_dim``, ``phm_rank``, ``shared_phm_rule``,
    ``factorized_phm_rule``, ``factorized_phm_W``, ``phm_c_init``,
    ``phm_init_range``, ``learn_phm``, ``hypercomplex_nonlinearity``,
    ``phm_bias``). Not supported, an error when set: ``shared_W_phm``,
    ``inv_adapter`` (invertible adapters) and a per-layer mapping as
    ``reduction_factor``. ``init_weights_seed`` is accepted and unused: JAX
    draws from the key given to ``init_adapters``. The presets are
    :class:`SeqBnConfig`, :class:`DoubleSeqBnConfig`, :class:`ParBnConfig`,
    :class:`CompacterConfig` and :class:`CompacterPlusPlusConfig`.

    Example:
        >>> from jadapters.configs import parse_method
        >>> config = parse_method("seq_bn[reduction_factor=8,non_linearity='gelu']")
        >>> type(config).__name__, config.reduction_factor, config.original_ln_before
        ('SeqBnConfig', 8, True)
        >>> parse_method("scaled_par_bn").scaling
        'learned'
    """

    method: ClassVar[str] = "bottleneck"
    mh_adapter: bool = False
    output_adapter: bool = True
    reduction_factor: float = 16
    non_linearity: str = "relu"
    original_ln_before: bool = False
    original_ln_after: bool = True
    ln_before: bool = False
    ln_after: bool = False
    init_weights: str = "bert"
    init_weights_seed: int | None = None
    is_parallel: bool = False
    scaling: float | str = 1.0
    use_gating: bool = False
    residual_before_ln: bool | str = True
    adapter_residual_before_ln: bool = False
    inv_adapter: str | None = None
    inv_adapter_reduction_factor: float | None = None
    cross_adapter: bool = False
    leave_out: tuple[int, ...] = ()
    dropout: float = 0.0
    phm_layer: bool = False
    phm_dim: int = 4
    factorized_phm_W: bool = True
    shared_W_phm: bool = False
    shared_phm_rule: bool = True
    factorized_phm_rule: bool = False
    phm_c_init: str = "normal"
    phm_init_range: float = 1e-4
    learn_phm: bool = True
    hypercomplex_nonlinearity: str = "glorot-uniform"
    phm_rank: int = 1
    phm_bias: bool = True
    stochastic_depth: float = 0.0

    def __post_init__(self) -> None:
        leave_out = self.leave_out
        if isinstance(leave_out, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                       for i in leave_out):
            object.__setattr__(self, "leave_out", tuple(sorted(set(leave_out))))
        else:
            raise ValueError(f"leave_out must be a list of layer numbers (ints >= 0), got {leave_out!r}")
        if isinstance(self.reduction_factor, dict):
            raise ValueError("reduction_factor as a per-layer mapping is not supported; give one number")
        if self.inv_adapter is not None:
            raise ValueError(f"invertible adapters (inv_adapter={self.inv_adapter!r}) are not supported")
        if self.shared_W_phm:
            raise ValueError("shared_W_phm=True (one PHM weight for every layer) is not supported")
        if not (self.mh_adapter or self.output_adapter or self.cross_adapter):
            raise ValueError("the adapter goes nowhere: set mh_adapter, output_adapter or cross_adapter")
        self.adapter()
        check_joining(*self._joining())

    def adapter(self) -> Bottleneck:
        """The adapter network this config describes."""
        return Bottleneck(
            reduction_factor=self.reduction_factor, non_linearity=str(self.non_linearity).lower(),
            ln_before=self.ln_before, ln_after=self.ln_after, adapter_residual_before_ln=self.adapter_residual_before_ln,
            scaling=self.scaling, init_weights=self.init_weights, dropout=self.dropout,
            stochastic_depth=self.stochastic_depth, use_gating=self.use_gating, phm_layer=self.phm_layer,
            phm_dim=self.phm_dim, phm_rank=self.phm_rank, factorized_phm_W=self.factorized_phm_W,
            shared_phm_rule=self.shared_phm_rule, factorized_phm_rule=self.factorized_phm_rule,
            phm_c_init=self.phm_c_init, phm_init_range=self.phm_init_range,
            hypercomplex_nonlinearity=self.hypercomplex_nonlinearity, phm_bias=self.phm_bias, learn_phm=self.learn_phm,
        )

    def _joining(self) -> tuple:
        return self.original_ln_before, self.original_ln_after, self.residual_before_ln, self.is_parallel

    @property
    def site_names(self) -> tuple[str, ...]:
        """The preset sites the adapter goes to, in AdapterHub's order."""
        wanted = ((ATTENTION_BLOCK, self.mh_adapter), (CROSS_ATTENTION_BLOCK, self.cross_adapter),
                  (FFN_BLOCK, self.output_adapter))
        return tuple(name for name, on in wanted if on)

    def place(self, placement: Any, where: tuple[str, ...] | None = None) -> Placed:
        sites = tuple((name, placement.site(name, self.method)) for name in self.site_names)
        strategy = InResidualBlock(sites, *self._joining())
        if where is not None:
            if self.leave_out:
                raise AdapterError(
                    f"method {self.method!r}: leave_out applies where the method places itself; with explicit "
                    f"targets, leave those layers out of the targets"
                )
            return Placed((), where, self.adapter(), strategy)
        try:
            targets = tuple(dict.fromkeys(t for _, site in sites for t in site.targets(self.leave_out)))
        except ValueError as e:
            raise AdapterError(f"method {self.method!r} on the preset {placement.preset or 'none'!r}: {e}") from None
        return Placed((), targets, self.adapter(), strategy)


@register_method("seq_bn")
@register_method("pfeiffer")
@dataclasses.dataclass(frozen=True)
class SeqBnConfig(BnConfig):
    """Pfeiffer et al.'s adapter (``"seq_bn"``): after the feed-forward, the block's LayerNorm before and after it.

    On a post-LN block: ``LN(h + x + A(LN(h + x)))``.
    """

    method: ClassVar[str] = "seq_bn"
    original_ln_before: bool = True
    original_ln_after: bool = True
    residual_before_ln: bool | str = True
    mh_adapter: bool = False
    output_adapter: bool = True
    non_linearity: str = "relu"
    reduction_factor: float = 16


@register_method("double_seq_bn")
@register_method("houlsby")
@dataclasses.dataclass(frozen=True)
class DoubleSeqBnConfig(BnConfig):
    """Houlsby et al.'s adapters (``"double_seq_bn"``): after the attention and after the feed-forward.

    On a post-LN block: ``LN(h + x + A(h))``.
    """

    method: ClassVar[str] = "double_seq_bn"
    original_ln_before: bool = False
    original_ln_after: bool = True
    residual_before_ln: bool | str = True
    mh_adapter: bool = True
    output_adapter: bool = True
    non_linearity: str = "swish"
    reduction_factor: float = 16


@register_method("par_bn")
@dataclasses.dataclass(frozen=True)
class ParBnConfig(BnConfig):
    """He et al.'s parallel adapter (``"par_bn"``; ``"scaled_par_bn"`` learns the scaling): ``LN(h + x + 4 A(x))``."""

    method: ClassVar[str] = "par_bn"
    original_ln_before: bool = False
    original_ln_after: bool = True
    mh_adapter: bool = False
    output_adapter: bool = True
    non_linearity: str = "relu"
    reduction_factor: float = 2
    init_weights: str = "mam_adapter"
    is_parallel: bool = True
    scaling: float | str = 4.0


register_method("scaled_par_bn", functools.partial(ParBnConfig, scaling="learned"))


@register_method("compacter")
@dataclasses.dataclass(frozen=True)
class CompacterConfig(DoubleSeqBnConfig):
    """Compacter (``"compacter"``): Houlsby's placement with PHM projections, width // 32, gelu."""

    method: ClassVar[str] = "compacter"
    phm_layer: bool = True
    reduction_factor: float = 32
    non_linearity: str = "gelu"


@register_method("compacter++")
@dataclasses.dataclass(frozen=True)
class CompacterPlusPlusConfig(SeqBnConfig):
    """Compacter++ (``"compacter++"``): Pfeiffer's placement with PHM projections, width // 32, gelu."""

    method: ClassVar[str] = "compacter++"
    phm_layer: bool = True
    reduction_factor: float = 32
    non_linearity: str = "gelu"
