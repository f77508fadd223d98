"""Prefix tuning: learned keys and values that every attention layer attends to before the sequence.

Li & Liang's method as PEFT and AdapterHub implement it. Each attention layer
gets ``P`` keys and values of its own, prepended to its key and value
projections' outputs along the sequence axis, with attend-everywhere entries
in its mask; the layer's output keeps its shape. Where an attention layer is
and how it takes its mask is an :class:`jadapters.sites.AttentionSite` of the
model's preset.

During training the keys and values may come from a reparametrisation, an
MLP ``embedding (P, width) -> Linear -> tanh -> Linear (2 * features)``;
:func:`fold_prefix_tuning` replaces it by the keys and values it computes (what
PEFT saves, AdapterHub's ``eject_prefix_tuning``). jadapters keeps one MLP per
attention layer, so that layers inside ``nn.scan`` get stacked params;
PEFT and AdapterHub share the embedding and the first Linear between layers
and split the last Linear's output. Their trained weights load exactly (copy
the shared part into every layer, split the last Linear by layer); training
from scratch updates the copies separately.

Two semantics, chosen by ``PrefixTuningConfig(style=...)``:

* ``"peft"`` (default): the prefix acts as a cache of ``P`` tokens, so where
  the model's :class:`jadapters.sites.EmbeddingSite` names position embeddings the
  real tokens' position ids are shifted by ``P`` (Hugging Face's BERT and
  GPT-2 count positions from the cache length), and token-type ids are
  dropped (zeros), as PEFT does. Flat keys and values by default.
* ``"adapterhub"``: positions unchanged; reparametrised by default (bottleneck 512).

Gating (AdapterHub's ``use_gating``, UniPELT's): a gate ``Linear(width, 1)`` (2
outputs without ``shared_gating``: one for the keys, one for the values) reads
the attention layer's input; ``g = mean over the positions of sigmoid(gate(x))``,
one per sample, multiplies the prefix keys and values. Sown as
``intermediates/.../gate_score`` (apply with ``mutable=['intermediates']``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jadapters.adapters.activations import get_activation
from jadapters.adapters.linear import torch_linear_init
from jadapters.checks import check_dropout, check_positive_int
from jadapters.configs import MethodConfig, Placed, check_options, register_method, resolve_alias
from jadapters.context import AdapterContext
from jadapters.errors import AdapterError
from jadapters.naming import path_matches
from jadapters.registry import register_adapter, register_strategy
from jadapters.sites import (
    ATTENTION, CROSS_ATTENTION, EMBEDDINGS, STYLES, AttentionSite, EmbeddingSite, adapter_length, insert_ones, run_hooked,
)
from jadapters.strategies import AdapterFn, Strategy
from jadapters.tree import ADAPTERS_KEY

def torch_bias_init(fan_in: int):
    """PyTorch's Linear bias initialisation, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


