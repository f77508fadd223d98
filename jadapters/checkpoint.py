"""Adapter-only checkpoints, full-model checkpoints and periodic training checkpoints, on orbax.

An adapter checkpoint holds the adapters' arrays and, as JSON, everything
needed to rebuild them without Python code: per adapter its type and
hyperparameters, strategy, placement (module names, target patterns and the
concrete module paths holding its variables) and enabled flag; the model's
placement config; the library version; and a fingerprint of the base model
(paths, shapes and dtypes of the params of every module an adapter sits on).

Layout and speed. Orbax's array handler pays a fixed cost per array saved or
restored (about a millisecond) plus several milliseconds of tensorstore
machinery per save, far more than the bytes of a typical adapter checkpoint.
So the adapters' arrays are packed into one flat buffer per dtype, saved as
ONE ``<dtype>.npy`` file each by a small orbax checkpoint handler
(:class:`PackedArraysHandler`), with an index (path, shape, dtype, offset)
and a CRC32 per buffer in the JSON metadata, which travels as the orbax
checkpoint's ``custom_metadata``. The directory is an ordinary orbax
checkpoint: orbax's ``Checkpointer`` writes it into a temporary directory and
commits it by renaming, and ``CheckpointManager`` runs the periodic training
checkpoints. Full-model checkpoints (:func:`save_model`) keep orbax's own
one-array-per-variable layout, so that large models restore shard by shard.

Atomicity. Orbax saves into a fresh sibling directory (itself written as a
temporary directory and renamed when complete); jadapters then swaps it with
the old checkpoint in one ``renameat2(RENAME_EXCHANGE)`` (Linux;
elsewhere two renames), and deletes the old one only after the new one is in
place: a process killed at any point leaves the previous checkpoint loadable.
Concurrent saves to the same path are not supported.

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

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import functools
import hashlib
import importlib
import json
import math
import os
import shutil
import sys
import uuid
import zlib
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence, Union

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from jadapters.errors import AdapterError, UnknownAdapterError
from jadapters.naming import split_adapter_name
from jadapters.registry import class_path, registered_name, resolve_class
from jadapters.strategies import Strategy
from jadapters.transform import AdaptedModule, AdapterSpec, with_adapters
from jadapters.tree import ADAPTERS_KEY, adapter_locations, adapter_name_at, merge_trees, split_adapters

#: Value of the ``format`` field of every jadapters checkpoint's metadata.
FORMAT = "jadapters"
#: Version of the metadata layout; a reader refuses newer ones.
FORMAT_VERSION = 1
KIND_ADAPTERS, KIND_MODEL, KIND_TRAINING = "adapters", "model", "training_state"

PathLike = Union[str, "os.PathLike[str]"]
Variables = Mapping[str, Any]
#: Where restored arrays go: one sharding for all, a function of
#: ``(path, shape, dtype)`` (path '/'-joined, e.g. ``'params/enc/__adapters__/a/up/kernel'``),
#: or a nested mapping shaped like the variables, with a sharding at each leaf.
Shardings = Union["jax.sharding.Sharding", Callable[[str, tuple, Any], "jax.sharding.Sharding"], Mapping[str, Any], None]

_STAGING = "jadapters-staging"
_PREVIOUS = "jadapters-previous"


class CheckpointError(AdapterError):
    """A checkpoint is missing, incomplete, corrupted, or does not fit the model.

    Example:
        >>> isinstance(CheckpointError("x"), ValueError)
        True
    """


# --------------------------------------------------------------------------- public API


def save_adapters(
    path: PathLike,
    adapted: AdaptedModule,
    variables: Variables,
    name: str | Sequence[str] | None = None,
    *,
    overwrite: bool = True,
    durable: bool = False,
) -> Path:
    """Saves the adapters ``name`` (one, a list, or None: all) of ``adapted``; returns the absolute path.

    Only the adapters' variables and their JSON description are written. An
    existing jadapters checkpoint at ``path`` is replaced atomically (unless
    ``overwrite=False``); anything else there is never touched. A killed
    process never leaves a damaged checkpoint; ``durable=True`` also fsyncs,
    against power loss (like ``numpy.save`` and ``torch.save``, the default does not).

    Example:
        >>> import tempfile, jax, jax.numpy as jnp, flax.linen as nn
        >>> from jadapters import LinearAdapter, with_adapters, init_adapters
        >>> x = jnp.ones((1, 4))
        >>> model = with_adapters(nn.Dense(4), {"d": ""}).add_adapter("a", LinearAdapter(2))
        >>> variables = init_adapters(model, nn.Dense(4).init(jax.random.key(0), x), jax.random.key(1), x)
        >>> save_adapters(tempfile.mkdtemp() + "/a", model, variables).name
        'a'
    """
    adapted = _require_adapted(adapted, "save_adapters")
    names = _names_to_save(adapted, name)
    wanted = set(names)
    flat, entries_of, locations = [], {n: [] for n in names}, {n: [] for n in names}
    for key_path, leaf in _flatten(variables):
        owner, location = _owner_and_location(key_path)
        if owner in wanted:
            entries_of[owner].append(len(flat))
            flat.append((key_path, leaf))
            if location not in locations[owner]:
                locations[owner].append(location)
    buffers, index, checksums = _pack([leaf for _, leaf in flat], [p for p, _ in flat])
    records = []
    for spec in (s for s in adapted.adapters if s.name in wanted):
        arrays = [index[i] for i in entries_of[spec.name]]
        records.append(_adapter_record(spec, locations[spec.name], arrays))
    fingerprint = _base_fingerprint(variables, [loc for r in records for loc in r["locations"]])
    metadata = _metadata(KIND_ADAPTERS, adapted, records, fingerprint)
    metadata["buffers"] = checksums
    kind = "packed-durable" if durable else "packed"
    return _write_atomically(path, PackedArraysSave(buffers), metadata, overwrite=overwrite, kind=kind)


def load_adapters(
    path: PathLike,
    adapted: AdaptedModule | nn.Module,
    variables: Variables,
    name: str | Sequence[str] | None = None,
    *,
    shardings: Shardings = None,
    strict: bool = True,
) -> tuple[AdaptedModule, dict]:
    """Adds the saved adapters ``name`` (one, a list, or None: all in the file); returns ``(model, variables)``.

    ``adapted`` is the model without those adapters (a plain Flax module is
    wrapped with the saved placement); ``variables`` holds its base params.
    Adapters are rebuilt from the metadata with their saved enabled flags.
    ``strict`` checks the base fingerprint and the module placement. Nothing
    is mutated, and every error is raised before anything is built.
    ``shardings`` places the arrays (default: replicated over the mesh of the
    base params when they have one, else the default device).

    Example:
        >>> import tempfile, jax, jax.numpy as jnp, flax.linen as nn
        >>> from jadapters import LinearAdapter, with_adapters, init_adapters
        >>> x = jnp.ones((1, 4))
        >>> base = nn.Dense(4).init(jax.random.key(0), x)
        >>> model = with_adapters(nn.Dense(4), {"d": ""}).add_adapter("a", LinearAdapter(2), enabled=False)
        >>> path = save_adapters(tempfile.mkdtemp() + "/a", model, init_adapters(model, base, jax.random.key(1), x))
        >>> restored, variables = load_adapters(path, nn.Dense(4), base)
        >>> restored.adapter_names(), restored.get_enabled_adapters()
        (['a'], [])
    """
    path = _absolute(path)
    metadata = _read_metadata(path, KIND_ADAPTERS)
    records = _select_records(metadata, name, path)
    adapted = _target_model(adapted, metadata, "load_adapters")
    _check_new_names(adapted, variables, records)
    if strict:
        _check_placement(adapted, metadata, records)
        _check_fingerprint(variables, metadata, [loc for r in records for loc in r["locations"]], path)
    specs = [_spec_from_record(r, path) for r in records]
    new_model = _add_specs(adapted, specs)
    entries = [e for r in records for e in r["arrays"]]
    buffers = _read_buffers(path, metadata, needed={e["dtype"] for e in entries})
    arrays = _unpack(buffers, entries, path)
    placed = _place(arrays, entries, shardings, variables)
    loaded = _unflatten([tuple(e["path"]) for e in entries], placed)
    return new_model, merge_trees(variables, loaded)


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
    adapted = _require_adapted(adapted, "save_model")
    flat = _flatten(variables)
    if not flat:
        raise CheckpointError("save_model: the variables tree is empty")
    adapter_vars, base = split_adapters(variables)
    locations = adapter_locations(adapter_vars)
    records = []
    for spec in adapted.adapters:
        own = _flatten(split_adapters(adapter_vars, [spec.name])[0])
        arrays = [_array_entry(p, leaf) for p, leaf in own]
        records.append(_adapter_record(spec, locations.get(spec.name, []), arrays))
    fingerprint = _base_fingerprint(base, [loc for r in records for loc in r["locations"]])
    metadata = _metadata(KIND_MODEL, adapted, records, fingerprint)
    metadata["arrays"] = [_array_entry(p, leaf) for p, leaf in flat]
    tree = _unflatten([p for p, _ in flat], [leaf for _, leaf in flat])
    return _write_atomically(path, ocp.args.PyTreeSave(tree), metadata, overwrite=overwrite, kind="pytree")


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
    path = _absolute(path)
    metadata = _read_metadata(path, KIND_MODEL)
    adapted = _target_model(model, metadata, "load_model")
    if adapted.adapters:
        raise AdapterError(
            f"load_model restores a whole model, adapters included; pass the model without adapters "
            f"(this one has {adapted.adapter_names()})"
        )
    records = metadata["adapters"]
    _check_placement(adapted, metadata, records)
    specs = [_spec_from_record(r, path) for r in records]
    entries = metadata["arrays"]
    default = _default_device_sharding()
    abstract_leaves = []
    for entry in entries:
        shape, dtype = tuple(entry["shape"]), _dtype(entry["dtype"], path)
        sharding = _sharding_for(shardings, tuple(entry["path"]), shape, dtype) or default
        abstract_leaves.append(jax.ShapeDtypeStruct(shape, dtype, sharding=sharding))
    abstract = _unflatten([tuple(e["path"]) for e in entries], abstract_leaves)
    with _checkpoint_errors(path):
        restored = _checkpointer("pytree").restore(path, args=ocp.args.PyTreeRestore(
            abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract)))
    return _add_specs(adapted, specs), _plain_dicts(restored)


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint holds; ``str()`` is a table, :meth:`as_dict` is JSON-ready.

    Attributes:
        path: the checkpoint directory.
        kind: ``'adapters'``, ``'model'`` or ``'training_state'``.
        metadata: the checkpoint's JSON metadata, as saved.
        disk_bytes: bytes of all files in the directory.
    """

    path: str
    kind: str
    metadata: Mapping[str, Any]
    disk_bytes: int

    @property
    def adapters(self) -> list[dict]:
        """One row per adapter: name, type, modules, targets, locations, enabled, params, bytes."""
        rows = []
        for r in self.metadata.get("adapters", []):
            rows.append({
                "name": r["name"],
                "type": r["type"],
                "modules": list(r["modules"]),
                "targets": list(r["targets"]),
                "locations": list(r["locations"]),
                "enabled": r["enabled"],
                "params": r["num_params"],
                "bytes": r["bytes"],
                "hyperparameters": _decode_value(r["hyperparameters"]),
                "strategy": r["strategy"]["class_path"].rpartition(".")[2],
            })
        return rows

    def as_dict(self) -> dict:
        fingerprint = self.metadata.get("base_fingerprint", {})
        return {
            "path": self.path,
            "kind": self.kind,
            "library_version": self.metadata.get("library_version"),
            "format_version": self.metadata.get("format_version"),
            "disk_bytes": self.disk_bytes,
            "step": self.metadata.get("step"),
            "adapters": [dict(r, hyperparameters=_jsonable(r["hyperparameters"])) for r in self.adapters],
            "placement": self.metadata.get("placement"),
            "base_fingerprint": {
                "digest": fingerprint.get("digest"),
                "params": {m: dict(p) for m, p in fingerprint.get("modules", {}).items()},
            },
        }

    def __str__(self) -> str:
        fingerprint = self.metadata.get("base_fingerprint", {})
        modules = fingerprint.get("modules", {})
        n_params = sum(len(p) for p in modules.values())
        head = [
            f"checkpoint   {self.path}",
            f"kind         {self.kind}" + (f" (step {self.metadata['step']})" if "step" in self.metadata else ""),
            f"written by   jadapters {self.metadata.get('library_version')} (format {self.metadata.get('format_version')})",
            f"on disk      {_human_bytes(self.disk_bytes)}",
            f"base model   fingerprint {fingerprint['digest']}: {n_params} params in {len(modules)} modules"
            if fingerprint.get("digest") else "base model   no fingerprint recorded",
        ]
        placement = self.metadata.get("placement") or {}
        if placement.get("modules"):
            declared = ", ".join(f"{m} -> {list(t)}" for m, t in placement["modules"].items())
            head.append(f"placement    {declared}; global: {placement.get('global_modules', [])}")
        columns = ("name", "type", "placement", "where", "enabled", "params", "bytes")
        rows = [columns]
        for r in self.adapters:
            where = r["locations"]
            shown = ", ".join(where[:3]) + (f", ... ({len(where)} modules)" if len(where) > 3 else "")
            rows.append((
                r["name"],
                r["type"],
                ("+".join(r["modules"]) + ":" if r["modules"] else "global: ") + ", ".join(r["targets"]),
                shown or "-",
                "yes" if r["enabled"] else "no",
                f"{r['params']:,}",
                _human_bytes(r["bytes"]),
            ))
        return "\n".join(head) + "\n\n" + _table(rows)


