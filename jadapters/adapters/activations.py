"""Activations by name, as NeMo's adapters take them."""

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
