"""An adapter's record in checkpoint metadata: its spec as JSON (type, hyperparameters, strategy, placement), and back.

Hyperparameters and strategy fields are the dataclass fields of the adapter
and the strategy, encoded as JSON with tags for what JSON lacks (tuples,
dicts, dtypes), so that the adapter can be rebuilt without Python code.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np

from jadapters.checkpoint.arrays import dtype_from_name
from jadapters.checkpoint.errors import CheckpointError
from jadapters.errors import AdapterError, UnknownAdapterError
from jadapters.registry import class_path, import_by_path, registered_name, resolve_class
from jadapters.strategies import Strategy
from jadapters.transform import AdapterSpec


def adapter_record(spec: AdapterSpec, locations: list[str], arrays: list[dict]) -> dict:
    """The record of ``spec``, whose variables sit on the modules ``locations`` and are the ``arrays`` entries."""
    cls = type(spec.adapter)
    where = f"adapter {spec.name!r}"
    num_params = sum(math.prod(e["shape"]) for e in arrays)
    nbytes = sum(math.prod(e["shape"]) * dtype_from_name(e["dtype"]).itemsize for e in arrays)
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


def record_locations(records: list[Mapping[str, Any]]) -> list[str]:
    """The module paths that the adapters of ``records`` sit on, in record order (with repeats)."""
    return [loc for r in records for loc in r["locations"]]


def spec_from_record(record: Mapping[str, Any], path: Path) -> AdapterSpec:
    """The :class:`AdapterSpec` a record describes; a clear error if its classes are missing or reject their fields."""
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
    hyperparameters = decode_value(record["hyperparameters"])
    try:
        adapter = cls(**hyperparameters)
    except Exception as e:  # the adapter's own validation
        raise CheckpointError(f"{where}: cannot rebuild {cls.__name__}(**{hyperparameters}): {e}") from None
    strategy_cls = import_class(record["strategy"]["class_path"], where)
    if not (isinstance(strategy_cls, type) and issubclass(strategy_cls, Strategy)):
        raise CheckpointError(f"{where}: strategy {record['strategy']['class_path']} is not a jadapters Strategy")
    fields = decode_value(record["strategy"]["fields"])
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


def import_class(path: str, where: str) -> type:
    """What the class path ``path`` names; a :class:`CheckpointError` starting with ``where`` if it cannot be imported."""
    try:
        return import_by_path(path)
    except ImportError:
        raise CheckpointError(f"{where}: cannot import {path!r}") from None


def decode_value(value: Any) -> Any:
    """A hyperparameter or strategy field as the adapter takes it, from its JSON encoding."""
    if isinstance(value, list):
        return [decode_value(v) for v in value]
    if isinstance(value, dict):
        if "__tuple__" in value:
            return tuple(decode_value(v) for v in value["__tuple__"])
        if "__dict__" in value:
            return {k: decode_value(v) for k, v in value["__dict__"].items()}
        if "__dtype__" in value:
            return jax.numpy.dtype(value["__dtype__"])
    return value


def jsonable(value: Any) -> Any:
    """A decoded value as plain JSON, for display: tuples as lists, dtypes by name."""
    if isinstance(value, (tuple, list)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, np.dtype):
        return value.name
    return value


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
