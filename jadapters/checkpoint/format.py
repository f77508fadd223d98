"""The checkpoint format: typed metadata records, to and from JSON.

A jadapters checkpoint is an orbax checkpoint whose ``custom_metadata`` is a
:class:`Metadata`: what kind of checkpoint it is, one :class:`AdapterRecord`
per adapter (its :class:`~jadapters.AdapterSpec` encoded generically, see
:func:`encode_value`), the base model's :class:`Fingerprint`, and one
:class:`ArrayEntry` per stored array. :meth:`Metadata.to_json` and
:meth:`Metadata.from_json` convert field by field from the type hints, so a
record is checked when read and a missing or mistyped field is a
:class:`CheckpointError` naming it.

Example:
    >>> entry = ArrayEntry(("params", "w"), (2, 3), "float32", offset=0)
    >>> meta = Metadata(kind="adapters", library_version="0", arrays=(entry,))
    >>> Metadata.from_json(meta.to_json(), "here") == meta
    True
    >>> Metadata.from_json({"format": "jadapters", "format_version": 2, "kind": "adapters"}, "here")
    Traceback (most recent call last):
    ...
    jadapters.checkpoint.CheckpointError: checkpoint here has malformed metadata: field 'library_version' is missing
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from typing import Any, Callable, Mapping, Union

import flax.linen as nn
import numpy as np

from jadapters.errors import AdapterError
from jadapters.registry import registered_name

#: Value of the ``format`` field of every jadapters checkpoint's metadata.
FORMAT = "jadapters"
#: Version of the metadata layout; a reader refuses newer ones.
FORMAT_VERSION = 2
KIND_ADAPTERS, KIND_MODEL, KIND_TRAINING = "adapters", "model", "training_state"
_READER = {KIND_ADAPTERS: "load_adapters", KIND_MODEL: "load_model", KIND_TRAINING: "restore_training_state"}


class CheckpointError(AdapterError):
    """A checkpoint is missing, incomplete, corrupted, or does not fit the model.

    Example:
        >>> isinstance(CheckpointError("x"), ValueError)
        True
    """

    __module__ = "jadapters.checkpoint"  # its public name, in tracebacks and pickles


@dataclasses.dataclass(frozen=True)
class ArrayEntry:
    """One stored array: its key path in the variables, shape and dtype name.

    ``offset`` is its position in the packed buffer of its dtype, or None when
    it is stored as an orbax array of its own (sharded arrays, full models).
    ``prng_impl`` names the PRNG implementation of a key stored as its key data.
    """

    path: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: str
    offset: Union[int, None] = None
    prng_impl: Union[str, None] = None

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@dataclasses.dataclass(frozen=True)
class Buffer:
    """A packed buffer: all arrays of one dtype end to end, with its length and CRC32."""

    dtype: str
    size: int
    crc32: int


@dataclasses.dataclass(frozen=True)
class AdapterRecord:
    """One adapter: how it was added (``spec``, encoded) and what it holds, for loading and display."""

    name: str
    modules: tuple[str, ...]
    targets: tuple[str, ...]
    enabled: bool
    type: str
    locations: tuple[str, ...]
    num_params: int
    nbytes: int
    spec: Any

    @property
    def qualified_name(self) -> str:
        return f"{'+'.join(self.modules)}:{self.name}" if self.modules else self.name


@dataclasses.dataclass(frozen=True)
class Fingerprint:
    """Per module that an adapter sits on: its base params' relative paths, shapes and dtypes."""

    modules: dict[str, dict[str, tuple[tuple[int, ...], str]]]
    digest: Union[str, None] = None


