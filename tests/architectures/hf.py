"""Hugging Face's Flax BERT, GPT-2, T5 and ViT (``transformers<5``) as third-party families.

Random init from tiny configs, no downloads. Importing this module raises
``ImportError`` when transformers (with its Flax models) is not installed.
"""

from __future__ import annotations

import os
import warnings

import jax
import jax.numpy as jnp

os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import transformers
    import transformers.models.t5.modeling_flax_t5 as _flax_t5
    from transformers import (
        BertConfig,
        FlaxBertModel,
        FlaxGPT2LMHeadModel,
        FlaxT5ForConditionalGeneration,
        FlaxViTModel,
        GPT2Config,
        T5Config,
        ViTConfig,
    )

from jadapters import presets

from architectures import families as own
from architectures.zoo import Family

if int(transformers.__version__.split(".")[0]) >= 5:  # pragma: no cover - the Flax models are gone in 5
    raise ImportError("transformers>=5 has no Flax models")


class _NumpyWithOldClip:
    """``jax.numpy`` whose ``clip`` also takes the ``a_min``/``a_max`` keywords that jax 0.10 removed.

    transformers 4.x's Flax T5 still calls ``jnp.clip(x, a_max=...)``; this
    is a test-side shim for that third-party code, not part of jadapters.
    """

    def __getattr__(self, name):
        return getattr(jnp, name)

    @staticmethod
    def clip(x, a_min=None, a_max=None, **kwargs):
        return jnp.clip(x, kwargs.pop("min", a_min), kwargs.pop("max", a_max), **kwargs)


_flax_t5.jnp = _NumpyWithOldClip()


def _quiet(build):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = build()
    return hf.module, {"params": hf.params}


def _bert_inputs(seed):
    ids, valid = own.token_batch(jax.random.key(seed))
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    return ids, valid.astype(jnp.int32), jnp.zeros_like(ids), positions


def _gpt2_inputs(seed):
    ids, valid = own.token_batch(jax.random.key(seed))
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    return ids, valid.astype(jnp.int32), positions


def _t5_inputs(seed):
    ids, valid = own.token_batch(jax.random.key(seed))
    tgt = jax.random.randint(jax.random.key(seed + 100), (3, 4), 1, own.VOCAB)
    return ids, valid.astype(jnp.int32), tgt, jnp.ones_like(tgt)


def _vit_inputs(seed):
    return (jax.random.normal(jax.random.key(seed), (3, 8, 8, 3)),)


TINY = dict(vocab_size=own.VOCAB)

HF_BERT = Family(
    "hf_bert",
    lambda: _quiet(lambda: FlaxBertModel(BertConfig(
        hidden_size=own.D, num_hidden_layers=1, num_attention_heads=2, intermediate_size=own.FF,
        max_position_embeddings=16, **TINY), seed=0)),
    _bert_inputs,
    {"deterministic": True},
    {"deterministic": False},
    presets.HF_BERT,
    lora_roles=("query", "value", "embeddings"),
    mha=("ffn_output", None),
    third_party=True,
)

HF_GPT2 = Family(
    "hf_gpt2",
    lambda: _quiet(lambda: FlaxGPT2LMHeadModel(GPT2Config(n_embd=own.D, n_layer=1, n_head=2, n_positions=32, **TINY), seed=0)),
    _gpt2_inputs,
    {"deterministic": True},
    {"deterministic": False},
    presets.HF_GPT2,
    lora_roles=("qkv",),
    third_party=True,
)

HF_T5 = Family(
    "hf_t5",
    lambda: _quiet(lambda: FlaxT5ForConditionalGeneration(T5Config(
        d_model=own.D, d_kv=8, d_ff=own.FF, num_layers=1, num_decoder_layers=1, num_heads=2, **TINY), seed=0)),
    _t5_inputs,
    {"deterministic": True},
    {"deterministic": False},
    presets.HF_T5,
    third_party=True,
)

HF_VIT = Family(
    "hf_vit",
    lambda: _quiet(lambda: FlaxViTModel(ViTConfig(
        image_size=8, patch_size=4, num_channels=3, hidden_size=own.D, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=own.FF), seed=0)),
    _vit_inputs,
    {"deterministic": True},
    {"deterministic": False},
    presets.HF_VIT,
    float_inputs=(0,),
    third_party=True,
)

FAMILIES = (HF_BERT, HF_GPT2, HF_T5, HF_VIT)