@register_adapter
class PrefixTuning(nn.Module):
    """The prefix of one attention layer: ``__call__(features, width) -> (keys, values)``, each ``(length, features)``.

    ``features`` is the width of the layer's key projection output (all heads,
    flattened); ``width`` that of the layer's input, which the
    reparametrisation's embedding takes. Flat (``projection=False``): params
    ``keys`` and ``values``, standard normal at init as in PEFT and AdapterHub.
    Reparametrised: ``embedding`` ``(length, width)`` (standard normal) ->
    ``down`` Dense(``hidden``, default ``width``) -> ``non_linearity`` ->
    ``up`` Dense(``2 * features``), whose output is ``[keys | values]``; the
    Dense layers have PyTorch's initialisation. ``dropout`` applies to the
    keys and values in training mode (AdapterHub's). With ``use_gating`` and
    ``inputs`` (the attention layer's input, ``(batch, ..., width)``) it also
    returns the gates, ``(keys_gate, values_gate)``, each ``(batch,)``: the
    mean over the positions of ``sigmoid(gate(inputs))``, one gate shared by
    keys and values with ``shared_gating``. Default strategy: none;
    place it with :class:`PrependPrefix` or through :class:`PrefixTuningConfig`.

    Example:
        >>> import jax
        >>> prefix = PrefixTuning(length=3, projection=True, hidden=5)
        >>> params = prefix.init(jax.random.key(0), 8, 4)
        >>> [x.shape for x in prefix.apply(params, 8, 4)]
        [(3, 8), (3, 8)]
    """

    length: int = 20
    projection: bool = False
    hidden: int | None = None
    non_linearity: str = "tanh"
    dropout: float = 0.0
    use_gating: bool = False
    shared_gating: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def __post_init__(self) -> None:
        check_positive_int("length", self.length)
        if self.hidden is not None:
            check_positive_int("hidden", self.hidden)
        get_activation(self.non_linearity)
        check_dropout(self.dropout)
        super().__post_init__()

    @nn.compact
    def __call__(self, features: int, width: int, deterministic: bool = True, inputs: jax.Array | None = None) -> tuple:
        normal = nn.initializers.normal(1.0)
        if self.projection:
            hidden = self.hidden or width
            embedding = self.param("embedding", normal, (self.length, width), self.param_dtype)
            dense = lambda n, fan_in, name: nn.Dense(
                n, kernel_init=torch_linear_init, bias_init=torch_bias_init(fan_in), dtype=self.dtype,
                param_dtype=self.param_dtype, name=name,
            )
            h = get_activation(self.non_linearity)(dense(hidden, width, "down")(embedding))
            both = dense(2 * features, hidden, "up")(h)
        else:
            keys = self.param("keys", normal, (self.length, features), self.param_dtype)
            values = self.param("values", normal, (self.length, features), self.param_dtype)
            both = jnp.concatenate([keys, values], axis=-1)
        if self.dropout > 0.0:
            both = nn.Dropout(self.dropout, name="dropout")(both, deterministic=deterministic)
        keys, values = jnp.split(both, 2, axis=-1)
        if not self.use_gating:
            return keys, values
        if inputs is None:
            raise AdapterError("a gated prefix (use_gating=True) needs the attention layer's input (inputs=)")
        count = 1 if self.shared_gating else 2
        gate = nn.Dense(count, kernel_init=nn.initializers.normal(0.02), bias_init=torch_bias_init(inputs.shape[-1]),
                        dtype=self.dtype, param_dtype=self.param_dtype, name="gate")(inputs)
        gate = jnp.mean(jax.nn.sigmoid(gate), axis=tuple(range(1, gate.ndim - 1)))  # (batch, count)
        if not self.is_mutable_collection("params"):  # not while init_adapters creates variables
            self.sow("intermediates", "gate_score", gate[:, 0] if self.shared_gating else gate)
        return keys, values, (gate[:, 0], gate[:, -1])


def _prepend(prefix: jax.Array, out: jax.Array, axis: int, replace: bool, gate: jax.Array | None = None) -> jax.Array:
    """``prefix`` ``(P, *trailing)`` in front of ``out`` along ``axis`` (instead of its first P rows if ``replace``),
    times ``gate`` ``(batch,)`` (along ``out``'s first axis) if given."""
    count = prefix.shape[0]
    shape = out.shape[:axis] + (count,) + out.shape[axis + 1 :]
    prefix = jnp.broadcast_to(prefix.reshape((count,) + out.shape[axis + 1 :]), shape)
    if gate is not None:
        prefix = prefix * gate.reshape(gate.shape[:1] + (1,) * (prefix.ndim - 1))
    prefix = prefix.astype(out.dtype)
    rest = jax.lax.slice_in_dim(out, count, None, axis=axis) if replace else out
    return jnp.concatenate([prefix, rest], axis=axis)


@register_strategy
@dataclasses.dataclass(frozen=True)
class PrependPrefix(Strategy):
    """Prefix tuning's join: the adapter's keys and values go in front of an attention layer's own.

    At a module matching one of ``attention`` (the first site whose targets
    match, else the first site), the mask argument gets ``P`` attend-everywhere
    entries, and the key and value projections' outputs get the prefix in
    front along the sequence axis (with ``pad_queries``: placeholder rows
    enter the module's input, the prefix replaces them in the projections'
    outputs, and they leave its output). The layer's output keeps its shape.

    With ``embeddings`` (PEFT's cache semantics) the strategy also joins the
    call of ``embeddings.module`` (add that path to the adapter's targets):
    the position ids given to its position embeddings are shifted by ``P``,
    and token-type ids become zeros.

    Example:
        >>> PrependPrefix((AttentionSite("attn"),)).changes_shape
        True
    """

    changes_shape: ClassVar[bool] = True
    attention: tuple[AttentionSite, ...] = ()
    embeddings: EmbeddingSite | None = None

    def validate(self) -> None:
        if isinstance(self.attention, AttentionSite):
            object.__setattr__(self, "attention", (self.attention,))
        object.__setattr__(self, "attention", tuple(self.attention))
        if not self.attention or not all(isinstance(s, AttentionSite) for s in self.attention):
            raise ValueError(f"attention must be one or more AttentionSite, got {self.attention!r}")
        if self.embeddings is not None and not isinstance(self.embeddings, EmbeddingSite):
            raise ValueError(f"embeddings must be an EmbeddingSite or None, got {self.embeddings!r}")

    def around(self, adapter: AdapterFn, call, ctx: AdapterContext) -> Any:
        if self.embeddings is not None and ctx.path == self.embeddings.module:
            return _as_cache(self.embeddings, adapter_length(adapter), call, ctx)
        site = next((s for s in self.attention if any(path_matches(ctx.path, t) for t in s.targets)), self.attention[0])
        return _attend(site, adapter, call, ctx)