def inspect_checkpoint(path: PathLike) -> CheckpointInfo:
    """Reads what a jadapters checkpoint holds, without reading its arrays.

    ``path`` is a checkpoint of :func:`save_adapters`, :func:`save_model`, a
    step directory of :func:`adapter_checkpoint_manager`, or the manager's
    directory itself (its latest step is shown).

    Example:
        >>> import tempfile, jax, jax.numpy as jnp, flax.linen as nn
        >>> from jadapters import LinearAdapter, with_adapters, init_adapters
        >>> x = jnp.ones((1, 4))
        >>> model = with_adapters(nn.Dense(4), {"d": ""}).add_adapter("a", LinearAdapter(2))
        >>> variables = init_adapters(model, nn.Dense(4).init(jax.random.key(0), x), jax.random.key(1), x)
        >>> info = inspect_checkpoint(save_adapters(tempfile.mkdtemp() + "/a", model, variables))
        >>> info.kind, info.adapters[0]["params"]
        ('adapters', 24)
    """
    path = _absolute(path)
    if path.is_dir() and not (path / "_CHECKPOINT_METADATA").exists():
        steps = sorted(int(p.name) for p in path.iterdir() if p.name.isdigit() and (p / "_CHECKPOINT_METADATA").exists())
        if steps:
            path = path / str(steps[-1])
    metadata = _read_metadata(path, None)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return CheckpointInfo(str(path), metadata["kind"], metadata, size)


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
    ``durable`` (see :func:`save_adapters`). Other keyword
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
        str(_absolute(directory)), options=manager_options, item_handlers=PackedArraysHandler(durable=durable)
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
    buffers, index, checksums = _pack(leaves, paths)
    for entry, key in zip(index, is_key):
        if key:
            entry["prng_key"] = True
    if adapted is not None:
        adapted = _require_adapted(adapted, "save_training_state")
        trained = _flatten(state.trainable) if _is_train_state(state) else []
        records = []
        for spec in adapted.adapters:
            own = [(p, leaf) for p, leaf in trained if _owner_and_location(p)[0] == spec.name]
            where = list(dict.fromkeys(_owner_and_location(p)[1] for p, _ in own))
            records.append(_adapter_record(spec, where, [_array_entry(p, leaf) for p, leaf in own]))
        metadata = _metadata(KIND_TRAINING, adapted, records, {"modules": {}, "digest": None})
    else:
        metadata = _metadata(KIND_TRAINING, None, [], {"modules": {}, "digest": None})
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
    directory = _absolute(str(manager.directory))
    if step is None:
        step = manager.latest_step()
        if step is None:
            raise CheckpointError(f"no training checkpoint in {directory}")
    elif step not in manager.all_steps():
        raise CheckpointError(f"no training checkpoint for step {step} in {directory}; steps: {list(manager.all_steps())}")
    where = directory / str(step)
    with _checkpoint_errors(where):
        metadata = _validate_metadata(manager.metadata(step).custom_metadata, where, KIND_TRAINING)
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
        shape, dtype = tuple(np.shape(data)), np.dtype(getattr(data, "dtype", np.asarray(data).dtype))
        if tuple(entry["shape"]) != shape or _dtype(entry["dtype"], where) != dtype:
            raise CheckpointError(
                f"training checkpoint {where}: {'/'.join(key_path)} was saved with shape {tuple(entry['shape'])} "
                f"{entry['dtype']}, the template has {shape} {dtype.name}"
            )
        entries.append(entry)
    with _checkpoint_errors(where):
        buffers = manager.restore(step, args=PackedArraysRestore(_layout(metadata["buffers"])))
    _verify_buffers(buffers, metadata["buffers"], where)
    arrays = _unpack(buffers, entries, where)
    leaves = []
    for (_, leaf), array, entry in zip(flat, arrays, entries):
        if entry.get("prng_key"):
            impl = jax.random.key_impl(leaf)
            data = jax.device_put(array, leaf.sharding) if isinstance(leaf, jax.Array) else array
            leaves.append(jax.random.wrap_key_data(data, impl=impl))
        elif isinstance(leaf, jax.Array):
            leaves.append(jax.device_put(array, leaf.sharding))
        else:
            leaves.append(jax.numpy.asarray(array))
    return rebuild(jax.tree_util.tree_unflatten(treedef, leaves))


