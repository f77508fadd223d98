"""Activations by name, as NeMo's adapters and AdapterHub's configs name them."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "identity": lambda x: x,
    "relu": jax.nn.relu,
    "swish": jax.nn.silu,  # swish and silu are the same function
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "tanh": jnp.tanh,
    "selu": jax.nn.selu,
    "hardtanh": jax.nn.hard_tanh,
    "sigmoid": jax.nn.sigmoid,
    # Hugging Face's names, which AdapterHub's configs use
    "linear": lambda x: x,
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "leakyrelu": jax.nn.leaky_relu,  # slope 0.01, as torch's
    "relu6": jax.nn.relu6,
    "mish": jax.nn.mish,
}


def get_activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The activation function called ``name``; ValueError for an unknown one.

    Example:
        >>> float(get_activation("relu")(-1.0))
        0.0
    """
    try:
        return ACTIVATIONS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}") from None