def _as_cache(site: EmbeddingSite, count: int, call, ctx: AdapterContext) -> Any:
    """PEFT's treatment of the embeddings under a prefix of ``count`` tokens: positions shifted, types dropped."""

    def shifted(call_, ids, *args, **kwargs):
        return call_(ids + jnp.asarray(count, jnp.asarray(ids).dtype), *args, **kwargs)

    def zeroed(call_, ids, *args, **kwargs):
        return call_(jnp.zeros_like(ids), *args, **kwargs)

    hooks = {p: shifted for p in site.position_embeddings}
    hooks.update({p: zeroed for p in site.token_type_embeddings})
    return run_hooked(site, hooks, call, ctx.args, ctx.kwargs, ctx, site.within)


def _attend(site: AttentionSite, adapter: AdapterFn, call, ctx: AdapterContext) -> Any:
    count, axis = adapter_length(adapter), site.sequence_axis
    args, kwargs = tuple(ctx.args), dict(ctx.kwargs)
    if site.mask is not None:
        axes = (-2, -1) if site.pad_queries and site.mask.kind == "attention" else (-1,)
        args, kwargs = site.mask.replace(args, kwargs, lambda m: insert_ones(m, count, 0, axes))
    if site.pad_queries:
        if not args:
            raise AdapterError(f"{ctx.where()}: pad_queries needs the attention input as the first positional argument")
        x = jnp.asarray(args[0])
        placeholder = jnp.zeros(x.shape[:axis] + (count,) + x.shape[axis + 1 :], x.dtype)
        args = (jnp.concatenate([placeholder, x], axis=axis),) + args[1:]
    cache: dict[str, tuple] = {}
    gated = bool(getattr(adapter.module, "use_gating", False))
    if gated and not ctx.args:
        raise AdapterError(f"{ctx.where()}: a gated prefix reads the attention input, its first positional argument")

    def prefix(projected: jax.Array, projection_input: Any) -> tuple:
        """``(keys, values, (keys_gate, values_gate))``; the gates are None without gating."""
        if "kv" not in cache:
            features = math.prod(projected.shape[axis + 1 :])
            width = jnp.shape(projection_input)[-1]
            if gated:  # the gate reads the layer's own input (before any placeholder rows)
                cache["kv"] = adapter(features, width, inputs=jnp.asarray(ctx.args[0]))
            else:
                cache["kv"] = (*adapter(features, width), (None, None))
        return cache["kv"]

    def separate(which: int):
        def hook(call_, *a, **k):
            out = call_(*a, **k)
            kv = prefix(out, a[0])
            return _prepend(kv[which], out, axis, site.pad_queries, kv[2][which])

        return hook

    def fused(call_, *a, **k):
        out = call_(*a, **k)
        queries, keys, values = jnp.split(out, 3, axis=-1)
        pk, pv, (gk, gv) = prefix(keys, a[0])
        return jnp.concatenate([queries, _prepend(pk, keys, axis, True, gk), _prepend(pv, values, axis, True, gv)],
                               axis=-1)

    hooks = {site.qkv: fused} if site.qkv else {site.key: separate(0), site.value: separate(1)}
    out = run_hooked(site, hooks, call, args, kwargs, ctx)
    if not site.pad_queries:
        return out
    drop = lambda y: jax.lax.slice_in_dim(y, count, None, axis=axis)
    if site.output is None:
        return drop(out)
    parts = list(out)
    parts[site.output] = drop(parts[site.output])
    return type(out)(parts) if isinstance(out, tuple) else parts


