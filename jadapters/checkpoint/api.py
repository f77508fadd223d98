"""Saving and loading adapters, whole models and training states; reading what a checkpoint holds.

Everything a load needs is checked before anything is read or built, and
nothing the caller passed is ever changed. Classes named in a checkpoint are
rebuilt only if they are registered adapters (:func:`jadapters.register_adapter`),
jadapters' own classes (strategies, placement), or in the caller's
``allowed_classes``: a checkpoint from a stranger cannot make jadapters import
anything else.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from typing import Any, Callable, Iterable, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util

from jadapters import composition
from jadapters.checkpoint import io
from jadapters.checkpoint.format import (
    KIND_ADAPTERS,
    KIND_MODEL,
    KIND_TRAINING,
    AdapterRecord,
    ArrayEntry,
    CheckpointError,
    Fingerprint,
    Metadata,
    decode_value,
    dtype_name,
    encode_value,
    entry_dtype,
    plain_value,
)
from jadapters.checkpoint.io import PathLike, Shardings
from jadapters.errors import AdapterError, UnknownAdapterError
from jadapters.naming import expand_groups, select_names
from jadapters.registry import class_path, get_registered_class, import_by_path, registered_name
from jadapters.strategies import Strategy
from jadapters.table import format_table
from jadapters.transform import AdaptedModule, AdapterSpec, Placement, with_adapters
from jadapters.tree import ADAPTERS_KEY, adapter_locations, adapter_name_at, merge_trees

Variables = Mapping[str, Any]


# ----------------------------------------------------------------------------- adapters


def save_adapters(
    path: PathLike,
    adapted: AdaptedModule,
    variables: Variables,
    name: str | Sequence[str] | None = None,
    *,
    overwrite: bool = True,
) -> epath.Path:
    """Saves the adapters ``name`` (one, a list, or None: all) of ``adapted``; returns the checkpoint's path.

    Only the adapters' variables (every collection) and their description are
    written, to a local path or ``gs://`` (see :mod:`jadapters.checkpoint.io`).
    An existing jadapters checkpoint at ``path`` is replaced (unless
    ``overwrite=False``); anything else there is never touched. A killed save
    leaves the previous checkpoint loadable. With several processes, every
    process calls it, as with orbax.

    Example:
        >>> import tempfile, jax, jax.numpy as jnp, flax.linen as nn
        >>> from jadapters import LinearAdapter, with_adapters, init_adapters
        >>> x = jnp.ones((1, 4))
        >>> model = with_adapters(nn.Dense(4), {"d": ""}).add_adapter("a", LinearAdapter(2))
        >>> variables = init_adapters(model, nn.Dense(4).init(jax.random.key(0), x), jax.random.key(1), x)
        >>> save_adapters(tempfile.mkdtemp() + "/a", model, variables).name
        'a'
    """
    root = io.checkpoint_path(path)
    adapted = _require_adapted(adapted, "save_adapters")
    names = _names_to_save(adapted, name)
    setup = _setup_within(adapted.active_setup, names)
    flat = traverse_util.flatten_dict(variables)
    owners = set(names) | {f.name for f in (setup.fusions() if setup is not None else ())}
    chosen = [(p, leaf) for p, leaf in flat.items() if adapter_name_at(p) in owners]
    saved = {adapter_name_at(p) for p, _ in chosen}
    empty = [n for n in names if n not in saved]
    if empty:
        raise AdapterError(
            f"save_adapters: adapters {empty} have no variables in the tree given (it holds adapters "
            f"{sorted(adapter_locations(variables))}); initialise them with jadapters.init_adapters "
            f"and pass the variables it returns"
        )
    records = _records(adapted, names, chosen)
    tree, entries, buffers = io.stored_tree(chosen, pack=True)
    metadata = _metadata(KIND_ADAPTERS, adapted, records, variables, arrays=entries, buffers=buffers,
                         active_setup=None if setup is None else setup.to_json())
    return io.write_checkpoint(root, tree, metadata, overwrite=overwrite)


def load_adapters(
    path: PathLike,
    adapted: AdaptedModule | nn.Module,
    variables: Variables,
    name: str | Sequence[str] | None = None,
    *,
    strict: bool = True,
    shardings: Shardings = None,
    allowed_classes: Iterable[type] = (),
) -> tuple[AdaptedModule, dict]:
    """Adds the saved adapters ``name`` (one, a list, or None: all in the file); returns ``(model, variables)``.

    ``adapted`` is the model without those adapters (a plain Flax module is
    wrapped with the saved placement); ``variables`` holds its base params.
    Adapters are rebuilt from the metadata with their saved enabled flags;
    their classes must be registered adapters, jadapters' own, or listed in
    ``allowed_classes``. ``strict`` checks the base model's fingerprint and
    the module placement. ``shardings`` places the arrays (default:
    replicated over the mesh of the base params when they have one, else the
    default device). Every error is raised before anything is read or built.

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
    step_dir, metadata, resolve, adapted = _open(path, KIND_ADAPTERS, adapted, allowed_classes, "load_adapters")
    records = _select_records(metadata.adapters, name, step_dir)
    new_model = _add_specs(adapted, [_rebuild_spec(r, resolve, step_dir) for r in records], step_dir)
    present = set(adapter_locations(variables))
    for r in records:
        if r.name in present:
            raise AdapterError(
                f"the variables already hold params of an adapter named {r.name!r}; drop them with "
                f"jadapters.split_adapters before loading"
            )
    if strict:
        _check_placement(adapted, metadata, records)
        _check_fingerprint(variables, metadata, records, step_dir)
    setup = _setup_within(_saved_setup(metadata, step_dir), new_model.adapter_names())
    if setup is not None:
        new_model = new_model.set_active(setup)
    wanted = {r.name for r in records} | {f.name for f in (setup.fusions() if setup is not None else ())}
    entries = [e for e in metadata.arrays if adapter_name_at(e.path) in wanted]
    default = _replicated_over_base_mesh(variables) if shardings is None else None
    return new_model, merge_trees(variables, _read(step_dir, metadata, entries, shardings, default))