# --------------------------------------------------------------------------- metadata


def _metadata(kind: str, adapted: AdaptedModule | None, records: list[dict], fingerprint: dict) -> dict:
    from jadapters import __version__

    placement = None
    if adapted is not None:
        placement = {
            "modules": {m: list(t) for m, t in adapted.placement.modules},
            "global_modules": list(adapted.placement.global_modules),
            "accepted_types": {m: [class_path(t) for t in types] for m, types in adapted.placement.accepted_types},
        }
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "library_version": __version__,
        "placement": placement,
        "adapters": records,
        "base_fingerprint": fingerprint,
    }


def _adapter_record(spec: AdapterSpec, locations: list[str], arrays: list[dict]) -> dict:
    cls = type(spec.adapter)
    where = f"adapter {spec.name!r}"
    num_params = sum(math.prod(e["shape"]) for e in arrays)
    nbytes = sum(math.prod(e["shape"]) * _dtype(e["dtype"]).itemsize for e in arrays)
    return {
        "name": spec.name,
        "modules": list(spec.modules),
        "targets": list(spec.targets),
        "locations": list(locations),
        "enabled": bool(spec.enabled),
        "type": registered_name(cls),
        "class_path": class_path(cls),
        "hyperparameters": _encode_value(_dataclass_fields(spec.adapter, skip=("parent", "name")), f"{where}: hyperparameter"),
        "strategy": {
            "class_path": class_path(type(spec.strategy)),
            "fields": _encode_value(_dataclass_fields(spec.strategy), f"{where}: strategy field"),
        },
        "num_params": num_params,
        "bytes": nbytes,
        "arrays": arrays,
    }