@dataclasses.dataclass(frozen=True)
class Metadata:
    """Everything a checkpoint says about itself; the JSON in its orbax ``custom_metadata``."""

    kind: str
    library_version: str
    placement: Any = None
    adapters: tuple[AdapterRecord, ...] = ()
    fingerprint: Union[Fingerprint, None] = None
    arrays: tuple[ArrayEntry, ...] = ()
    buffers: tuple[Buffer, ...] = ()
    step: Union[int, None] = None
    active_setup: Any = None  # the model's composition setup (Block.to_json()); absent in older checkpoints
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict:
        return _to_json(self)

    @classmethod
    def from_json(cls, data: Any, where: Any, kind: str | None = None) -> "Metadata":
        """Reads and checks ``data``; ``kind`` (if given) must match. Errors name the checkpoint ``where``."""
        if not isinstance(data, Mapping) or data.get("format") != FORMAT:
            raise CheckpointError(f"{where} is not a jadapters checkpoint (its metadata is missing or unreadable)")
        version = data.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise CheckpointError(
                f"{where} was written by a newer jadapters (format {version}, written by "
                f"{data.get('library_version')}); upgrade jadapters to read it"
            )
        if version < FORMAT_VERSION:
            raise CheckpointError(
                f"{where} is in format {version}, written by jadapters {data.get('library_version')}; this version "
                f"reads format {FORMAT_VERSION}: load it with that version and save it again"
            )
        try:
            metadata = _from_json(cls, data, "")
        except _Malformed as e:
            raise CheckpointError(f"checkpoint {where} has malformed metadata: {e}") from None
        if kind is not None and metadata.kind != kind:
            raise CheckpointError(
                f"{where} is a {metadata.kind!r} checkpoint, not {kind!r}; read it with "
                f"{_READER.get(metadata.kind, 'inspect_checkpoint')}"
            )
        return metadata


class _Malformed(Exception):
    pass