# ----------------------------------------------------------------------------- whole models


def save_model(path: PathLike, adapted: AdaptedModule, variables: Variables, *, overwrite: bool = True) -> epath.Path:
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
    root = io.checkpoint_path(path)
    adapted = _require_adapted(adapted, "save_model")
    flat = list(traverse_util.flatten_dict(variables).items())
    if not flat:
        raise CheckpointError("save_model: the variables tree is empty")
    records = _records(adapted, adapted.adapter_names(), [(p, x) for p, x in flat if adapter_name_at(p) is not None])
    tree, entries, buffers = io.stored_tree(flat, pack=False)
    setup = adapted.active_setup
    metadata = _metadata(KIND_MODEL, adapted, records, variables, arrays=entries, buffers=buffers,
                         active_setup=None if setup is None else setup.to_json())
    return io.write_checkpoint(root, tree, metadata, overwrite=overwrite)


def load_model(
    path: PathLike, model: AdaptedModule | nn.Module, *, shardings: Shardings = None, allowed_classes: Iterable[type] = ()
) -> tuple[AdaptedModule, dict]:
    """Restores a :func:`save_model` checkpoint: ``(model with its adapters rebuilt, variables)``.

    ``model`` is the base Flax module (or an :class:`AdaptedModule` without
    adapters); each array is restored by orbax directly onto its sharding
    (default: the default device), each process reading only its shards.

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
    step_dir, metadata, resolve, adapted = _open(path, KIND_MODEL, model, allowed_classes, "load_model")
    if adapted.adapters:
        raise AdapterError(
            f"load_model restores a whole model, adapters included; pass the model without adapters "
            f"(this one has {adapted.adapter_names()})"
        )
    _check_placement(adapted, metadata, metadata.adapters)
    new_model = _add_specs(adapted, [_rebuild_spec(r, resolve, step_dir) for r in metadata.adapters], step_dir)
    setup = _saved_setup(metadata, step_dir)
    if setup is not None:
        new_model = new_model.set_active(setup)
    return new_model, _read(step_dir, metadata, list(metadata.arrays), shardings)


def _open(path: PathLike, kind: str, model: Any, allowed_classes: Iterable[type], what: str):
    """The step directory and metadata of the checkpoint at ``path``, the class resolver, the target model."""
    step_dir, metadata = io.find_checkpoint(io.checkpoint_path(path), kind)
    resolve = _resolver(allowed_classes)
    return step_dir, metadata, resolve, _target_model(model, metadata, resolve, step_dir, what)


def _read(step_dir: epath.Path, metadata: Metadata, entries: Sequence[ArrayEntry], shardings: Shardings, default=None) -> dict:
    """The arrays of ``entries`` as a variables tree, each on the sharding ``shardings`` gives it (else ``default``)."""
    targets = [io.sharding_for(shardings, e.path, e.shape, entry_dtype(e, step_dir)) or default for e in entries]
    arrays = io.read_arrays(io.checkpointer_restore(step_dir), metadata, entries, targets, step_dir)
    return traverse_util.unflatten_dict({e.path: a for e, a in zip(entries, arrays)})


# ----------------------------------------------------------------------------- training states


def adapter_checkpoint_manager(
    directory: PathLike,
    *,
    max_to_keep: int | None = 3,
    save_interval_steps: int = 1,
    async_save: bool = True,
    **options: Any,
) -> "ocp.CheckpointManager":
    """An orbax ``CheckpointManager`` for :func:`save_training_state` / :func:`restore_training_state`.

    Keeps the ``max_to_keep`` newest steps, saves every ``save_interval_steps``
    steps, writes in the background when ``async_save``, and removes what
    killed saves left when it starts. Other keyword arguments go to
    ``orbax.checkpoint.CheckpointManagerOptions``. Close it (or use it in a
    ``with`` block) so pending writes finish.

    Example:
        >>> import tempfile
        >>> with adapter_checkpoint_manager(tempfile.mkdtemp(), max_to_keep=2) as manager:
        ...     manager.latest_step() is None
        True
    """
    if not isinstance(save_interval_steps, int) or save_interval_steps < 1:
        raise AdapterError(f"adapter_checkpoint_manager: save_interval_steps must be an int >= 1, got {save_interval_steps!r}")
    root = io.checkpoint_path(directory)
    return io.manager(root, max_to_keep=max_to_keep, async_save=async_save, save_interval_steps=save_interval_steps,
                      **options)


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

    ``state`` is a :class:`jadapters.TrainState` (its step, trained adapter
    params, optimizer state and PRNG key are saved; the frozen base never is)
    or any pytree of arrays, with ``step`` given. With ``adapted``, the
    adapters' description is saved too, so ``jadapters inspect`` shows it.
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
        step = state.step
    try:
        step = int(step)
    except (TypeError, ValueError):
        raise AdapterError(f"save_training_state: step must be an integer, got {step!r}") from None
    if step < 0:
        raise AdapterError(f"save_training_state: step must be >= 0, got {step}")
    if not force and not manager.should_save(step):
        return False
    leaves = _key_paths(tree)
    records: tuple = ()
    if adapted is not None:
        adapted = _require_adapted(adapted, "save_training_state")
        trained = traverse_util.flatten_dict(state.trainable) if _is_train_state(state) else {}
        names = [n for n in adapted.adapter_names() if any(adapter_name_at(p) == n for p in trained)]
        records = _records(adapted, names, list(trained.items()))
    stored, entries, buffers = io.stored_tree(leaves, pack=True)
    metadata = _metadata(KIND_TRAINING, adapted, records, None, arrays=entries, buffers=buffers, step=step)
    with io.checkpoint_errors(manager.directory, "write"):
        return bool(manager.save(step, args=io.save_args(stored), custom_metadata=metadata.to_json(),
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
    directory = manager.directory
    if step is None:
        step = manager.latest_step()
        if step is None:
            raise CheckpointError(f"no training checkpoint in {directory}")
    elif step not in manager.all_steps():
        raise CheckpointError(f"no training checkpoint for step {step} in {directory}; steps: {list(manager.all_steps())}")
    where = directory / str(step)
    with io.checkpoint_errors(where, "read"):
        custom = manager.metadata(step).custom_metadata
    metadata = Metadata.from_json(custom, where, KIND_TRAINING)
    tree, rebuild = _training_tree(template)
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    wanted = [p for p, _ in _key_paths(tree)]
    saved = {e.path: e for e in metadata.arrays}
    missing = [p for p in wanted if p not in saved]
    extra = [p for p in saved if p not in set(wanted)]
    if missing or extra:
        raise CheckpointError(
            f"training checkpoint {where} does not match the template: "
            f"missing {['/'.join(p) for p in missing][:8]}, unexpected {['/'.join(p) for p in extra][:8]}"
        )
    entries, targets = [], []
    for path, (_, leaf) in zip(wanted, flat):
        entry = saved[path]
        data = jax.random.key_data(leaf) if _is_prng_key(leaf) else leaf
        shape, dtype = tuple(np.shape(data)), np.dtype(getattr(data, "dtype", None) or np.asarray(data).dtype)
        if entry.shape != shape or entry_dtype(entry, where) != dtype:
            raise CheckpointError(
                f"training checkpoint {where}: {'/'.join(path)} was saved with shape {entry.shape} "
                f"{entry.dtype}, the template has {shape} {dtype.name}"
            )
        entries.append(entry)
        targets.append(leaf.sharding if isinstance(leaf, jax.Array) else None)
    arrays = io.read_arrays(functools.partial(_manager_restore, manager, step), metadata, entries, targets, where)
    return rebuild(jax.tree_util.tree_unflatten(treedef, arrays))


def _manager_restore(manager, step, args):
    return manager.restore(step, args=args)


# ----------------------------------------------------------------------------- inspecting


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint holds; ``str()`` is a table, :meth:`as_dict` is JSON-ready.

    Attributes:
        path: the step directory read.
        kind: ``'adapters'``, ``'model'`` or ``'training_state'``.
        metadata: the checkpoint's :class:`~jadapters.checkpoint.format.Metadata`.
        disk_bytes: bytes of all files of that step.
    """

    __module__ = "jadapters.checkpoint"  # its public name

    path: str
    kind: str
    metadata: Metadata
    disk_bytes: int

    @property
    def adapters(self) -> list[dict]:
        """One row per adapter: name, type, modules, targets, locations, enabled, params, bytes, fields."""
        rows = []
        for r in self.metadata.adapters:
            spec = plain_value(r.spec)
            rows.append({
                "name": r.name,
                "type": r.type,
                "modules": list(r.modules),
                "targets": list(r.targets),
                "locations": list(r.locations),
                "enabled": r.enabled,
                "params": r.num_params,
                "bytes": r.nbytes,
                "hyperparameters": {k: v for k, v in spec.get("adapter", {}).items() if k != "class"},
                "strategy": spec.get("strategy", {}).get("class", "?").rpartition(".")[2],
            })
        return rows

    def as_dict(self) -> dict:
        fingerprint = self.metadata.fingerprint
        return {
            "path": self.path,
            "kind": self.kind,
            "library_version": self.metadata.library_version,
            "format_version": self.metadata.format_version,
            "disk_bytes": self.disk_bytes,
            "step": self.metadata.step,
            "adapters": self.adapters,
            "placement": plain_value(self.metadata.placement),
            "base_fingerprint": {
                "digest": fingerprint.digest if fingerprint else None,
                "params": {m: {p: [list(s), d] for p, (s, d) in ps.items()} for m, ps in fingerprint.modules.items()}
                if fingerprint else {},
            },
        }

    def __str__(self) -> str:
        m, fingerprint = self.metadata, self.metadata.fingerprint
        head = [
            f"checkpoint   {self.path}",
            f"kind         {self.kind}" + (f" (step {m.step})" if m.step is not None else ""),
            f"written by   jadapters {m.library_version} (format {m.format_version})",
            f"on disk      {_human_bytes(self.disk_bytes)}",
            f"base model   fingerprint {fingerprint.digest}: {sum(len(p) for p in fingerprint.modules.values())} "
            f"params in {len(fingerprint.modules)} modules"
            if fingerprint and fingerprint.digest else "base model   no fingerprint recorded",
        ]
        placement = plain_value(m.placement) or {}
        if placement.get("modules"):
            declared = ", ".join(f"{name} -> {list(t)}" for name, t in placement["modules"])
            head.append(f"placement    {declared}; global: {placement.get('global_modules', [])}")
        rows = []
        for r in self.adapters:
            where = r["locations"]
            shown = ", ".join(where[:3]) + (f", ... ({len(where)} modules)" if len(where) > 3 else "")
            rows.append([
                r["name"],
                r["type"],
                ("+".join(r["modules"]) + ":" if r["modules"] else "global: ") + ", ".join(r["targets"]),
                shown or "-",
                "yes" if r["enabled"] else "no",
                r["params"],
                _human_bytes(r["bytes"]),
            ])
        table = format_table(["name", "type", "placement", "where", "enabled", "params", "bytes"], rows)
        return "\n".join(head) + "\n\n" + table