def _dataclass_fields(obj: Any, skip: tuple[str, ...] = ()) -> dict:
    if not dataclasses.is_dataclass(obj):
        return {}
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.init and f.name not in skip}


def _encode_value(value: Any, where: str) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple):
        return {"__tuple__": [_encode_value(v, where) for v in value]}
    if isinstance(value, list):
        return [_encode_value(v, where) for v in value]
    if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
        return {"__dict__": {k: _encode_value(v, f"{where} {k!r}") for k, v in value.items()}}
    if isinstance(value, (np.dtype, type)):
        try:
            return {"__dtype__": np.dtype(jax.numpy.dtype(value)).name}
        except TypeError:
            pass
    raise CheckpointError(
        f"{where} has the value {value!r}, which cannot be stored as JSON, so the adapter could not be "
        f"rebuilt from the checkpoint; use plain values (numbers, strings, dtypes, tuples) in its fields"
    )


def _decode_value(value: Any) -> Any:
    if isinstance(value, list):
        return [_decode_value(v) for v in value]
    if isinstance(value, dict):
        if "__tuple__" in value:
            return tuple(_decode_value(v) for v in value["__tuple__"])
        if "__dict__" in value:
            return {k: _decode_value(v) for k, v in value["__dict__"].items()}
        if "__dtype__" in value:
            return jax.numpy.dtype(value["__dtype__"])
    return value


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, np.dtype):
        return value.name
    return value


def _spec_from_record(record: Mapping[str, Any], path: Path) -> AdapterSpec:
    where = f"checkpoint {path}: adapter {record['name']!r}"
    try:
        cls = resolve_class(record["type"])
    except AdapterError:
        try:
            cls = resolve_class(record["class_path"])
        except AdapterError:
            raise UnknownAdapterError(
                f"{where} has type {record['type']!r} ({record['class_path']}), which is neither registered "
                f"nor importable; import or register it before loading"
            ) from None
    hyperparameters = _decode_value(record["hyperparameters"])
    try:
        adapter = cls(**hyperparameters)
    except Exception as e:  # the adapter's own validation
        raise CheckpointError(f"{where}: cannot rebuild {cls.__name__}(**{hyperparameters}): {e}") from None
    strategy_cls = _import_class(record["strategy"]["class_path"], where)
    if not (isinstance(strategy_cls, type) and issubclass(strategy_cls, Strategy)):
        raise CheckpointError(f"{where}: strategy {record['strategy']['class_path']} is not a jadapters Strategy")
    fields = _decode_value(record["strategy"]["fields"])
    try:
        strategy = strategy_cls(**fields)
        strategy.validate()
        hash(strategy)
    except Exception as e:
        raise CheckpointError(f"{where}: cannot rebuild strategy {strategy_cls.__name__}(**{fields}): {e}") from None
    return AdapterSpec(
        name=record["name"],
        modules=tuple(record["modules"]),
        targets=tuple(record["targets"]),
        adapter=adapter,
        strategy=strategy,
        enabled=bool(record["enabled"]),
    )


def _import_class(path: str, where: str) -> type:
    module_name, _, qualname = path.rpartition(".")
    try:
        obj = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError, ValueError):
        raise CheckpointError(f"{where}: cannot import {path!r}") from None
    return obj


def _add_specs(adapted: AdaptedModule, specs: list[AdapterSpec]) -> AdaptedModule:
    for spec in specs:
        for module_name in spec.modules:
            accepted = adapted.placement.accepted(module_name)
            if accepted is not None and not isinstance(spec.adapter, accepted):
                raise AdapterError(
                    f"adapter {spec.name!r}: module {module_name!r} accepts only "
                    f"{[t.__name__ for t in accepted]} (or subclasses), got {type(spec.adapter).__name__}"
                )
    return adapted.clone(adapters=adapted.adapters + tuple(specs))


def _require_adapted(adapted: Any, what: str) -> AdaptedModule:
    if not isinstance(adapted, AdaptedModule):
        raise AdapterError(f"{what} expects the AdaptedModule returned by with_adapters, got {type(adapted).__name__}")
    return adapted


def _names_to_save(adapted: AdaptedModule, name: str | Sequence[str] | None) -> list[str]:
    if not adapted.adapters:
        raise AdapterError("save_adapters: the model has no adapters to save; add one with add_adapter")
    if name is None:
        return adapted.adapter_names()
    requested = [name] if isinstance(name, str) else list(name)
    if not requested:
        raise AdapterError(f"save_adapters: no adapter selected (name={name!r}); the model has {adapted.adapter_names()}")
    chosen = []
    for n in requested:
        _, bare = split_adapter_name(n)
        if bare not in adapted.adapter_names():
            raise UnknownAdapterError(f"no adapter named {bare!r} to save; the model has {adapted.adapter_names()}")
        if bare not in chosen:
            chosen.append(bare)
    return [n for n in adapted.adapter_names() if n in chosen]