@register_method("prefix_tuning")
@dataclasses.dataclass(frozen=True)
class PrefixTuningConfig(MethodConfig):
    """Prefix tuning with PEFT's field names; AdapterHub's names are accepted too.

    Attributes:
        num_virtual_tokens: the prefix length P (AdapterHub: ``prefix_length``); default 20,
            30 with ``style='adapterhub'``.
        prefix_projection: train through the reparametrisation MLP (AdapterHub: ``flat``, its
            negation); default False, True with ``style='adapterhub'``.
        encoder_hidden_size: the MLP's width (AdapterHub: ``bottleneck_size``); default the
            model's width, 512 with ``style='adapterhub'``.
        style: ``'peft'`` (the prefix acts as a cache: position ids shifted by P where the model
            declares position embeddings, token types dropped) or ``'adapterhub'`` (positions
            unchanged). See :mod:`jadapters.adapters.prefix`.
        non_linearity: the MLP's activation (AdapterHub's option; PEFT's is tanh).
        dropout: on the keys and values in training mode (AdapterHub's option; PEFT has none).
        cross_prefix: also prefix cross-attention layers where the model declares a
            ``cross_attention`` site (AdapterHub's option); each layer has its own prefix.
        use_gating / shared_gating: AdapterHub's gate on the prefix (UniPELT's), one per layer,
            shared by keys and values unless ``shared_gating=False``; see the module docstring.
        prefix_length / flat / bottleneck_size: AdapterHub's names for the fields above.

    It places itself on the preset's ``attention`` (and ``cross_attention``)
    sites, plus, for PEFT's style, the ``embeddings`` site's module.

    Example:
        >>> PrefixTuningConfig(prefix_length=4, style="adapterhub").adapter()
        PrefixTuning(
            # attributes
            length = 4
            projection = True
            hidden = 512
            non_linearity = 'tanh'
            dropout = 0.0
            use_gating = False
            shared_gating = True
            dtype = None
            param_dtype = float32
        )
    """

    method: ClassVar[str] = "prefix_tuning"
    num_virtual_tokens: int | None = None
    prefix_projection: bool | None = None
    encoder_hidden_size: int | None = None
    style: str = "peft"
    non_linearity: str = "tanh"
    dropout: float = 0.0
    cross_prefix: bool = True
    prefix_length: int | None = None
    flat: bool | None = None
    bottleneck_size: int | None = None
    use_gating: bool = False
    shared_gating: bool = True

    def __post_init__(self) -> None:
        check_options("prefix_tuning", [self.style], STYLES, "style")
        for name in ("prefix_projection", "flat", "cross_prefix", "use_gating", "shared_gating"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise ValueError(f"{name} must be True or False, got {value!r}")
        self.adapter()  # validates every field now

    @property
    def length(self) -> int:
        return resolve_alias("num_virtual_tokens", self.num_virtual_tokens, "prefix_length", self.prefix_length,
                        20 if self.style == "peft" else 30)

    @property
    def projection(self) -> bool:
        flat = None if self.flat is None else not self.flat
        return resolve_alias("prefix_projection", self.prefix_projection, "not flat", flat, self.style == "adapterhub")

    def adapter(self) -> PrefixTuning:
        hidden = resolve_alias("encoder_hidden_size", self.encoder_hidden_size, "bottleneck_size", self.bottleneck_size,
                          None if self.style == "peft" else 512)
        return PrefixTuning(length=self.length, projection=self.projection, hidden=hidden,
                            non_linearity=self.non_linearity, dropout=self.dropout, use_gating=self.use_gating,
                            shared_gating=self.shared_gating)

    def folded(self) -> "PrefixTuningConfig":
        """This config without the reparametrisation (what :func:`fold_prefix_tuning` leaves)."""
        return dataclasses.replace(self, prefix_projection=False, flat=None, encoder_hidden_size=None,
                                   bottleneck_size=None)

    def place(self, placement: Any, where: tuple[str, ...] | None = None) -> Placed:
        sites = [placement.site(ATTENTION, self.method)]
        cross = dict(placement.sites).get(CROSS_ATTENTION)
        if self.cross_prefix and cross is not None:
            sites.append(cross)
        targets = tuple(where) if where is not None else tuple(dict.fromkeys(t for s in sites for t in s.targets))
        embeddings = dict(placement.sites).get(EMBEDDINGS) if self.style == "peft" else None
        if embeddings is not None and (embeddings.position_embeddings or embeddings.token_type_embeddings):
            targets += (embeddings.module,)
        else:
            embeddings = None
        return Placed((), targets, self.adapter(), PrependPrefix(tuple(sites), embeddings))


@register_method("prefix_tuning_flat")
def _prefix_tuning_flat() -> PrefixTuningConfig:
    """AdapterHub's ``prefix_tuning_flat``: its semantics, keys and values trained directly."""
    return PrefixTuningConfig(style="adapterhub", flat=True)


def fold_prefix_tuning(adapted: Any, variables: dict, names: str | Sequence[str] | None = None) -> tuple[Any, dict]:
    """Replaces each reparametrised prefix by the keys and values its MLP computes.

    PEFT saves prefix tuning this way, AdapterHub calls it
    ``eject_prefix_tuning``. The model's output is unchanged (in inference
    mode: dropout is not part of the fold); the MLP's params are gone, the
    adapter and its config become flat. Adapters other than reparametrised
    :class:`PrefixTuning` ones are left as they are.

    Args:
        adapted: the adapted model.
        variables: its variables.
        names: the adapters to fold (default: every reparametrised prefix).

    Returns:
        ``(adapted, variables)``, both new.

    Example:
        >>> import jax, jax.numpy as jnp, flax.linen as nn
        >>> from jadapters import Preset, with_adapters, init_adapters
        >>> from jadapters.sites import AttentionSite
        >>> model = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)
        >>> x = jnp.ones((1, 3, 8))
        >>> params = model.init(jax.random.key(0), x)
        >>> preset = Preset.make("attn", {}, sites={"attention": AttentionSite("")})
        >>> adapted = with_adapters(model, preset).add_adapter("p", "prefix_tuning[prefix_projection=True]")
        >>> variables = init_adapters(adapted, params, jax.random.key(1), x)
        >>> folded, folded_vars = fold_prefix_tuning(adapted, variables)
        >>> sorted(folded_vars["params"]["__adapters__"]["p"])
        ['keys', 'values']
        >>> bool(jnp.allclose(folded.apply(folded_vars, x), adapted.apply(variables, x), atol=1e-5))
        True
    """
    wanted = None if names is None else {names} if isinstance(names, str) else set(names)
    specs, params = list(adapted.adapters), variables.get("params", {})
    for i, spec in enumerate(specs):
        adapter = spec.adapter
        if not (isinstance(adapter, PrefixTuning) and adapter.projection) or (wanted is not None and spec.name not in wanted):
            continue
        flat = adapter.clone(projection=False, hidden=None)
        params = _fold_params(params, spec.name, adapter)
        config = spec.config.folded() if isinstance(spec.config, PrefixTuningConfig) else spec.config
        specs[i] = dataclasses.replace(spec, adapter=flat, config=config)
    if wanted is not None:
        unknown = wanted - {s.name for s in specs}
        if unknown:
            raise AdapterError(f"fold_prefix_tuning: no adapter(s) {sorted(unknown)}; the adapters are {adapted.adapter_names()}")
    return adapted.clone(adapters=tuple(specs)), {**variables, "params": params}


def _fold_params(tree: Any, name: str, adapter: PrefixTuning) -> Any:
    """``tree`` with every ``__adapters__/<name>`` subtree of ``adapter`` replaced by its keys and values."""
    if not isinstance(tree, dict) and not hasattr(tree, "items"):
        return tree
    out = {}
    for key, sub in tree.items():
        if key == ADAPTERS_KEY and name in sub:
            out[key] = {**sub, name: _folded(adapter, sub[name])}
        else:
            out[key] = _fold_params(sub, name, adapter) if hasattr(sub, "items") else sub
    return out


def _folded(adapter: PrefixTuning, params: Any) -> dict:
    embedding = params["embedding"]
    features, width = params["up"]["kernel"].shape[-1] // 2, embedding.shape[-1]
    ungated = adapter.clone(use_gating=False)

    def keys_values(p):
        keys, values = ungated.apply({"params": {k: v for k, v in p.items() if k != "gate"}}, features, width)
        kept = {"gate": p["gate"]} if "gate" in p else {}  # a gate stays as it is
        return {"keys": keys.astype(embedding.dtype), "values": values.astype(embedding.dtype), **kept}

    for _ in range(embedding.ndim - 2):  # layers inside nn.scan: stacked along leading axes
        keys_values = jax.vmap(keys_values)
    return keys_values(params)
