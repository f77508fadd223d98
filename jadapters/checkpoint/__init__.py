"""Adapter-only checkpoints, full-model checkpoints and periodic training checkpoints, on orbax.

- :mod:`~jadapters.checkpoint.api`: :func:`save_adapters` / :func:`load_adapters` (the adapters alone,
  rebuilt from their description and checked against the base model), :func:`save_model` /
  :func:`load_model`, :func:`adapter_checkpoint_manager` / :func:`save_training_state` /
  :func:`restore_training_state`, and :func:`inspect_checkpoint`.
- :mod:`~jadapters.checkpoint.format`: the typed metadata every checkpoint carries, to and from JSON.
- :mod:`~jadapters.checkpoint.io`: paths (local, ``gs://``), orbax's commit protocol, packed and sharded arrays.

Example:
    >>> import tempfile, jax, jax.numpy as jnp, flax.linen as nn
    >>> from jadapters import LinearAdapter, with_adapters, init_adapters
    >>> x = jnp.ones((2, 8))
    >>> base_params = nn.Dense(8).init(jax.random.key(0), x)
    >>> model = with_adapters(nn.Dense(8), {"dense": ""}).add_adapter("task", LinearAdapter(4))
    >>> variables = init_adapters(model, base_params, jax.random.key(1), x)
    >>> path = tempfile.mkdtemp() + "/task"
    >>> _ = save_adapters(path, model, variables)
    >>> fresh = with_adapters(nn.Dense(8), {"dense": ""})
    >>> loaded_model, loaded = load_adapters(path, fresh, base_params)
    >>> loaded_model.get_enabled_adapters()
    ['task']
"""

from jadapters.checkpoint.api import (
    CheckpointInfo,
    adapter_checkpoint_manager,
    inspect_checkpoint,
    load_adapters,
    load_model,
    restore_training_state,
    save_adapters,
    save_model,
    save_training_state,
)
from jadapters.checkpoint.format import CheckpointError

__all__ = [
    "CheckpointError",
    "CheckpointInfo",
    "adapter_checkpoint_manager",
    "inspect_checkpoint",
    "load_adapters",
    "load_model",
    "restore_training_state",
    "save_adapters",
    "save_model",
    "save_training_state",
]