def _select_records(metadata: Mapping[str, Any], name: str | Sequence[str] | None, path: Path) -> list[dict]:
    records = list(metadata["adapters"])
    if name is None:
        if not records:
            raise CheckpointError(f"checkpoint {path} holds no adapters")
        return records
    requested = [name] if isinstance(name, str) else list(name)
    if not requested:
        raise AdapterError(f"load_adapters: no adapter selected (name={name!r})")
    by_name = {r["name"]: r for r in records}
    available = [_qualified(r) for r in records]
    chosen: list[dict] = []
    for n in requested:
        modules, bare = split_adapter_name(n)
        record = by_name.get(bare)
        if record is None or (modules and tuple(modules) != tuple(record["modules"])):
            raise UnknownAdapterError(f"no adapter {n!r} in checkpoint {path}; it holds {available}")
        if record not in chosen:
            chosen.append(record)
    return [r for r in records if r in chosen]


def _qualified(record: Mapping[str, Any]) -> str:
    return f"{'+'.join(record['modules'])}:{record['name']}" if record["modules"] else record["name"]


def _target_model(model: Any, metadata: Mapping[str, Any], what: str) -> AdaptedModule:
    if isinstance(model, AdaptedModule):
        return model
    if not isinstance(model, nn.Module):
        raise AdapterError(f"{what} expects a Flax module or an AdaptedModule, got {type(model).__name__}")
    placement = metadata.get("placement") or {}
    accepted = {}
    for module_name, paths in (placement.get("accepted_types") or {}).items():
        try:
            accepted[module_name] = tuple(_import_class(p, "accepted type") for p in paths)
        except CheckpointError:
            continue  # a restriction we cannot import is not enforced
    return with_adapters(
        model,
        {m: list(t) for m, t in (placement.get("modules") or {}).items()},
        global_modules=placement.get("global_modules"),
        accepted_types=accepted or None,
    )


def _check_new_names(adapted: AdaptedModule, variables: Variables, records: list[dict]) -> None:
    present = set(adapted.adapter_names())
    in_variables = set(adapter_locations(variables))
    for r in records:
        if r["name"] in present:
            existing = adapted.get_adapter(r["name"])
            raise AdapterError(
                f"adapter {r['name']!r} already exists in the model (added as {existing.qualified_name!r}); "
                f"remove it first or load the others by name"
            )
        if r["name"] in in_variables:
            raise AdapterError(
                f"the variables already hold params of an adapter named {r['name']!r}; drop them with "
                f"jadapters.split_adapters before loading"
            )


def _check_placement(adapted: AdaptedModule, metadata: Mapping[str, Any], records: list[dict]) -> None:
    saved = (metadata.get("placement") or {}).get("modules") or {}
    declared = dict(adapted.placement.modules)
    for r in records:
        for module_name in r["modules"]:
            if module_name not in declared:
                raise CheckpointError(
                    f"adapter {r['name']!r} was saved on module {module_name!r} ({saved.get(module_name)}), which "
                    f"this model does not declare (it declares {list(declared)}); declare it in with_adapters, "
                    f"or pass strict=False to place the adapter at its saved targets {r['targets']}"
                )
            if module_name in saved and tuple(saved[module_name]) != tuple(declared[module_name]):
                raise CheckpointError(
                    f"adapter {r['name']!r}: module {module_name!r} targeted {list(saved[module_name])} when saved, "
                    f"but {list(declared[module_name])} in this model (pass strict=False to load anyway)"
                )


# --------------------------------------------------------------------------- base fingerprint


def _base_fingerprint(base: Variables, locations: Iterable[str]) -> dict:
    params = base.get("params", {}) if isinstance(base, Mapping) else {}
    modules = {loc: _module_params(params, loc) for loc in dict.fromkeys(locations)}
    encoded = json.dumps(modules, sort_keys=True).encode()
    return {"modules": modules, "digest": hashlib.sha256(encoded).hexdigest()[:16]}


def _module_params(params: Mapping[str, Any], location: str) -> dict[str, list]:
    node: Any = params
    for key in [k for k in location.split("/") if k]:
        if not isinstance(node, Mapping) or key not in node:
            return {}
        node = node[key]
    if not isinstance(node, Mapping):
        return {}
    out = {}
    for key_path, leaf in _flatten(node):
        if ADAPTERS_KEY in key_path:
            continue
        out["/".join(key_path)] = [list(np.shape(leaf)), _dtype_name(leaf)]
    return out


def _check_fingerprint(variables: Variables, metadata: Mapping[str, Any], locations: list[str], path: Path) -> None:
    saved = metadata["base_fingerprint"]["modules"]
    params = variables.get("params", {})
    problems = []
    for loc in dict.fromkeys(locations):
        expected = saved.get(loc, {})
        actual = _module_params(params, loc)  # adapters' own params are skipped
        for rel, (shape, dtype) in expected.items():
            full = f"{loc}/{rel}" if loc else rel
            if rel not in actual:
                problems.append(f"{full}: missing in this model (checkpoint base: {tuple(shape)} {dtype})")
            elif actual[rel] != [shape, dtype]:
                problems.append(
                    f"{full}: checkpoint base has shape {tuple(shape)} {dtype}, this model has "
                    f"{tuple(actual[rel][0])} {actual[rel][1]}"
                )
        for rel, (shape, dtype) in actual.items():
            if rel not in expected:
                full = f"{loc}/{rel}" if loc else rel
                problems.append(f"{full}: in this model ({tuple(shape)} {dtype}) but not in the checkpoint's base")
    if problems:
        shown = "\n  ".join(problems[:10]) + (f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else "")
        raise CheckpointError(
            f"checkpoint {path} was saved on a different base model (fingerprint "
            f"{metadata['base_fingerprint'].get('digest')}):\n  {shown}\n(pass strict=False to load anyway)"
        )


# --------------------------------------------------------------------------- packing


