"""Adapter-only checkpoints, full-model checkpoints and periodic training checkpoints, on orbax.

- :mod:`~jadapters.checkpoint.adapters`: :func:`save_adapters` / :func:`load_adapters`, the adapters alone,
  rebuilt from their JSON description (:mod:`~jadapters.checkpoint.records`), checked against the base model
  (:mod:`~jadapters.checkpoint.fingerprint`, :mod:`~jadapters.checkpoint.placement`).
- :mod:`~jadapters.checkpoint.model`: :func:`save_model` / :func:`load_model`, base and adapters.
- :mod:`~jadapters.checkpoint.training_state`: :func:`adapter_checkpoint_manager`, :func:`save_training_state`,
  :func:`restore_training_state`.
- :mod:`~jadapters.checkpoint.info`: :func:`inspect_checkpoint`, what a checkpoint holds.

Arrays are packed into one file per dtype (:mod:`~jadapters.checkpoint.packing`), and a checkpoint is
replaced atomically (:mod:`~jadapters.checkpoint.atomic`): a killed save leaves the previous one loadable.

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

from jadapters.checkpoint.adapters import load_adapters, save_adapters
from jadapters.checkpoint.errors import CheckpointError
from jadapters.checkpoint.info import CheckpointInfo, inspect_checkpoint
from jadapters.checkpoint.metadata import FORMAT, FORMAT_VERSION, KIND_ADAPTERS, KIND_MODEL, KIND_TRAINING
from jadapters.checkpoint.model import load_model, save_model
from jadapters.checkpoint.packing import PackedArraysHandler, PackedArraysRestore, PackedArraysSave
from jadapters.checkpoint.sharding import Shardings
from jadapters.checkpoint.storage import PathLike
from jadapters.checkpoint.training_state import adapter_checkpoint_manager, restore_training_state, save_training_state
from jadapters.checkpoint.trees import Variables

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "KIND_ADAPTERS",
    "KIND_MODEL",
    "KIND_TRAINING",
    "CheckpointError",
    "CheckpointInfo",
    "PackedArraysHandler",
    "PackedArraysRestore",
    "PackedArraysSave",
    "PathLike",
    "Shardings",
    "Variables",
    "adapter_checkpoint_manager",
    "inspect_checkpoint",
    "load_adapters",
    "load_model",
    "restore_training_state",
    "save_adapters",
    "save_model",
    "save_training_state",
]