def inspect_checkpoint(path: PathLike) -> CheckpointInfo:
    """Reads what a jadapters checkpoint holds, without reading its arrays.

    ``path`` is a checkpoint of :func:`save_adapters` or :func:`save_model`,
    a training-state directory of :func:`adapter_checkpoint_manager` (its
    latest step is shown), or one of its steps.

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
    step_dir, metadata = io.find_checkpoint(io.checkpoint_path(path))
    return CheckpointInfo(str(step_dir), metadata.kind, metadata, io.disk_bytes(step_dir))


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


# ----------------------------------------------------------------------------- records and metadata


def _metadata(kind: str, adapted: AdaptedModule | None, records, variables, **fields: Any) -> Metadata:
    from jadapters import __version__

    placement = encode_value(adapted.placement, "the model's placement") if adapted is not None else None
    fingerprint = _fingerprint(variables, records) if variables is not None else None
    return Metadata(kind=kind, library_version=__version__, placement=placement, adapters=tuple(records),
                    fingerprint=fingerprint, **fields)


def _records(adapted: AdaptedModule, names: Sequence[str], leaves: Sequence[tuple[tuple[str, ...], Any]]) -> list:
    """One :class:`AdapterRecord` per adapter of ``names``, whose variables are among ``leaves``."""
    sizes: dict[str, list[int]] = {n: [0, 0] for n in names}
    for path, leaf in leaves:
        owner = adapter_name_at(path)
        if owner in sizes:
            size = int(np.prod(np.shape(leaf), dtype=np.int64))
            sizes[owner][0] += size
            sizes[owner][1] += size * np.dtype(leaf.dtype).itemsize
    locations = adapter_locations(traverse_util.unflatten_dict(dict(leaves))) if leaves else {}
    records = []
    for spec in adapted.adapters:
        if spec.name not in sizes:
            continue
        records.append(AdapterRecord(
            name=spec.name,
            modules=tuple(spec.modules),
            targets=tuple(spec.targets),
            enabled=bool(spec.enabled),
            type=registered_name(type(spec.adapter)),
            locations=tuple(locations.get(spec.name, ())),
            num_params=sizes[spec.name][0],
            nbytes=sizes[spec.name][1],
            spec=encode_value(spec, f"adapter {spec.name!r}: spec"),
        ))
    return records


def _fingerprint(variables: Variables, records: Sequence[AdapterRecord]) -> Fingerprint:
    """Paths, shapes and dtypes of the base params of every module that ``records`` sit on."""
    modules: dict[str, dict] = {loc: {} for r in records for loc in r.locations}
    params = variables.get("params", {}) if isinstance(variables, Mapping) else {}
    for path, leaf in traverse_util.flatten_dict(params).items():
        if ADAPTERS_KEY in path:
            continue
        for depth in range(len(path)):
            loc = "/".join(path[:depth])
            if loc in modules:
                modules[loc]["/".join(path[depth:])] = (tuple(np.shape(leaf)), dtype_name(leaf.dtype))
    encoded = json.dumps({m: {p: [list(s), d] for p, (s, d) in ps.items()} for m, ps in modules.items()}, sort_keys=True)
    return Fingerprint(modules, hashlib.sha256(encoded.encode()).hexdigest()[:16])


def _check_fingerprint(variables: Variables, metadata: Metadata, records: Sequence[AdapterRecord], where) -> None:
    saved = metadata.fingerprint.modules if metadata.fingerprint else {}
    actual = _fingerprint(variables, records).modules
    problems = []
    for loc in dict.fromkeys(loc for r in records for loc in r.locations):
        expected, have = saved.get(loc, {}), actual.get(loc, {})
        for rel, (shape, dtype) in expected.items():
            full = f"{loc}/{rel}" if loc else rel
            if rel not in have:
                problems.append(f"{full}: missing in this model (checkpoint base: {shape} {dtype})")
            elif have[rel] != (shape, dtype):
                problems.append(f"{full}: checkpoint base has shape {shape} {dtype}, this model has {have[rel][0]} {have[rel][1]}")
        for rel, (shape, dtype) in have.items():
            if rel not in expected:
                problems.append(f"{loc}/{rel}: in this model ({shape} {dtype}) but not in the checkpoint's base")
    if problems:
        shown = "\n  ".join(problems[:10]) + (f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else "")
        raise CheckpointError(
            f"checkpoint {where} was saved on a different base model (fingerprint "
            f"{metadata.fingerprint.digest}):\n  {shown}\n(pass strict=False to load anyway)"
        )


# ----------------------------------------------------------------------------- names, models, classes


def _require_adapted(adapted: Any, what: str) -> AdaptedModule:
    if not isinstance(adapted, AdaptedModule):
        raise AdapterError(f"{what} expects the AdaptedModule returned by with_adapters, got {type(adapted).__name__}")
    return adapted


def _names_to_save(adapted: AdaptedModule, name: str | Sequence[str] | None) -> list[str]:
    if not adapted.adapters:
        raise AdapterError("save_adapters: the model has no adapters to save; add one with add_adapter")
    return sorted(adapted._resolve_names(name), key=adapted.adapter_names().index)


def _select_records(records: Sequence[AdapterRecord], name: str | Sequence[str] | None, where) -> list[AdapterRecord]:
    if name is None and not records:
        raise CheckpointError(f"checkpoint {where} holds no adapters")
    groups: dict[str, list[str]] = {}
    for r in records:  # the parts of a union of methods, addressed by the union's name
        group = (plain_value(r.spec) or {}).get("group")
        if group:
            groups.setdefault(group, []).append(r.name)
    name = expand_groups(name, groups, [r.name for r in records])
    chosen = select_names(name, [(r.modules, r.name) for r in records], f"checkpoint {where}")
    return [r for r in records if r.name in chosen]


def _target_model(model: Any, metadata: Metadata, resolve, where, what: str) -> AdaptedModule:
    """``model`` as an :class:`AdaptedModule`: a plain Flax module gets the checkpoint's placement."""
    if isinstance(model, AdaptedModule):
        return model
    if not isinstance(model, nn.Module):
        raise AdapterError(f"{what} expects a Flax module or an AdaptedModule, got {type(model).__name__}")
    placement = _decode(metadata.placement, resolve, f"checkpoint {where}: the model's placement")
    if placement is None:
        return with_adapters(model)
    if not isinstance(placement, Placement):
        raise CheckpointError(f"checkpoint {where}: its placement is {type(placement).__name__}, not a Placement")
    return with_adapters(model).clone(placement=placement)