def _pack(leaves: list[Any], paths: list[tuple[str, ...]]) -> tuple[dict[str, list[np.ndarray]], list[dict], dict]:
    """Per dtype: the flat pieces of one buffer (in order), the index of every array in it, a checksum each.

    The pieces are not concatenated: :class:`PackedArraysHandler` writes them
    one after the other into one file, which spares a copy of every byte.
    """
    host = _to_host(leaves)
    pieces: dict[str, list[np.ndarray]] = {}
    sizes: dict[str, int] = {}
    crcs: dict[str, int] = {}
    index = []
    for path, array in zip(paths, host):
        dtype = _dtype_name(array)
        offset = sizes.get(dtype, 0)
        index.append({"path": list(path), "shape": list(array.shape), "dtype": dtype, "offset": offset})
        sizes[dtype] = offset + array.size
        if array.size:
            flat = np.ascontiguousarray(array).reshape(-1)
            pieces.setdefault(dtype, []).append(flat)
            crcs[dtype] = zlib.crc32(flat.view(np.uint8), crcs.get(dtype, 0))
    checksums = {dtype: {"size": sizes[dtype], "crc32": crcs[dtype]} for dtype in pieces}
    return pieces, index, checksums


def _unpack(buffers: Mapping[str, np.ndarray], entries: list[Mapping[str, Any]], path: Path) -> list[np.ndarray]:
    arrays = []
    for e in entries:
        shape = tuple(e["shape"])
        size = math.prod(shape)
        if size == 0:
            arrays.append(np.zeros(shape, _dtype(e["dtype"], path)))
            continue
        buffer = buffers.get(e["dtype"])
        if buffer is None or e["offset"] + size > buffer.size:
            raise CheckpointError(f"checkpoint {path} is corrupted: {'/'.join(e['path'])} lies outside its buffer")
        arrays.append(buffer[e["offset"] : e["offset"] + size].reshape(shape))
    return arrays


def _to_host(leaves: list[Any]) -> list[np.ndarray]:
    gathered, on_cpu = [], True
    for leaf in leaves:
        if isinstance(leaf, jax.Array):
            if not leaf.is_fully_addressable:
                from jax.experimental import multihost_utils

                leaf = multihost_utils.process_allgather(leaf, tiled=True)
            elif any(d.platform != "cpu" for d in leaf.sharding.device_set):
                on_cpu = False
        gathered.append(leaf)
    if on_cpu:  # host memory already: no transfer to batch
        return [np.asarray(x) for x in gathered]
    return [np.asarray(x) for x in jax.device_get(gathered)]


def _crc32(buffer: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(buffer).reshape(-1).view(np.uint8))


def _verify_buffers(buffers: Mapping[str, Any], checksums: Mapping[str, Any], path: Path) -> None:
    for dtype, expected in checksums.items():
        buffer = buffers.get(dtype)
        if buffer is None or np.size(buffer) != expected["size"]:
            raise CheckpointError(f"checkpoint {path} is corrupted: the {dtype} buffer is missing or has the wrong size")
        if _crc32(buffer) != expected["crc32"]:
            raise CheckpointError(f"checkpoint {path} is corrupted: the {dtype} buffer fails its CRC32 check")


# --------------------------------------------------------------------------- placement of restored arrays


def _place(arrays: list[np.ndarray], entries: list[Mapping[str, Any]], shardings: Shardings, variables: Variables) -> list:
    default = _default_adapter_sharding(variables) if shardings is None else None
    targets = []
    for array, e in zip(arrays, entries):
        sharding = _sharding_for(shardings, tuple(e["path"]), array.shape, array.dtype) if shardings is not None else default
        targets.append(sharding)
    if all(s is None for s in targets):
        return jax.device_put(arrays)
    out: list = [None] * len(arrays)
    batch_idx, batch_arrays, batch_shardings = [], [], []
    for i, (array, sharding) in enumerate(zip(arrays, targets)):
        if sharding is None:
            sharding = _default_device_sharding()
        if sharding.is_fully_addressable:
            batch_idx.append(i)
            batch_arrays.append(array)
            batch_shardings.append(sharding)
        else:
            out[i] = jax.make_array_from_callback(array.shape, sharding, lambda index, a=array: a[index])
    for i, placed in zip(batch_idx, jax.device_put(batch_arrays, batch_shardings)):
        out[i] = placed
    return out


def _sharding_for(shardings: Shardings, path: tuple[str, ...], shape: tuple, dtype: Any):
    if shardings is None:
        return None
    if isinstance(shardings, jax.sharding.Sharding):
        return shardings
    if callable(shardings):
        return shardings("/".join(path), shape, dtype)
    node: Any = shardings
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            raise AdapterError(f"shardings has no entry for {'/'.join(path)}")
        node = node[key]
    if not isinstance(node, jax.sharding.Sharding):
        raise AdapterError(f"shardings at {'/'.join(path)} is {node!r}, not a jax.sharding.Sharding")
    return node


def _default_adapter_sharding(variables: Variables):
    """Replicated over the base params' mesh when they are sharded over several devices, else None."""
    for leaf in jax.tree_util.tree_leaves(variables.get("params", {})):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, jax.sharding.NamedSharding) and len(sharding.device_set) > 1:
            return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
        return None
    return None


def _default_device_sharding() -> "jax.sharding.Sharding":
    return jax.sharding.SingleDeviceSharding(jax.devices()[0])


# --------------------------------------------------------------------------- orbax I/O


