"""The benchmark models: NeMo tutorial's SimpleModel, its twin with a LinearAdapter
written inline by hand (the baseline jadapters must match), and the matrix's
GPT-style family at benchmark size."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jadapters.adapters.linear import torch_linear_init
from jadapters.tree import ADAPTERS_KEY

ENCODER_LAYERS, DECODER_LAYERS = 4, 2


class MLP(nn.Module):
    """Dense -> LayerNorm, the tutorial's block."""

    dim: int

    @nn.compact
    def __call__(self, x):
        return nn.LayerNorm(name="ln")(nn.Dense(self.dim, name="fc")(x))


class ResidualMLP(nn.Module):
    """``x = x + block(x)`` over ``num_layers`` blocks named ``layers_{i}``."""

    dim: int
    num_layers: int

    @nn.compact
    def __call__(self, x):
        for i in range(self.num_layers):
            x = x + MLP(self.dim, name=f"layers_{i}")(x)
        return x


class SimpleModel(nn.Module):
    """Encoder (4 blocks) -> decoder (2 blocks) -> projection."""

    dim: int
    out_features: int = 10

    @nn.compact
    def __call__(self, x):
        x = ResidualMLP(self.dim, ENCODER_LAYERS, name="encoder")(x)
        x = ResidualMLP(self.dim, DECODER_LAYERS, name="decoder")(x)
        return nn.Dense(self.out_features, name="projection")(x)


BLOCK_TARGETS = {"encoder": "encoder/layers_*", "decoder": "decoder/layers_*"}


class InlineAdapterMLP(nn.Module):
    """The tutorial block with a pre-norm LinearAdapter written inline: what a user would hand-write."""

    dim: int
    adapter_dim: int

    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm(name="ln")(nn.Dense(self.dim, name="fc")(x))
        a = nn.LayerNorm(epsilon=1e-5, name="adapter_norm")(h)
        a = nn.Dense(self.adapter_dim, use_bias=False, kernel_init=torch_linear_init, name="adapter_down")(a)
        a = nn.Dense(self.dim, use_bias=False, kernel_init=nn.initializers.zeros, name="adapter_up")(jax.nn.silu(a))
        return h + a


class InlineAdapterModel(nn.Module):
    """SimpleModel with InlineAdapterMLP blocks: the hand-written twin of the adapted model."""

    dim: int
    adapter_dim: int
    out_features: int = 10

    @nn.compact
    def __call__(self, x):
        for module, layers in (("encoder", ENCODER_LAYERS), ("decoder", DECODER_LAYERS)):
            for i in range(layers):
                x = x + InlineAdapterMLP(self.dim, self.adapter_dim, name=f"{module}_layers_{i}")(x)
        return nn.Dense(self.out_features, name="projection")(x)


def inline_params(variables):
    """jadapters' variables laid out for InlineAdapterModel, split into (base, adapter) by hand."""
    params = variables["params"]
    base, adapter = {"projection": params["projection"]}, {}
    for module, layers in (("encoder", ENCODER_LAYERS), ("decoder", DECODER_LAYERS)):
        for i in range(layers):
            block = params[module][f"layers_{i}"]
            (linear,) = block[ADAPTERS_KEY].values()
            base[f"{module}_layers_{i}"] = {"fc": block["fc"], "ln": block["ln"]}
            adapter[f"{module}_layers_{i}"] = {
                "adapter_norm": linear["norm"],
                "adapter_down": linear["down"],
                "adapter_up": linear["up"],
            }
    return base, adapter


def join_inline(base, adapter):
    """The InlineAdapterModel params from its (base, adapter) halves."""
    return {name: {**base[name], **adapter.get(name, {})} for name in base}


def tree_bytes(tree) -> int:
    """Bytes of all array leaves of a pytree."""
    return int(sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree_util.tree_leaves(tree)))


class GPTBlock(nn.Module):
    """A pre-LayerNorm decoder block with the matrix's GPT-style names (attention, fc_in, fc_out, ln_1, ln_2)."""

    heads: int
    ff: int

    @nn.compact
    def __call__(self, x, _):
        dim = x.shape[-1]
        causal = nn.make_causal_mask(jnp.ones(x.shape[:2]))
        h = nn.SelfAttention(self.heads, qkv_features=dim, deterministic=True, name="attention")(
            nn.LayerNorm(name="ln_1")(x), mask=causal
        )
        x = x + h
        h = nn.gelu(nn.Dense(self.ff, name="fc_in")(nn.LayerNorm(name="ln_2")(x)))
        h = nn.Dense(dim, name="fc_out")(h)
        h = nn.Dropout(0.0)(h, deterministic=True)
        return x + h, None


class GPTLM(nn.Module):
    """The matrix's GPT-style family (``nn.scan(nn.remat(block))``, learned positions) at benchmark size.

    ``offset`` is added to the embeddings: the input-gradient floor differentiates w.r.t. it.
    """

    vocab: int
    dim: int
    heads: int
    ff: int
    layers: int
    max_length: int

    @nn.compact
    def __call__(self, ids, offset=None):
        x = nn.Embed(self.vocab, self.dim, name="wte")(ids)
        x = x + nn.Embed(self.max_length, self.dim, name="wpe")(jnp.arange(ids.shape[1]))
        if offset is not None:
            x = x + offset
        blocks = nn.scan(
            nn.remat(GPTBlock), variable_axes={"params": 0}, split_rngs={"params": True}, length=self.layers
        )
        x, _ = blocks(self.heads, self.ff, name="layers")(x, None)
        return nn.Dense(self.vocab, name="lm_head")(nn.LayerNorm(name="ln_f")(x))
