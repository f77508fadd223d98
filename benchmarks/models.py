"""The benchmark models: NeMo tutorial's SimpleModel, and its twin with a LinearAdapter
written inline by hand (the baseline jadapters must match)."""

from __future__ import annotations

import flax.linen as nn
import jax

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
