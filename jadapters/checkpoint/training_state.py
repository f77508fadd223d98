"""Periodic training checkpoints: :func:`adapter_checkpoint_manager`, :func:`save_training_state`, :func:`restore_training_state`.

An orbax ``CheckpointManager`` runs them (steps, retention, background
writes); each step holds the state's arrays packed (see
:mod:`jadapters.checkpoint.packing`) and, optionally, the adapters' description.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from jadapters.checkpoint.arrays import array_entry, dtype_from_name, leaf_dtype
from jadapters.checkpoint.errors import CheckpointError, checkpoint_errors
from jadapters.checkpoint.metadata import KIND_TRAINING, build_metadata, validate_metadata
from jadapters.checkpoint.packing import (
    PackedArraysHandler,
    PackedArraysSave,
    pack_arrays,
    restore_buffers,
    unpack_arrays,
)
from jadapters.checkpoint.placement import require_adapted
from jadapters.checkpoint.records import adapter_record
from jadapters.checkpoint.storage import PathLike, absolute_path
from jadapters.checkpoint.trees import flatten, variables_by_adapter
from jadapters.errors import AdapterError
from jadapters.transform import AdaptedModule


def adapter_checkpoint_manager(
    directory: PathLike,
    *,
    max_to_keep: int | None = 3,
    save_interval_steps: int = 1,
    async_save: bool = True,
    durable: bool = False,
    **options: Any,
) -> "ocp.CheckpointManager":
    """An orbax ``CheckpointManager`` for :func:`save_training_state` / :func:`restore_training_state`.

    Keeps the ``max_to_keep`` newest steps, saves every ``save_interval_steps``
    steps, writes in the background when ``async_save``, fsyncs when
    ``durable`` (see :func:`jadapters.checkpoint.save_adapters`). Other keyword
    arguments go to ``orbax.checkpoint.CheckpointManagerOptions``. Close it
    (or use it in a ``with`` block) so pending writes finish.

    Example:
        >>> import tempfile
        >>> with adapter_checkpoint_manager(tempfile.mkdtemp(), max_to_keep=2) as manager:
        ...     manager.latest_step() is None
        True
    """
    manager_options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        save_interval_steps=save_interval_steps,
        enable_async_checkpointing=async_save,
        create=True,
        **options,
    )
    return ocp.CheckpointManager(
        str(absolute_path(directory)), options=manager_options, item_handlers=PackedArraysHandler(durable=durable)
    )


def save_training_state(
    manager: "ocp.CheckpointManager",
    state: Any,
    adapted: AdaptedModule | None = None,
    *,
    step: int | None = None,
    force: bool = False,
    metrics: Mapping[str, float] | None = None,
) -> bool:
    """Saves a training state at its step if the manager's policy says so; True if it saved.

    ``state`` is a :class:`jadapters.training.TrainState` (its step, trained
    adapter params, optimizer state and PRNG key are saved; the frozen base
    never is) or any pytree of arrays, with ``step`` given. With ``adapted``,
    the adapters' description is saved too, so ``jadapters inspect`` shows it.
    Meant for the training loop's ``on_step`` callback.

    Example:
        >>> import tempfile, jax.numpy as jnp
        >>> with adapter_checkpoint_manager(tempfile.mkdtemp(), async_save=False) as manager:
        ...     save_training_state(manager, {"w": jnp.ones(3)}, step=10)
        ...     restore_training_state(manager, {"w": jnp.zeros(3)})["w"].tolist()
        True
        [1.0, 1.0, 1.0]
    """
    tree, _ = _training_tree(state)
    if step is None:
        if not _is_train_state(state):
            raise AdapterError("save_training_state: give step= for a state that is not a TrainState")
        step = int(state.step)
    step = int(step)
    if not force and not manager.should_save(step):
        return False
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    paths = [_key_path(p) for p, _ in flat]
    leaves, is_key = [], []
    for _, leaf in flat:
        key = _is_prng_key(leaf)
        leaves.append(jax.random.key_data(leaf) if key else leaf)
        is_key.append(key)
    buffers, index, checksums = pack_arrays(leaves, paths)
    for entry, key in zip(index, is_key):
        if key:
            entry["prng_key"] = True
    records = []
    if adapted is not None:
        adapted = require_adapted(adapted, "save_training_state")
        trained = flatten(state.trainable) if _is_train_state(state) else []
        groups = variables_by_adapter(trained, adapted.adapter_names())
        for spec in adapted.adapters:
            indices, locations = groups[spec.name]
            records.append(adapter_record(spec, locations, [array_entry(*trained[i]) for i in indices]))
    metadata = build_metadata(KIND_TRAINING, adapted, records, {"modules": {}, "digest": None})
    metadata.update(step=step, state_arrays=index, buffers=checksums)
    return bool(manager.save(step, args=PackedArraysSave(buffers), custom_metadata=metadata,
                             metrics=dict(metrics) if metrics else None, force=force))


def restore_training_state(manager: "ocp.CheckpointManager", template: Any, step: int | None = None) -> Any:
    """The state saved at ``step`` (default: the latest), shaped and placed like ``template``.

    ``template`` is a state of the same structure, e.g. a fresh
    ``train_step.init(variables, rng)``: each array goes to its template
    leaf's sharding, and a TrainState keeps the template's frozen base.

    Example:
        >>> import tempfile, jax.numpy as jnp
        >>> with adapter_checkpoint_manager(tempfile.mkdtemp(), async_save=False) as manager:
        ...     _ = save_training_state(manager, {"w": jnp.ones(2)}, step=5)
        ...     manager.latest_step(), restore_training_state(manager, {"w": jnp.zeros(2)})["w"].tolist()
        (5, [1.0, 1.0])
    """
    manager.wait_until_finished()
    directory = absolute_path(str(manager.directory))
    if step is None:
        step = manager.latest_step()
        if step is None:
            raise CheckpointError(f"no training checkpoint in {directory}")
    elif step not in manager.all_steps():
        raise CheckpointError(f"no training checkpoint for step {step} in {directory}; steps: {list(manager.all_steps())}")
    where = directory / str(step)
    with checkpoint_errors(where):
        metadata = validate_metadata(manager.metadata(step).custom_metadata, where, KIND_TRAINING)
    tree, rebuild = _training_tree(template)
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    index = metadata["state_arrays"]
    saved = {tuple(e["path"]): e for e in index}
    wanted = [_key_path(p) for p, _ in flat]
    missing = [p for p in wanted if p not in saved]
    extra = [p for p in saved if p not in set(wanted)]
    if missing or extra:
        raise CheckpointError(
            f"training checkpoint {where} does not match the template: "
            f"missing {['/'.join(p) for p in missing][:8]}, unexpected {['/'.join(p) for p in extra][:8]}"
        )
    entries = []
    for key_path, (_, leaf) in zip(wanted, flat):
        entry = saved[key_path]
        data = jax.random.key_data(leaf) if _is_prng_key(leaf) else leaf
        shape, dtype = tuple(np.shape(data)), np.dtype(leaf_dtype(data))
        if tuple(entry["shape"]) != shape or dtype_from_name(entry["dtype"], where) != dtype:
            raise CheckpointError(
                f"training checkpoint {where}: {'/'.join(key_path)} was saved with shape {tuple(entry['shape'])} "
                f"{entry['dtype']}, the template has {shape} {dtype.name}"
            )
        entries.append(entry)
    buffers = restore_buffers(functools.partial(manager.restore, step), metadata["buffers"], where)
    arrays = unpack_arrays(buffers, entries, where)
    leaves = [_like_template(leaf, array, entry) for (_, leaf), array, entry in zip(flat, arrays, entries)]
    return rebuild(jax.tree_util.tree_unflatten(treedef, leaves))


def _like_template(leaf: Any, array: np.ndarray, entry: Mapping[str, Any]) -> Any:
    """A restored array on its template leaf's sharding, as a PRNG key of the template's kind where it was one."""
    if entry.get("prng_key"):
        impl = jax.random.key_impl(leaf)
        data = jax.device_put(array, leaf.sharding) if isinstance(leaf, jax.Array) else array
        return jax.random.wrap_key_data(data, impl=impl)
    if isinstance(leaf, jax.Array):
        return jax.device_put(array, leaf.sharding)
    return jax.numpy.asarray(array)


def _key_path(path: tuple) -> tuple[str, ...]:
    out = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                out.append(str(getattr(k, attr)))
                break
        else:
            out.append(str(k))
    return tuple(out)


def _is_prng_key(leaf: Any) -> bool:
    return isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def _is_train_state(state: Any) -> bool:
    return all(hasattr(state, a) for a in ("step", "trainable", "frozen", "opt_state")) and hasattr(state, "replace")


def _training_tree(state: Any) -> tuple[Any, Callable[[Any], Any]]:
    """The part of a state that a training checkpoint holds, and how to put it back."""
    if _is_train_state(state):
        tree = {"step": state.step, "trainable": state.trainable, "opt_state": state.opt_state}
        if getattr(state, "rng", None) is not None:
            tree["rng"] = state.rng
        return tree, lambda restored: state.replace(**restored)
    return state, lambda restored: restored

