"""Adapter-only checkpoints: :func:`save_adapters` and :func:`load_adapters`.

Such a checkpoint holds the adapters' arrays, packed (see
:mod:`jadapters.checkpoint.packing`), and as JSON everything needed to rebuild
them without Python code: per adapter its type and hyperparameters, strategy,
placement and enabled flag; the model's placement config; the library version;
and a fingerprint of the base model.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Mapping, Sequence

import flax.linen as nn
import numpy as np

from jadapters.checkpoint.errors import CheckpointError
from jadapters.checkpoint.fingerprint import base_fingerprint, check_fingerprint
from jadapters.checkpoint.metadata import KIND_ADAPTERS, build_metadata, read_metadata
from jadapters.checkpoint.packing import PackedArraysSave, pack_arrays, restore_buffers, unpack_arrays
from jadapters.checkpoint.placement import add_specs, check_placement, require_adapted, target_model
from jadapters.checkpoint.records import adapter_record, spec_from_record
from jadapters.checkpoint.sharding import Shardings, place_arrays
from jadapters.checkpoint.storage import PathLike, absolute_path, checkpointer, write_checkpoint
from jadapters.checkpoint.trees import Variables, flatten, unflatten, variables_by_adapter
from jadapters.errors import AdapterError, UnknownAdapterError
from jadapters.naming import split_adapter_name
from jadapters.transform import AdaptedModule
from jadapters.tree import adapter_locations, merge_trees


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
    adapted = require_adapted(adapted, "save_adapters")
    flat = flatten(variables)
    groups = variables_by_adapter(flat, _names_to_save(adapted, name))
    empty = [n for n, (indices, _) in groups.items() if not indices]
    if empty:
        raise AdapterError(
            f"save_adapters: adapters {empty} have no variables in the tree given (it holds adapters "
            f"{sorted(adapter_locations(variables))}); initialise them with jadapters.init_adapters "
            f"and pass the variables it returns"
        )
    selected = sorted(i for indices, _ in groups.values() for i in indices)  # in tree order
    buffers, index, checksums = pack_arrays([flat[i][1] for i in selected], [flat[i][0] for i in selected])
    entry_of = dict(zip(selected, index))
    records = []
    for spec in (s for s in adapted.adapters if s.name in groups):
        indices, locations = groups[spec.name]
        records.append(adapter_record(spec, locations, [entry_of[i] for i in indices]))
    metadata = build_metadata(KIND_ADAPTERS, adapted, records, base_fingerprint(variables, records))
    metadata["buffers"] = checksums
    kind = "packed-durable" if durable else "packed"
    return write_checkpoint(path, PackedArraysSave(buffers), metadata, overwrite=overwrite, kind=kind)


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
    path = absolute_path(path)
    metadata = read_metadata(path, KIND_ADAPTERS)
    records = _select_records(metadata, name, path)
    adapted = target_model(adapted, metadata, "load_adapters")
    _check_new_names(adapted, variables, records)
    if strict:
        check_placement(adapted, metadata, records)
        check_fingerprint(variables, metadata, records, path)
    specs = [spec_from_record(r, path) for r in records]
    new_model = add_specs(adapted, specs)
    entries = [e for r in records for e in r["arrays"]]
    buffers = _read_buffers(path, metadata, needed={e["dtype"] for e in entries})
    arrays = unpack_arrays(buffers, entries, path)
    placed = place_arrays(arrays, entries, shardings, variables)
    loaded = unflatten([tuple(e["path"]) for e in entries], placed)
    return new_model, merge_trees(variables, loaded)


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


def _read_buffers(path: Path, metadata: Mapping[str, Any], needed: set[str]) -> Mapping[str, np.ndarray]:
    checksums = {k: v for k, v in metadata.get("buffers", {}).items() if k in needed}
    if not checksums:
        return {}
    return restore_buffers(functools.partial(checkpointer("packed").restore, path), checksums, path)
