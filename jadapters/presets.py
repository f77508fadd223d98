"""Roles and presets: where the parts of a transformer are, for each model family.

A *role* is a part that adapter methods ask for by name: the attention's
``query``, ``key``, ``value`` (or a fused ``qkv``) and ``attention_output``
projections, the feed-forward's ``ffn_intermediate`` and ``ffn_output``
layers, and the token ``embeddings``. A :class:`Preset` maps roles to module
targets for one model family; ``with_adapters(model, preset)`` declares every
role as a module name, so ``'value:name'`` puts an adapter on every value
projection and methods place themselves without per-architecture code.

Presets for Hugging Face's Flax BERT, GPT-2, T5 and ViT (``transformers<5``)
ship here; a family of your own is a :class:`Preset` of a few lines. Sites
(:mod:`jadapters.sites`) say what prompt and prefix tuning need to know.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping

from jadapters.blocks import ResidualBlock
from jadapters.errors import AdapterError
from jadapters.naming import Target, normalize_targets
from jadapters.sites import ATTENTION, EMBEDDINGS, AttentionSite, EmbeddingSite, MaskArgument

QUERY, KEY, VALUE, QKV = "query", "key", "value", "qkv"
ATTENTION_OUTPUT = "attention_output"
FFN_INTERMEDIATE, FFN_OUTPUT = "ffn_intermediate", "ffn_output"
EMBEDDINGS = "embeddings"

#: The roles adapter methods may ask for.
ROLES = (QUERY, KEY, VALUE, QKV, ATTENTION_OUTPUT, FFN_INTERMEDIATE, FFN_OUTPUT, EMBEDDINGS)

#: Sites (:class:`jadapters.blocks.ResidualBlock`) of the sub-blocks where bottleneck adapters go: the
#: self-attention, a decoder's cross-attention, and the feed-forward.
ATTENTION_BLOCK, CROSS_ATTENTION_BLOCK, FFN_BLOCK = "attention_block", "cross_attention_block", "ffn_block"


@dataclasses.dataclass(frozen=True)
class Preset:
    """Role names mapped to module targets for one model family.

    Attributes:
        name: the family, e.g. ``'hf_bert'``.
        roles: ``((role, targets), ...)``; build one with :meth:`make`.
        global_roles: where bare (global) adapter names go.
        sites: ``((name, site), ...)``: what methods that work inside a block need to know
            beyond a module path (e.g. where a sub-block's residual and LayerNorm are, or how
            an attention layer takes its mask); each site is a frozen dataclass.

    Example:
        >>> preset = Preset.make("mine", {"query": "attn/q", "ffn_output": "mlp/out"}, global_roles=["ffn_output"])
        >>> preset.targets("query")
        ('attn/q',)
    """

    name: str
    roles: tuple[tuple[str, tuple[str, ...]], ...]
    global_roles: tuple[str, ...] = ()
    sites: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def make(
        cls,
        name: str,
        roles: Mapping[str, Target | Iterable[Target]],
        *,
        global_roles: Iterable[str] = (),
        sites: Mapping[str, Any] | None = None,
    ) -> "Preset":
        """A preset from a ``{role: targets}`` mapping; unknown roles are allowed (your own names)."""
        declared = tuple((role, normalize_targets(targets)) for role, targets in roles.items())
        global_roles = tuple(global_roles)
        for role in global_roles:
            if role not in dict(declared):
                raise AdapterError(f"preset {name!r}: global role {role!r} is not one of its roles {list(dict(declared))}")
        return cls(name, declared, global_roles, tuple((sites or {}).items()))

    @property
    def role_names(self) -> tuple[str, ...]:
        return tuple(role for role, _ in self.roles)

    def targets(self, role: str) -> tuple[str, ...]:
        """The targets of ``role``; a clear error if this family does not declare it."""
        found = dict(self.roles).get(role)
        if found is None:
            raise AdapterError(f"preset {self.name!r} declares no role {role!r}; its roles: {list(self.role_names)}")
        return found


HF_BERT = Preset.make(
    "hf_bert",
    {
        QUERY: "attention/self/query",
        KEY: "attention/self/key",
        VALUE: "attention/self/value",
        ATTENTION_OUTPUT: "attention/output/dense",
        FFN_INTERMEDIATE: "intermediate/dense",
        FFN_OUTPUT: r"re:(.*/)?layer/\d+/output/dense",
        EMBEDDINGS: "embeddings/word_embeddings",
    },
    global_roles=[FFN_OUTPUT],
    sites={
        # Post-LN: dense -> dropout -> LayerNorm(h + input_tensor), input_tensor the second argument.
        ATTENTION_BLOCK: ResidualBlock(r"re:(.*/)?layer/{layer}/attention/output", "dropout", layer_norm="LayerNorm"),
        FFN_BLOCK: ResidualBlock(r"re:(.*/)?layer/{layer}/output", "dropout", layer_norm="LayerNorm"),
        ATTENTION: AttentionSite("attention/self", mask=MaskArgument("attention_mask", 1)),
        EMBEDDINGS: EmbeddingSite(
            word_embeddings="embeddings/word_embeddings",
            position_embeddings=("embeddings/position_embeddings",),
            token_type_embeddings=("embeddings/token_type_embeddings",),
            embeddings="embeddings",
            mask=MaskArgument("attention_mask", 1),
        ),
    },
)

HF_VIT = Preset.make(
    "hf_vit",
    {
        QUERY: "attention/attention/query",
        KEY: "attention/attention/key",
        VALUE: "attention/attention/value",
        ATTENTION_OUTPUT: "attention/output/dense",
        FFN_INTERMEDIATE: "intermediate/dense",
        FFN_OUTPUT: r"re:(.*/)?layer/\d+/output/dense",
        EMBEDDINGS: "embeddings/patch_embeddings/projection",
    },
    global_roles=[FFN_OUTPUT],
    sites={
        # Pre-LN: the layer adds its input to the attention's output; ViTOutput adds its second argument.
        ATTENTION_BLOCK: ResidualBlock(r"re:(.*/)?layer/{layer}", "attention", hidden_index=0, residual="layernorm_before"),
        FFN_BLOCK: ResidualBlock(r"re:(.*/)?layer/{layer}/output", "dropout"),
        # The layer reshapes its projections by its input's length: the prefix enters as rows.
        ATTENTION: AttentionSite("attention/attention", pad_queries=True, output=0),
        EMBEDDINGS: EmbeddingSite(embeddings="embeddings"),
    },
)

HF_GPT2 = Preset.make(
    "hf_gpt2",
    {
        QKV: "attn/c_attn",
        ATTENTION_OUTPUT: "attn/c_proj",
        FFN_INTERMEDIATE: "mlp/c_fc",
        FFN_OUTPUT: "mlp/c_proj",
        EMBEDDINGS: "wte",
    },
    global_roles=[FFN_OUTPUT],
    sites={
        # Pre-LN: both sub-blocks are in the block; x is what its ln_1 / ln_2 normalise.
        ATTENTION_BLOCK: ResidualBlock(r"re:(.*/)?h/{layer}", "attn", hidden_index=0, residual="ln_1"),
        FFN_BLOCK: ResidualBlock(r"re:(.*/)?h/{layer}", "mlp", residual="ln_2"),
        # Fused q|k|v and a causal mask cut from the query and key lengths: the prefix enters as
        # rows, so every token sees all of it.
        ATTENTION: AttentionSite("attn", qkv="c_attn", mask=MaskArgument("attention_mask", 2), pad_queries=True, output=0),
        EMBEDDINGS: EmbeddingSite(
            word_embeddings="transformer/wte",
            position_embeddings=("transformer/wpe",),
            embeddings="transformer/h",
            embeddings_argument=0,
            mask=MaskArgument("attention_mask", 1),
        ),
    },
)

HF_T5 = Preset.make(
    "hf_t5",
    {
        QUERY: ["SelfAttention/q", "EncDecAttention/q"],
        KEY: ["SelfAttention/k", "EncDecAttention/k"],
        VALUE: ["SelfAttention/v", "EncDecAttention/v"],
        ATTENTION_OUTPUT: ["SelfAttention/o", "EncDecAttention/o"],
        FFN_INTERMEDIATE: r"re:(.*/)?DenseReluDense/wi(_\d)?",
        FFN_OUTPUT: "DenseReluDense/wo",
        EMBEDDINGS: "shared",
    },
    global_roles=[FFN_OUTPUT],
    sites={
        # Pre-LN: each layer adds dropout(sub-layer(layer_norm(x))) to x. Each stack numbers its blocks from 0.
        ATTENTION_BLOCK: ResidualBlock(r"re:(.*/)?(encoder|decoder)/block/{layer}/layer/0", "dropout", residual="layer_norm"),
        CROSS_ATTENTION_BLOCK: ResidualBlock(r"re:(.*/)?decoder/block/{layer}/layer/1", "dropout", residual="layer_norm"),
        FFN_BLOCK: ResidualBlock(
            [r"re:(.*/)?encoder/block/{layer}/layer/1", r"re:(.*/)?decoder/block/{layer}/layer/2"], "dropout",
            residual="layer_norm",
        ),
        # The encoder's prompts; the decoder's cross-attention sees them through the same mask.
        # (Prefix tuning: Flax T5 derives its relative position bias and causal mask from the
        # key length inside the layer and hands the masked bias on; no attention site yet.)
        EMBEDDINGS: EmbeddingSite(word_embeddings="shared", within="encoder", mask=MaskArgument("attention_mask", 1)),
    },
)

#: The presets that ship with jadapters, by name.
PRESETS: dict[str, Preset] = {p.name: p for p in (HF_BERT, HF_GPT2, HF_T5, HF_VIT)}


def get_preset(preset: str | Preset) -> Preset:
    """A preset, or the shipped one of that name.

    Example:
        >>> get_preset("hf_gpt2").targets("qkv")
        ('attn/c_attn',)
    """
    if isinstance(preset, Preset):
        return preset
    try:
        return PRESETS[preset]
    except (KeyError, TypeError):
        raise AdapterError(f"no preset named {preset!r}; the shipped presets are {sorted(PRESETS)}") from None
