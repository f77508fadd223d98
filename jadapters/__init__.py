"""jadapters: adapters for any Flax model, NeMo's semantics, AdapterHub's and PEFT's methods.

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

from jadapters.adapters import (
    IA3,
    Bottleneck,
    IA3Config,
    LinearAdapter,
    LoRA,
    LoraConfig,
    MultiHeadAttentionAdapter,
    PrefixTuning,
    PromptTuning,
    VeRA,
    VeraConfig,
)
from jadapters.adapters.bottleneck import (
    BnConfig,
    CompacterConfig,
    CompacterPlusPlusConfig,
    DoubleSeqBnConfig,
    ParBnConfig,
    SeqBnConfig,
)
from jadapters.adapters.prefix import PrefixTuningConfig
from jadapters.adapters.prompt import PromptTuningConfig
from jadapters.checkpoint import (
    CheckpointError,
    adapter_checkpoint_manager,
    inspect_checkpoint,
    load_adapters,
    load_model,
    restore_training_state,
    save_adapters,
    save_model,
    save_training_state,
)
from jadapters.bank import AdapterBank, AdapterBankConfig, clear_slot, hotswap_adapter
from jadapters.combination import add_weighted_adapter, average_adapter
from jadapters.context import LOSS_COLLECTION, AdapterContext, sum_adapter_losses
from jadapters.discovery import list_modules
from jadapters.errors import AdapterError, UnknownAdapterError
from jadapters.merge import merge_adapters, unload_adapters, unmerge_adapters
from jadapters.peft_format import load_peft, save_peft
from jadapters.adapterhub_format import load_adapterhub, load_adapterhub_fusion, save_adapterhub
from jadapters.nemo_format import load_nemo_adapters, load_nemo_state_dict
from jadapters.presets import Preset
from jadapters.registry import register_adapter, register_strategy
from jadapters.strategies import MHAResidualAdd, ParallelAdd, ResidualAdd, ReturnResult, Strategy
from jadapters.summary import adapter_summary
from jadapters.composition import Average, BatchSplit, Fuse, FusionConfig, Parallel, Split, Stack
from jadapters.training import TrainState, adapter_optimizer, combine, fit, make_train_step, partition
from jadapters.transform import AdaptedModule, AdapterSpec, init_adapters, with_adapters
from jadapters.tree import count_parameters, merge_trees, split_adapters
from jadapters.union import ConfigUnion, MAMConfig, UniPELTConfig

__version__ = "0.2.0"

__all__ = [
    # placing adapters
    "with_adapters",
    "init_adapters",
    "AdaptedModule",
    "AdapterSpec",
    "Preset",
    "list_modules",
    "adapter_summary",
    # adapters
    "LinearAdapter",
    "MultiHeadAttentionAdapter",
    "LoRA",
    "IA3",
    "VeRA",
    "Bottleneck",
    "PromptTuning",
    "PrefixTuning",
    # methods by config (PEFT's and AdapterHub's field names)
    "LoraConfig",
    "IA3Config",
    "VeraConfig",
    "BnConfig",
    "SeqBnConfig",
    "DoubleSeqBnConfig",
    "ParBnConfig",
    "CompacterConfig",
    "CompacterPlusPlusConfig",
    "PromptTuningConfig",
    "PrefixTuningConfig",
    "ConfigUnion",
    "MAMConfig",
    "UniPELTConfig",
    # many adapters on one base: per-row banks, hot-swapping
    "AdapterBank",
    "AdapterBankConfig",
    "hotswap_adapter",
    "clear_slot",
    # composition (AdapterHub's blocks)
    "Stack",
    "Parallel",
    "BatchSplit",
    "Split",
    "Average",
    "Fuse",
    "FusionConfig",
    # merging into the base
    "merge_adapters",
    "unmerge_adapters",
    "unload_adapters",
    # combining adapters
    "add_weighted_adapter",
    "average_adapter",
    # strategies
    "Strategy",
    "AdapterContext",
    "ResidualAdd",
    "ReturnResult",
    "ParallelAdd",
    "MHAResidualAdd",
    "register_adapter",
    "register_strategy",
    # training
    "make_train_step",
    "fit",
    "TrainState",
    "partition",
    "combine",
    "adapter_optimizer",
    "sum_adapter_losses",
    "LOSS_COLLECTION",
    # trees
    "split_adapters",
    "merge_trees",
    "count_parameters",
    # checkpoints
    "save_adapters",
    "load_adapters",
    "save_model",
    "load_model",
    "adapter_checkpoint_manager",
    "save_training_state",
    "restore_training_state",
    "inspect_checkpoint",
    # PEFT's format
    "load_peft",
    "save_peft",
    # AdapterHub's format
    "load_adapterhub",
    "load_adapterhub_fusion",
    "save_adapterhub",
    # NeMo's adapter files
    "load_nemo_adapters",
    "load_nemo_state_dict",
    # errors
    "AdapterError",
    "UnknownAdapterError",
    "CheckpointError",
]