def _check_placement(adapted: AdaptedModule, metadata: Metadata, records: Sequence[AdapterRecord]) -> None:
    saved = {m: tuple(t) for m, t in (plain_value(metadata.placement) or {}).get("modules", [])}
    declared = dict(adapted.placement.modules)
    for r in records:
        for module_name in r.modules:
            if module_name not in declared:
                raise CheckpointError(
                    f"adapter {r.name!r} was saved on module {module_name!r} ({list(saved.get(module_name, ()))}), "
                    f"which this model does not declare (it declares {list(declared)}); declare it in with_adapters, "
                    f"or pass strict=False to place the adapter at its saved targets {list(r.targets)}"
                )
            if module_name in saved and saved[module_name] != tuple(declared[module_name]):
                raise CheckpointError(
                    f"adapter {r.name!r}: module {module_name!r} targeted {list(saved[module_name])} when saved, "
                    f"but {list(declared[module_name])} in this model (pass strict=False to load anyway)"
                )


def _setup_within(setup: Any, names: Sequence[str]) -> Any:
    """``setup`` if every adapter it names is among ``names``, else None."""
    return setup if setup is not None and setup.names() <= set(names) else None


def _saved_setup(metadata: Metadata, where) -> Any:
    try:
        return composition.setup_from_json(metadata.active_setup)
    except AdapterError as e:
        raise CheckpointError(f"checkpoint {where}: its active setup cannot be read: {e}") from None


