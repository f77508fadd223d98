"""jadapters: NeMo-style adapters for any Flax model.

Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> import jadapters
    >>> base = nn.Dense(8)
    >>> x = jnp.ones((2, 8))
    >>> params = base.init(jax.random.key(0), x)
    >>> model = jadapters.with_adapters(base, {"dense": ""})
    >>> model = model.add_adapter("task", jadapters.LinearAdapter(dim=4))
    >>> variables = jadapters.init_adapters(model, params, jax.random.key(1), x)
    >>> model.get_enabled_adapters()
    ['task']
"""

from jadapters.adapters import LinearAdapter, LoRA, MultiHeadAttentionAdapter
from jadapters.checkpoint import (
    CheckpointError,
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
from jadapters.context import LOSS_COLLECTION, AdapterContext, sum_adapter_losses
from jadapters.errors import AdapterError, UnknownAdapterError
from jadapters.registry import RegisteredAdapter, get_registered_adapter, register_adapter
from jadapters.strategies import MHAResidualAdd, ParallelAdd, ResidualAdd, ReturnResult, Strategy
from jadapters.summary import AdapterSummary, adapter_summary
from jadapters.training import (
    TrainState,
    TrainStep,
    adapter_optimizer,
    combine,
    fit,
    make_train_step,
    optimizer_labels,
    partition,
)
from jadapters.transform import AdaptedModule, AdapterSpec, init_adapters, with_adapters
from jadapters.tree import ADAPTERS_KEY, count_parameters, merge_trees, split_adapters

__version__ = "0.1.0"

__all__ = [
    "ADAPTERS_KEY",
    "LOSS_COLLECTION",
    "AdaptedModule",
    "AdapterContext",
    "AdapterError",
    "AdapterSpec",
    "AdapterSummary",
    "CheckpointError",
    "CheckpointInfo",
    "LinearAdapter",
    "LoRA",
    "MHAResidualAdd",
    "MultiHeadAttentionAdapter",
    "ParallelAdd",
    "RegisteredAdapter",
    "ResidualAdd",
    "ReturnResult",
    "Strategy",
    "TrainState",
    "TrainStep",
    "UnknownAdapterError",
    "adapter_checkpoint_manager",
    "adapter_optimizer",
    "adapter_summary",
    "combine",
    "count_parameters",
    "fit",
    "get_registered_adapter",
    "init_adapters",
    "inspect_checkpoint",
    "load_adapters",
    "load_model",
    "make_train_step",
    "merge_trees",
    "optimizer_labels",
    "partition",
    "register_adapter",
    "restore_training_state",
    "save_adapters",
    "save_model",
    "save_training_state",
    "split_adapters",
    "sum_adapter_losses",
    "with_adapters",
]