class PackedArraysHandler(ocp.AsyncCheckpointHandler):
    """An orbax checkpoint handler for a few flat host buffers: one ``<dtype>.npy`` file each.

    It exists for speed: orbax's array handler costs about a millisecond per
    array plus several for its tensorstore machinery, more than the bytes of a
    typical adapter checkpoint; a flat buffer needs none of that. Orbax still
    owns the checkpoint: temporary directory, commit by rename, step metadata,
    ``CheckpointManager`` policies. With ``durable=True`` the files and the
    directory are fsynced before the commit, so that a committed checkpoint
    survives a power loss, not only a killed process (which never damages a
    checkpoint either way); it costs a journal commit per save.

    Example:
        >>> import tempfile, numpy as np, orbax.checkpoint as ocp
        >>> checkpointer = ocp.Checkpointer(PackedArraysHandler())
        >>> path = tempfile.mkdtemp() + "/ckpt"
        >>> checkpointer.save(path, args=PackedArraysSave({"float32": np.arange(3.0, dtype=np.float32)}))
        >>> checkpointer.restore(path, args=PackedArraysRestore({"float32": ("float32", 3)}))["float32"].tolist()
        [0.0, 1.0, 2.0]
    """

    def __init__(self, *, durable: bool = False):
        self.durable = durable

    def _write(self, directory: epath.Path, buffers: Mapping[str, Any]) -> None:
        if jax.process_index() != 0:
            return
        for key, pieces in buffers.items():
            pieces = [pieces] if isinstance(pieces, np.ndarray) else list(pieces)
            header = np.lib.format.header_data_from_array_1_0(pieces[0])
            header["shape"] = (sum(p.size for p in pieces),)
            with open(os.path.join(os.fspath(directory), f"{key}.npy"), "wb") as f:
                np.lib.format.write_array_header_1_0(f, header)
                for piece in pieces:
                    data = memoryview(np.ascontiguousarray(piece).reshape(-1).view(np.uint8))
                    # Moderate writes: on Linux one multi-megabyte write() was measured
                    # several times slower than the same bytes in 128 KiB pieces.
                    for start in range(0, len(data), _WRITE_CHUNK):
                        f.write(data[start : start + _WRITE_CHUNK])
                if self.durable:
                    f.flush()
                    os.fsync(f.fileno())
        if self.durable:
            _fsync_directory(directory)

    def save(self, directory: epath.Path, args: "PackedArraysSave") -> None:
        self._write(directory, args.buffers)

    async def async_save(self, directory: epath.Path, args: "PackedArraysSave") -> list:
        # The pieces may be views of live device buffers (CPU); the background
        # write gets its own copy, taken before training goes on.
        buffers = {key: [np.array(p, copy=True) for p in ([v] if isinstance(v, np.ndarray) else v)]
                   for key, v in args.buffers.items()}

        async def write() -> None:
            self._write(directory, buffers)

        return [ocp.future.CommitFutureAwaitingContractedSignals(write(), name="jadapters_packed_save")]

    def restore(self, directory: epath.Path, args: "PackedArraysRestore") -> dict[str, np.ndarray]:
        out = {}
        for key, (dtype, size) in args.layout.items():
            file = os.path.join(os.fspath(directory), f"{key}.npy")
            if not os.path.exists(file):
                raise CheckpointError(f"checkpoint {directory} is incomplete: {key}.npy is missing")
            try:
                array = np.load(file, allow_pickle=False)
            except (ValueError, OSError, EOFError) as e:
                raise CheckpointError(f"checkpoint {directory} is corrupted: {key}.npy cannot be read ({e})") from None
            dtype = _dtype(dtype, directory)
            if array.dtype != dtype:
                if array.dtype.itemsize != dtype.itemsize:
                    raise CheckpointError(f"checkpoint {directory} is corrupted: {key}.npy holds {array.dtype}, not {dtype}")
                array = array.view(dtype)  # e.g. bfloat16, which .npy stores as raw 2-byte records
            if array.ndim != 1 or array.size != size:
                raise CheckpointError(
                    f"checkpoint {directory} is truncated or corrupted: {key}.npy has {array.size} values, "
                    f"the index expects {size}"
                )
            out[key] = array
        return out

    def metadata(self, directory: epath.Path) -> None:
        return None

    def finalize(self, directory: epath.Path) -> None:
        pass

    def close(self) -> None:
        pass


@ocp.args.register_with_handler(PackedArraysHandler, for_save=True)
@dataclasses.dataclass
class PackedArraysSave(ocp.args.CheckpointArgs):
    """Save args of :class:`PackedArraysHandler`: ``{key: 1-D host array, or a list of them written end to end}``."""

    buffers: Mapping[str, Any]


@ocp.args.register_with_handler(PackedArraysHandler, for_restore=True)
@dataclasses.dataclass
class PackedArraysRestore(ocp.args.CheckpointArgs):
    """Restore args of :class:`PackedArraysHandler`: ``{key: (dtype name, size)}``."""

    layout: Mapping[str, tuple[str, int]]


_CHECKPOINTERS: dict = {}
_WRITE_CHUNK = 1 << 17


def _checkpointer(kind: str) -> "ocp.Checkpointer":
    """A cached synchronous orbax checkpointer: ``'packed'`` (or ``'packed-durable'``) buffers, or a ``'pytree'``."""
    if kind not in _CHECKPOINTERS:
        if kind.startswith("packed"):
            handler = PackedArraysHandler(durable=kind == "packed-durable")
        else:
            handler = ocp.PyTreeCheckpointHandler()
        _CHECKPOINTERS[kind] = ocp.Checkpointer(handler)
    return _CHECKPOINTERS[kind]


def _fsync_directory(directory: PathLike) -> None:
    try:
        fd = os.open(os.fspath(directory), os.O_RDONLY)
    except OSError:
        return  # e.g. platforms that cannot open directories
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _layout(checksums: Mapping[str, Mapping[str, Any]]) -> dict[str, tuple[str, int]]:
    return {key: (key, int(c["size"])) for key, c in checksums.items()}


def _absolute(path: PathLike) -> Path:
    return Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