def _rebuild_spec(record: AdapterRecord, resolve, where) -> AdapterSpec:
    spec = _decode(record.spec, resolve, f"checkpoint {where}: adapter {record.name!r}")
    if not isinstance(spec, AdapterSpec) or spec.name != record.name:
        raise CheckpointError(f"checkpoint {where}: adapter {record.name!r} is described by {spec!r}, not its AdapterSpec")
    return spec


def _decode(value: Any, resolve, where: str) -> Any:
    try:
        return decode_value(value, resolve, where)
    except UnknownAdapterError as e:
        raise UnknownAdapterError(f"{where}: {e}") from None


def _add_specs(adapted: AdaptedModule, specs: Sequence[AdapterSpec], where) -> AdaptedModule:
    """``adapted`` with ``specs`` added, each checked by the model's own ``add_spec``."""
    out = adapted
    for spec in specs:
        try:
            out = out.add_spec(spec)
        except AdapterError as e:
            raise type(e)(f"cannot add the adapter of checkpoint {where}: {e}") from None
    return out


def _resolver(allowed_classes: Iterable[type]) -> Callable[[str], type]:
    """``name -> class`` for what a checkpoint may name: registered adapters, jadapters' classes, ``allowed_classes``."""
    allowed: dict[str, type] = {}
    for cls in allowed_classes:
        if not isinstance(cls, type):
            raise AdapterError(f"allowed_classes must hold classes, got {cls!r}")
        allowed[class_path(cls)] = allowed[registered_name(cls)] = cls

    def resolve(name: str) -> type:
        if name in allowed:
            return allowed[name]
        registered = get_registered_class(name)
        if registered is not None:
            return registered
        own = _jadapters_dataclass(name)
        if own is not None:
            return own
        raise UnknownAdapterError(
            f"it names the class {name!r}, which is neither a registered adapter or strategy nor one of "
            f"jadapters' own classes; if you trust this checkpoint, register the class with "
            f"jadapters.register_adapter (or register_strategy) or pass allowed_classes=[...]"
        )

    return resolve


def _jadapters_dataclass(name: str) -> type | None:
    """A plain dataclass of the jadapters package (AdapterSpec, Placement, ...), by class path; nothing else is imported."""
    if not name.startswith("jadapters."):
        return None
    try:
        obj = import_by_path(name)
    except ImportError:
        return None
    ok = isinstance(obj, type) and obj.__module__.startswith("jadapters.") and dataclasses.is_dataclass(obj)
    return obj if ok and not issubclass(obj, (nn.Module, Strategy)) else None


def _replicated_over_base_mesh(variables: Variables):
    """Replicated over the base params' mesh when they are sharded over several devices, else None."""
    for leaf in jax.tree_util.tree_leaves(variables.get("params", {})):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, jax.sharding.NamedSharding) and len(sharding.device_set) > 1:
            return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
        return None
    return None


# ----------------------------------------------------------------------------- training trees


def _key_paths(tree: Any) -> list[tuple[tuple[str, ...], Any]]:
    """``[(key path as strings, leaf), ...]`` of a pytree, in its flattening order."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(tuple(jax.tree_util.keystr((k,), simple=True) for k in p), leaf) for p, leaf in flat]


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
