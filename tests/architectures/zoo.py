"""The model families of the architecture matrix: how to build each, call it, and where its parts are.

Each :class:`Family` declares its roles as a :class:`jadapters.Preset` (the
Hugging Face ones use the presets that ship with jadapters), which methods ask
for by name, and the sites prompt and prefix tuning need
(:mod:`jadapters.sites`). Models are tiny and built once per test session.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

import jadapters
from jadapters.blocks import ResidualBlock
from jadapters.presets import ATTENTION_BLOCK, CROSS_ATTENTION_BLOCK, FFN_BLOCK, Preset
from jadapters.sites import AttentionSite, EmbeddingSite, MaskArgument

from architectures import families as own


@dataclasses.dataclass(frozen=True)
class Family:
    """One model family of the matrix.

    Attributes:
        name: the family's name in test ids.
        make: builds ``(model, base variables)``.
        inputs: positional array inputs for a seed (eval and training alike).
        eval_kwargs / train_kwargs: the model's own mode flags.
        preset: the family's roles.
        lora_roles: where LoRA goes on this family.
        mha: ``(role, mask argument)`` where NeMo's MHA adapter fits, else None.
        float_inputs: positions of float inputs (cast with a bf16 base).
        batchnorm: whether the base has BatchNorm statistics.
        third_party: Hugging Face's code rather than ours.
    """

    name: str
    make: Callable[[], tuple[nn.Module, dict]]
    inputs: Callable[[int], tuple]
    eval_kwargs: dict
    train_kwargs: dict
    preset: Preset
    lora_roles: tuple[str, ...] = ("query", "value")
    mha: tuple[str, Any] | None = None
    float_inputs: tuple[int, ...] = ()
    batchnorm: bool = False
    third_party: bool = False

    def built(self) -> tuple[nn.Module, dict]:
        return _built(self.name)

    def __repr__(self) -> str:
        return self.name


def primary_output(outputs: Any) -> jax.Array:
    """The first array an output tree holds (logits, last_hidden_state, ...)."""
    return jax.tree_util.tree_leaves(outputs)[0]


def _init(model: nn.Module, inputs: tuple, **kwargs) -> dict:
    return jax.jit(lambda key, args: model.init(key, *args, **kwargs))(jax.random.key(0), inputs)


def _tokens(seed: int):
    return own.token_batch(jax.random.key(seed))


def _bert_inputs(seed):
    ids, valid = _tokens(seed)
    return ids, valid


def _gpt_inputs(seed):
    return (_tokens(seed)[0],)


def _t5_inputs(seed):
    ids, _ = _tokens(seed)
    tgt = jax.random.randint(jax.random.key(seed + 100), (3, 4), 1, own.VOCAB)
    return ids, tgt


def _vit_inputs(seed):
    return (jax.random.normal(jax.random.key(seed), (3, 8, 8, 3)),)


def _conformer_inputs(seed):
    return jax.random.normal(jax.random.key(seed), (3, 6, 5)), jnp.array([6, 4, 3])


def _own(model: nn.Module, inputs: Callable[[int], tuple], **kwargs) -> Callable[[], tuple[nn.Module, dict]]:
    def make():
        return model, _init(model, inputs(0), **kwargs)

    return make


BERT = Family(
    "bert",
    _own(own.BertEncoder(), _bert_inputs),
    _bert_inputs,
    {"deterministic": True},
    {"deterministic": False},
    Preset.make(
        "bert",
        {
            "query": "attention/query",
            "key": "attention/key",
            "value": "attention/value",
            "attention_output": "attention/out",
            "ffn_intermediate": "intermediate",
            "ffn_output": "output",
            "embeddings": "embeddings",
            "layers": "layer_*",
        },
        global_roles=["ffn_output"],
        sites={
            "attention": AttentionSite("attention", mask=MaskArgument("mask", kind="attention")),
            ATTENTION_BLOCK: ResidualBlock(r"re:layer_{layer}/attention_add", "dropout", layer_norm="LayerNorm"),
            FFN_BLOCK: ResidualBlock(r"re:layer_{layer}/output_add", "dropout", layer_norm="LayerNorm"),
            # Positions are a parameter as long as the input: prompts only after the embeddings.
            "embeddings": EmbeddingSite(embeddings="embeddings_norm", mask=MaskArgument("padding", 1)),
        },
    ),
    lora_roles=("query", "value", "embeddings"),
    mha=("layers", None),
)

GPT = Family(
    "gpt",
    _own(own.GPT(), _gpt_inputs),
    _gpt_inputs,
    {"deterministic": True},
    {"deterministic": False},
    Preset.make(
        "gpt",
        {
            "query": "layers/attention/query",
            "key": "layers/attention/key",
            "value": "layers/attention/value",
            "attention_output": "layers/attention/out",
            "ffn_intermediate": "layers/fc_in",
            "ffn_output": "layers/fc_out",
            "embeddings": "wte",
            "attention": "layers/attention",
        },
        global_roles=["ffn_output"],
        sites={  # one scanned block holds both sub-blocks; no layer numbers
            ATTENTION_BLOCK: ResidualBlock("layers", "attention", residual="ln_1"),
            FFN_BLOCK: ResidualBlock("layers", "Dropout_0", residual="ln_2"),
            "attention": AttentionSite("layers/attention", mask=MaskArgument("mask", 1, kind="attention")),
            # The causal mask comes from the sequence length inside each block: no mask argument.
            "embeddings": EmbeddingSite(word_embeddings="wte", position_embeddings=("wpe",)),
        },
    ),
    mha=("attention", None),
)

T5 = Family(
    "t5",
    _own(own.T5(), _t5_inputs),
    _t5_inputs,
    {"deterministic": True},
    {"deterministic": False},
    Preset.make(
        "t5",
        {
            "query": ["self_attention/query", "cross_attention/query"],
            "key": ["self_attention/key", "cross_attention/key"],
            "value": ["self_attention/value", "cross_attention/value"],
            "attention_output": ["self_attention/out", "cross_attention/out"],
            "ffn_intermediate": "wi",
            "ffn_output": "wo",
            "embeddings": "shared",
        },
        global_roles=["ffn_output"],
        # No embedding site: encode() builds its masks from the token ids, so prompts have no
        # mask to extend.
        sites={
            "attention": AttentionSite("self_attention", mask=MaskArgument("mask", kind="attention")),
            "cross_attention": AttentionSite("cross_attention", mask=MaskArgument("mask", kind="attention")),
            ATTENTION_BLOCK: ResidualBlock(r"re:(encoder|decoder)_{layer}", "self_attention", residual="self_norm"),
            CROSS_ATTENTION_BLOCK: ResidualBlock(r"re:decoder_{layer}", "cross_attention", residual="cross_norm"),
            FFN_BLOCK: ResidualBlock(r"re:(encoder|decoder)_{layer}", "wo", residual="ffn_norm"),
        },
    ),
)

VIT = Family(
    "vit",
    _own(own.ViT(), _vit_inputs),
    _vit_inputs,
    {"deterministic": True},
    {"deterministic": False},
    Preset.make(
        "vit",
        {
            "query": "attention/query",
            "key": "attention/key",
            "value": "attention/value",
            "attention_output": "attention/out",
            "ffn_intermediate": "mlp_in",
            "ffn_output": "mlp_out",
            "embeddings": "patch_embed",
        },
        global_roles=["ffn_output"],
        sites={
            "attention": AttentionSite("attention"),
            "embeddings": EmbeddingSite(embeddings="block_0", embeddings_argument=0),
            ATTENTION_BLOCK: ResidualBlock(r"re:block_{layer}", "attention", residual="norm_1"),
            FFN_BLOCK: ResidualBlock(r"re:block_{layer}", "mlp_out", residual="norm_2"),
        },
    ),
    lora_roles=("query", "value", "embeddings"),
    float_inputs=(0,),
)

RESNET = Family(
    "resnet",
    _own(own.ResNet(), _vit_inputs),
    _vit_inputs,
    {"train": False},
    {"train": True},
    Preset.make("resnet", {"blocks": "block_*", "convs": r"re:block_\d+/conv_\d"}, global_roles=["blocks"]),
    lora_roles=("convs",),
    float_inputs=(0,),
    batchnorm=True,
)

CONFORMER = Family(
    "conformer",
    _own(own.Conformer(), _conformer_inputs),
    _conformer_inputs,
    {"train": False},
    {"train": True},
    Preset.make(
        "conformer",
        {
            "query": "self_attention/query",
            "value": "self_attention/value",
            "ffn_output": r"re:layers_\d+/ffn_\d_out",
            "layers": "layers_*",
        },
        global_roles=["layers"],
        # The attention sub-block only: the feed-forward halves join as x + 0.5 * ffn(x) (Macaron style).
        sites={ATTENTION_BLOCK: ResidualBlock(r"re:layers_{layer}", "self_attention", residual="attention_norm")},
    ),
    mha=("layers", 1),
    float_inputs=(0,),
    batchnorm=True,
)

OWN_FAMILIES = (BERT, GPT, T5, VIT, RESNET, CONFORMER)


def _hf_families() -> tuple[Family, ...]:
    from architectures import hf

    return hf.FAMILIES


@functools.cache
def families() -> tuple[Family, ...]:
    """Every family of the matrix: ours, and Hugging Face's when ``transformers<5`` with Flax is installed."""
    try:
        return OWN_FAMILIES + _hf_families()
    except ImportError:
        return OWN_FAMILIES


@functools.cache
def _built(name: str) -> tuple[nn.Module, dict]:
    family = next(f for f in families() if f.name == name)
    return family.make()


def bf16(tree: Any) -> Any:
    """Every float leaf of ``tree`` cast to bfloat16."""
    return jax.tree_util.tree_map(
        lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x, tree
    )


def base_variables(family: Family) -> dict:
    """The family's base variables (one shared set per session: never modify them)."""
    return family.built()[1]


__all__ = ["Family", "families", "primary_output", "bf16", "base_variables", "jadapters"]