def _to_json(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, float)):
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (tuple, list)):
        return [_to_json(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _to_json(v) for k, v in value.items()}
    return value


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _from_json(hint: Any, value: Any, where: str) -> Any:
    """``value`` read as the type ``hint`` (dataclasses, tuples, dicts, unions, scalars, Any)."""
    if hint is Any:
        return value
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _from_json(inner, value, where)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, Mapping):
            raise _Malformed(f"{where or 'the metadata'} is {value!r}, expected an object")
        hints = _hints(hint)
        fields = {}
        for f in dataclasses.fields(hint):
            here = f"{where}.{f.name}" if where else f.name
            if f.name in value:
                fields[f.name] = _from_json(hints[f.name], value[f.name], here)
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise _Malformed(f"field {here!r} is missing")
        return hint(**fields)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _Malformed(f"{where} is {value!r}, expected a list")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_from_json(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise _Malformed(f"{where} is {value!r}, expected {len(args)} items")
        return tuple(_from_json(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise _Malformed(f"{where} is {value!r}, expected an object")
        return {str(k): _from_json(args[1], v, f"{where}[{k!r}]") for k, v in value.items()}
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint in (str, bool) and isinstance(value, hint):
        return value
    raise _Malformed(f"{where} is {value!r}, expected {getattr(hint, '__name__', hint)}")


# ----------------------------------------------------------------------------- values of adapter fields

_TUPLE, _DICT, _ITEMS, _FLOAT, _DTYPE, _TYPE, _OBJECT = (
    "__tuple__", "__dict__", "__items__", "__float__", "__dtype__", "__type__", "__object__"
)
_SKIPPED_MODULE_FIELDS = ("parent", "name")


def encode_value(value: Any, where: str) -> Any:
    """``value`` as JSON; what JSON lacks gets a tag (tuples, dtypes, classes, dataclasses, non-finite floats).

    Dataclasses (Flax modules, strategies, specs, placements) are encoded from
    their init fields and named by registry name or class path. ``where``
    starts the error for a value that has no JSON form.

    Example:
        >>> encode_value((1, float("inf")), "x")
        {'__tuple__': [1, {'__float__': 'inf'}]}
        >>> encode_value(object(), "adapter 'a': field 'f'")
        Traceback (most recent call last):
        ...
        jadapters.checkpoint.CheckpointError: adapter 'a': field 'f' has the value <object object at ...>, which has no JSON form, so it could not be rebuilt from the checkpoint; use plain values (numbers, strings, dtypes, tuples, dataclasses) in its fields
    """
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else {_FLOAT: repr(value)}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple):
        return {_TUPLE: [encode_value(v, where) for v in value]}
    if isinstance(value, list):
        return [encode_value(v, where) for v in value]
    if isinstance(value, Mapping):
        if all(isinstance(k, str) for k in value):
            return {_DICT: {k: encode_value(v, f"{where}[{k!r}]") for k, v in value.items()}}
        return {_ITEMS: [[encode_value(k, where), encode_value(v, where)] for k, v in value.items()]}
    if isinstance(value, np.dtype) or isinstance(getattr(value, "dtype", None), np.dtype) and isinstance(value, type):
        return {_DTYPE: np.dtype(value).name}  # also numpy's scalar types and jnp.bfloat16 and its kin
    if isinstance(value, type) and issubclass(value, np.generic):
        return {_DTYPE: np.dtype(value).name}
    if isinstance(value, type):
        return {_TYPE: registered_name(value)}
    if dataclasses.is_dataclass(value):
        skip = _SKIPPED_MODULE_FIELDS if isinstance(value, nn.Module) else ()
        fields = {
            f.name: encode_value(getattr(value, f.name), f"{where}.{f.name}")
            for f in dataclasses.fields(value)
            if f.init and f.name not in skip
        }
        return {_OBJECT: registered_name(type(value)), "fields": fields}
    raise CheckpointError(
        f"{where} has the value {value!r}, which has no JSON form, so it could not be rebuilt from the "
        f"checkpoint; use plain values (numbers, strings, dtypes, tuples, dataclasses) in its fields"
    )


def decode_value(value: Any, resolve: Callable[[str], type], where: str) -> Any:
    """The value :func:`encode_value` encoded; ``resolve(name)`` gives the class of a named object or type.

    Example:
        >>> decode_value({"__tuple__": [1, {"__dtype__": "bfloat16"}]}, None, "x")
        (1, dtype(bfloat16))
    """
    if isinstance(value, list):
        return [decode_value(v, resolve, where) for v in value]
    if not isinstance(value, Mapping):
        return value
    if _TUPLE in value:
        return tuple(decode_value(v, resolve, where) for v in value[_TUPLE])
    if _DICT in value:
        return {k: decode_value(v, resolve, f"{where}[{k!r}]") for k, v in value[_DICT].items()}
    if _ITEMS in value:
        return {decode_value(k, resolve, where): decode_value(v, resolve, where) for k, v in value[_ITEMS]}
    if _FLOAT in value:
        return float(value[_FLOAT])
    if _DTYPE in value:
        return dtype_named(value[_DTYPE], where)
    if _TYPE in value:
        return resolve(value[_TYPE])
    if _OBJECT in value:
        cls = resolve(value[_OBJECT])
        fields = {k: decode_value(v, resolve, f"{where}.{k}") for k, v in value.get("fields", {}).items()}
        try:
            return cls(**fields)
        except Exception as e:  # the class's own validation
            shown = ", ".join(f"{k}={v!r}" for k, v in fields.items())
            raise CheckpointError(f"{where}: cannot rebuild {cls.__name__}({shown}): {e}") from None
    raise CheckpointError(f"{where}: unrecognised encoded value {dict(value)!r}")


def plain_value(value: Any) -> Any:
    """An encoded value as plain JSON for display, without importing anything: objects as ``{'class': ...}``.

    Example:
        >>> plain_value({"__object__": "LoRA", "fields": {"rank": 4, "alpha": {"__tuple__": [1]}}})
        {'class': 'LoRA', 'rank': 4, 'alpha': [1]}
    """
    if isinstance(value, list):
        return [plain_value(v) for v in value]
    if not isinstance(value, Mapping):
        return value
    if _TUPLE in value:
        return [plain_value(v) for v in value[_TUPLE]]
    if _DICT in value:
        return {k: plain_value(v) for k, v in value[_DICT].items()}
    if _ITEMS in value:
        return [[plain_value(k), plain_value(v)] for k, v in value[_ITEMS]]
    for tag in (_FLOAT, _DTYPE, _TYPE):
        if tag in value:
            return value[tag]
    if _OBJECT in value:
        return {"class": value[_OBJECT], **{k: plain_value(v) for k, v in value.get("fields", {}).items()}}
    return {k: plain_value(v) for k, v in value.items()}


def dtype_name(dtype: Any) -> str:
    """The name a checkpoint records for a dtype (e.g. ``'bfloat16'``).

    Example:
        >>> dtype_name(np.float32)
        'float32'
    """
    return np.dtype(dtype).name


def dtype_named(name: str, where: Any) -> np.dtype:
    """The dtype a checkpoint names; a :class:`CheckpointError` naming ``where`` for an unknown one."""
    import jax.numpy as jnp

    try:
        return np.dtype(jnp.dtype(name))
    except TypeError:
        raise CheckpointError(f"{where}: unknown dtype {name!r}") from None


def entry_dtype(entry: ArrayEntry, where: Any) -> np.dtype:
    """The dtype of a stored array; a :class:`CheckpointError` naming ``where`` for an unknown one."""
    return dtype_named(entry.dtype, f"checkpoint {where}")
