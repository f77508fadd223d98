"""The benchmark models: NeMo tutorial's SimpleModel, and the same model with a
LinearAdapter written inline by hand (the baseline jadapters must match)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jadapters.adapters.linear import torch_linear_init

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


def handwritten_forward(base_params, adapter_params, x):
    """SimpleModel with a pre-norm LinearAdapter (swish) after every block, in plain JAX.

    ``adapter_params[(module, i)]`` holds ``norm_scale``, ``norm_bias``,
    ``down`` and ``up`` arrays for block ``i`` of ``module``.
    """

    def layer_norm(h, scale, bias, eps):
        mean = jnp.mean(h, -1, keepdims=True)
        var = jnp.mean(jnp.square(h - mean), -1, keepdims=True)
        return (h - mean) * jax.lax.rsqrt(var + eps) * scale + bias

    for module, layers in (("encoder", ENCODER_LAYERS), ("decoder", DECODER_LAYERS)):
        for i in range(layers):
            p = base_params[module][f"layers_{i}"]
            h = x @ p["fc"]["kernel"] + p["fc"]["bias"]
            h = layer_norm(h, p["ln"]["scale"], p["ln"]["bias"], 1e-6)
            a = adapter_params[(module, i)]
            h = h + jax.nn.silu(layer_norm(h, a["norm_scale"], a["norm_bias"], 1e-5) @ a["down"]) @ a["up"]
            x = x + h
    p = base_params["projection"]
    return x @ p["kernel"] + p["bias"]


def handwritten_adapter_params(key, dim, adapter_dim):
    """Adapter params for :func:`handwritten_forward`, initialised as LinearAdapter is."""
    params = {}
    for module, layers in (("encoder", ENCODER_LAYERS), ("decoder", DECODER_LAYERS)):
        for i in range(layers):
            key, sub = jax.random.split(key)
            params[(module, i)] = {
                "norm_scale": jnp.ones(dim),
                "norm_bias": jnp.zeros(dim),
                "down": torch_linear_init(sub, (dim, adapter_dim)),
                "up": jnp.zeros((adapter_dim, dim)),
            }
    return params


def jadapters_to_handwritten(variables):
    """Reads the LinearAdapter params out of a jadapters variables tree."""
    out = {}
    for module, layers in (("encoder", ENCODER_LAYERS), ("decoder", DECODER_LAYERS)):
        for i in range(layers):
            (name, a), = variables["params"][module][f"layers_{i}"]["__adapters__"].items()
            out[(module, i)] = {
                "norm_scale": a["norm"]["scale"],
                "norm_bias": a["norm"]["bias"],
                "down": a["down"]["kernel"],
                "up": a["up"]["kernel"],
            }
    return out