def _write_atomically(path: PathLike, args: "ocp.args.CheckpointArgs", metadata: dict, *, overwrite: bool, kind: str) -> Path:
    path = _absolute(path)
    if os.path.lexists(path):
        if not overwrite:
            raise CheckpointError(f"{path} already exists (pass overwrite=True to replace it)")
        _require_replaceable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(path)
    staging = path.parent / f".{path.name}.{_STAGING}-{uuid.uuid4().hex[:12]}"
    try:
        _checkpointer(kind).save(staging, args=args, custom_metadata=metadata)
        _move_into_place(staging, path)
        if kind != "packed":  # durable saves: make the rename itself durable
            _fsync_directory(path.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path


def _require_replaceable(path: Path) -> None:
    if path.is_dir() and not any(path.iterdir()):
        return
    try:
        _read_metadata(path, None)
    except CheckpointError:
        raise CheckpointError(
            f"{path} exists and is not a jadapters checkpoint; refusing to replace it"
        ) from None


def _remove_leftovers(path: Path) -> None:
    """Deletes what saves killed earlier left beside ``path`` (never the only copy of a checkpoint)."""
    staging, previous = f".{path.name}.{_STAGING}-", f".{path.name}.{_PREVIOUS}-"
    with os.scandir(path.parent) as entries:
        names = [e.name for e in entries if e.name.startswith((staging, previous))]
    keep_previous = not path.exists()
    for name in names:
        if name.startswith(staging) or not keep_previous:
            shutil.rmtree(path.parent / name, ignore_errors=True)


def _move_into_place(staging: Path, path: Path) -> None:
    try:
        os.rename(staging, path)  # atomic; fails if path is a non-empty directory
        return
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.EISDIR, errno.ENOTDIR):
            raise
    if _exchange(staging, path):
        shutil.rmtree(staging, ignore_errors=True)  # staging now holds the previous checkpoint
        return
    previous = path.parent / f".{path.name}.{_PREVIOUS}-{staging.name.rpartition('-')[2]}"
    os.rename(path, previous)
    os.rename(staging, path)
    shutil.rmtree(previous, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swaps two paths with Linux's ``renameat2(RENAME_EXCHANGE)``; False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


@contextlib.contextmanager
def _checkpoint_errors(path: Path) -> Iterator[None]:
    """Turns what orbax or the file system raise on a damaged checkpoint into a :class:`CheckpointError`."""
    try:
        yield
    except AdapterError:
        raise
    except Exception as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: it is incomplete or corrupted ({message[:300]})") from error


def _read_metadata(path: Path, kind: str | None) -> dict:
    if not path.exists():
        hint = ""
        previous = sorted(path.parent.glob(f".{path.name}.{_PREVIOUS}-*")) if path.parent.exists() else []
        if previous:
            hint = f"; an interrupted save left the previous checkpoint at {previous[-1]} (rename it to {path.name})"
        raise CheckpointError(f"no checkpoint at {path}{hint}")
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a checkpoint directory")
    if not (path / "_CHECKPOINT_METADATA").exists():
        raise CheckpointError(f"{path} is not a jadapters checkpoint (no orbax checkpoint metadata in it)")
    with _checkpoint_errors(path):
        custom = ocp.metadata.get_step_metadata(path).custom_metadata
    return _validate_metadata(custom, path, kind)


def _validate_metadata(custom: Any, path: Path, kind: str | None) -> dict:
    if not isinstance(custom, Mapping) or custom.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a jadapters checkpoint (its metadata is missing or unreadable)")
    version = custom.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} was written by a newer jadapters (format {version}, written by "
            f"{custom.get('library_version')}); upgrade jadapters to read it"
        )
    if kind is not None and custom.get("kind") != kind:
        hint = {KIND_MODEL: "load_model", KIND_ADAPTERS: "load_adapters", KIND_TRAINING: "restore_training_state"}
        raise CheckpointError(
            f"{path} is a {custom.get('kind')!r} checkpoint, not {kind!r}; read it with {hint.get(custom.get('kind'), '?')}"
        )
    try:
        for r in custom.get("adapters", []):
            r["name"], r["modules"], r["targets"], r["locations"], r["type"], r["strategy"]["class_path"]
            for e in r["arrays"]:
                e["path"], e["shape"], e["dtype"], e.get("offset")
        custom["base_fingerprint"]["modules"]
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path} has malformed metadata (missing {e})") from None
    return dict(custom)


def _read_buffers(path: Path, metadata: Mapping[str, Any], needed: set[str]) -> dict[str, np.ndarray]:
    checksums = {k: v for k, v in metadata.get("buffers", {}).items() if k in needed}
    if not checksums:
        return {}
    with _checkpoint_errors(path):
        restored = _checkpointer("packed").restore(path, args=PackedArraysRestore(_layout(checksums)))
    _verify_buffers(restored, checksums, path)
    return restored


# --------------------------------------------------------------------------- trees


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    out = []
    for key, sub in tree.items():
        if type(sub) is dict or isinstance(sub, Mapping):
            out.extend(_flatten(sub, prefix + (str(key),)))
        else:
            out.append((prefix + (str(key),), sub))
    return out


def _unflatten(paths: Iterable[tuple[str, ...]], leaves: Iterable[Any]) -> dict:
    out: dict = {}
    for path, leaf in zip(paths, leaves):
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = leaf
    return out


def _plain_dicts(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {k: _plain_dicts(v) for k, v in tree.items()}
    return tree


def _array_entry(path: tuple[str, ...], leaf: Any) -> dict:
    return {"path": list(path), "shape": list(np.shape(leaf)), "dtype": _dtype_name(leaf)}


def _leaf_dtype(leaf: Any) -> Any:
    return leaf.dtype if hasattr(leaf, "dtype") else np.asarray(leaf).dtype


_DTYPE_NAMES: dict = {}


def _dtype_name(leaf: Any) -> str:
    dtype = _leaf_dtype(leaf)
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = _DTYPE_NAMES[dtype] = np.dtype(dtype).name
    return name


def _dtype(name: str, path: Path | None = None) -> np.dtype:
    try:
        return _dtype_named(name)
    except TypeError:
        raise CheckpointError(f"checkpoint {path}: unknown dtype {name!r}") from None


@functools.lru_cache(maxsize=None)
def _dtype_named(name: str) -> np.dtype:
    return np.dtype(jax.numpy.dtype(name))


def _owner_and_location(key_path: tuple[str, ...]) -> tuple[str | None, str]:
    """The adapter owning a variable path and the module path it sits on (collection excluded)."""
    for i, key in enumerate(key_path[:-1]):
        if key == ADAPTERS_KEY:
            return key_path[i + 1], "/".join(key_path[1:i])
    return None, ""


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


# --------------------------------------------------------------------------- formatting


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join([lines[0], "-+-".join("-" * w for w in widths)] + lines[1:])
