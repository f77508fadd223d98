"""Full-model checkpoints: :func:`save_model` and :func:`load_model`.

They keep orbax's own one-array-per-variable layout, so that large models
restore shard by shard, with the adapters' description in the metadata.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import flax.linen as nn
import jax
import orbax.checkpoint as ocp

from jadapters.checkpoint.arrays import array_entry, dtype_from_name
from jadapters.checkpoint.errors import CheckpointError, checkpoint_errors
from jadapters.checkpoint.fingerprint import base_fingerprint
from jadapters.checkpoint.metadata import KIND_MODEL, build_metadata, read_metadata
from jadapters.checkpoint.placement import add_specs, check_placement, require_adapted, target_model
from jadapters.checkpoint.records import adapter_record, spec_from_record
from jadapters.checkpoint.sharding import Shardings, default_device_sharding, sharding_for
from jadapters.checkpoint.storage import PathLike, absolute_path, checkpointer, write_checkpoint
from jadapters.checkpoint.trees import Variables, flatten, unflatten
from jadapters.errors import AdapterError
from jadapters.transform import AdaptedModule
from jadapters.tree import adapter_locations, split_adapters


def save_model(path: PathLike, adapted: AdaptedModule, variables: Variables, *, overwrite: bool = True) -> Path:
    """Saves the whole model (base and adapters, one orbax array per variable) with the adapters' description.

    Example:
        >>> import tempfile, jax, jax.numpy as jnp, flax.linen as nn
        >>> from jadapters import LinearAdapter, with_adapters, init_adapters
        >>> x = jnp.ones((1, 4))
        >>> model = with_adapters(nn.Dense(4), {"d": ""}).add_adapter("a", LinearAdapter(2))
        >>> variables = init_adapters(model, nn.Dense(4).init(jax.random.key(0), x), jax.random.key(1), x)
        >>> save_model(tempfile.mkdtemp() + "/model", model, variables).name
        'model'
    """
    adapted = require_adapted(adapted, "save_model")
    flat = flatten(variables)
    if not flat:
        raise CheckpointError("save_model: the variables tree is empty")
    adapter_vars, base = split_adapters(variables)
    locations = adapter_locations(adapter_vars)
    records = []
    for spec in adapted.adapters:
        own = flatten(split_adapters(adapter_vars, [spec.name])[0])
        arrays = [array_entry(p, leaf) for p, leaf in own]
        records.append(adapter_record(spec, locations.get(spec.name, []), arrays))
    metadata = build_metadata(KIND_MODEL, adapted, records, base_fingerprint(base, records))
    metadata["arrays"] = [array_entry(p, leaf) for p, leaf in flat]
    tree = unflatten([p for p, _ in flat], [leaf for _, leaf in flat])
    return write_checkpoint(path, ocp.args.PyTreeSave(tree), metadata, overwrite=overwrite, kind="pytree")


def load_model(
    path: PathLike, model: AdaptedModule | nn.Module, *, shardings: Shardings = None
) -> tuple[AdaptedModule, dict]:
    """Restores a :func:`save_model` checkpoint: ``(model with its adapters rebuilt, variables)``.

    ``model`` is the base Flax module (or an :class:`AdaptedModule` without
    adapters); each array is restored by orbax directly onto its sharding
    (default: the default device).

    Example:
        >>> import tempfile, jax, jax.numpy as jnp, flax.linen as nn
        >>> from jadapters import LinearAdapter, with_adapters, init_adapters
        >>> x = jnp.ones((1, 4))
        >>> model = with_adapters(nn.Dense(4), {"d": ""}).add_adapter("a", LinearAdapter(2))
        >>> variables = init_adapters(model, nn.Dense(4).init(jax.random.key(0), x), jax.random.key(1), x)
        >>> path = save_model(tempfile.mkdtemp() + "/model", model, variables)
        >>> restored, restored_variables = load_model(path, nn.Dense(4))
        >>> restored.adapter_names()
        ['a']
    """
    path = absolute_path(path)
    metadata = read_metadata(path, KIND_MODEL)
    adapted = target_model(model, metadata, "load_model")
    if adapted.adapters:
        raise AdapterError(
            f"load_model restores a whole model, adapters included; pass the model without adapters "
            f"(this one has {adapted.adapter_names()})"
        )
    records = metadata["adapters"]
    check_placement(adapted, metadata, records)
    specs = [spec_from_record(r, path) for r in records]
    entries = metadata["arrays"]
    default = default_device_sharding()
    abstract_leaves = []
    for entry in entries:
        shape, dtype = tuple(entry["shape"]), dtype_from_name(entry["dtype"], path)
        sharding = sharding_for(shardings, tuple(entry["path"]), shape, dtype) or default
        abstract_leaves.append(jax.ShapeDtypeStruct(shape, dtype, sharding=sharding))
    abstract = unflatten([tuple(e["path"]) for e in entries], abstract_leaves)
    with checkpoint_errors(path):
        restored = checkpointer("pytree").restore(path, args=ocp.args.PyTreeRestore(
            abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract)))
    return add_specs(adapted, specs), _plain_dicts(restored)


def _plain_dicts(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {k: _plain_dicts(v) for k, v in tree.items()}
    return tree
