"""Checkpoint storage: paths, writing through orbax's commit protocol, reading arrays back onto devices.

Paths are ``etils.epath`` paths, as in orbax: a local path, or ``gs://`` and
``s3://`` where orbax and tensorstore (and gcsfs or s3fs) support them.

A checkpoint is an orbax ``CheckpointManager`` directory: each save is a new
step that orbax commits as a whole (a renamed temporary directory on local
disks, a commit file on object stores), and only then is the previous step
deleted; a killed save leaves the previous step loadable, and the next save
(or manager start) removes what it left. Readers take the newest committed step.

Small arrays are packed: all arrays of one dtype end to end in one buffer,
stored as one orbax array with a CRC32 in the metadata, because orbax pays a
fixed cost per array (see ``benchmarks/checkpoint.py``). Arrays sharded over
devices of several processes are stored as orbax arrays of their own: each
process writes and reads only its shards, and no process gathers them.

Example:
    >>> checkpoint_path("gs://bucket/run/adapters")
    PosixGPath('gs://bucket/run/adapters')
    >>> checkpoint_path("ftp://host/adapters")
    Traceback (most recent call last):
    ...
    jadapters.checkpoint.CheckpointError: ftp://host/adapters: the scheme 'ftp://' is not supported; use a local path, gs://... or s3://...
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import zlib
from typing import Any, Callable, Iterator, Mapping, Sequence, Union

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util

from jadapters.checkpoint.format import FORMAT, ArrayEntry, Buffer, CheckpointError, Metadata, dtype_name, dtype_named, entry_dtype
from jadapters.errors import AdapterError

PathLike = Union[str, "os.PathLike[str]"]
KeyPath = tuple[str, ...]

#: Where restored arrays go: one sharding for all, a function of
#: ``(path, shape, dtype)`` (path '/'-joined, e.g. ``'params/enc/__adapters__/a/up/kernel'``),
#: or a nested mapping shaped like the variables, with a sharding at each leaf.
Shardings = Union["jax.sharding.Sharding", Callable[[str, tuple, Any], "jax.sharding.Sharding"], Mapping[str, Any], None]

#: Object stores that orbax (tensorstore) and etils.epath both support, and the package each needs.
SCHEMES = {"gs": ("gcsfs", "gcs"), "s3": ("s3fs", "s3")}
_ITEM = "arrays"  # the orbax item holding a checkpoint's arrays
_PACKED, _OWN = "packed", "own"
_STEP_METADATA = "_CHECKPOINT_METADATA"


def checkpoint_path(path: PathLike) -> epath.Path:
    """``path`` as an absolute ``epath.Path``; a clear error for a scheme that nothing here supports."""
    try:
        text = os.fspath(path)
    except TypeError:
        raise CheckpointError(f"a checkpoint path must be a string or a path, got {path!r}") from None
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    scheme, sep, rest = text.partition("://")
    if not sep:
        return epath.Path(os.path.abspath(os.path.expanduser(text)))
    if scheme == "file":
        return epath.Path(os.path.abspath(rest))
    if scheme not in SCHEMES:
        supported = " or ".join(f"{s}://..." for s in SCHEMES)
        raise CheckpointError(f"{text}: the scheme '{scheme}://' is not supported; use a local path, {supported}")
    module, extra = SCHEMES[scheme]
    if importlib.util.find_spec(module) is None:
        raise CheckpointError(f"{text}: {scheme}:// paths need {module}; install it with: pip install 'jadapters[{extra}]'")
    return epath.Path(text)


# ----------------------------------------------------------------------------- what is stored


def stored_tree(leaves: Sequence[tuple[KeyPath, Any]], *, pack: bool) -> tuple[dict, tuple[ArrayEntry, ...], tuple[Buffer, ...]]:
    """The orbax tree that stores ``leaves``, with an entry per leaf and the packed buffers' checksums.

    With ``pack``, every array that this process holds whole (all but arrays
    sharded over several processes' devices) goes into the buffer of its
    dtype; the others are stored as they are.
    """
    pieces: dict[str, list[np.ndarray]] = {}
    sizes: dict[str, int] = {}
    own: dict[KeyPath, Any] = {}
    entries = []
    for path, leaf in leaves:
        prng_impl = None
        if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            prng_impl = str(jax.random.key_impl(leaf))
            leaf = jax.random.key_data(leaf)
        host = _whole_on_this_process(leaf) if pack else None
        dtype = dtype_name(leaf.dtype if hasattr(leaf, "dtype") else np.asarray(leaf).dtype)
        if host is None:
            own[path] = leaf if isinstance(leaf, jax.Array) else np.asarray(leaf)
            entries.append(ArrayEntry(path, tuple(np.shape(leaf)), dtype, None, prng_impl))
            continue
        offset = sizes.get(dtype, 0)
        sizes[dtype] = offset + host.size
        pieces.setdefault(dtype, []).append(host.reshape(-1))
        entries.append(ArrayEntry(path, tuple(host.shape), dtype, offset, prng_impl))
    tree: dict = {}
    buffers = []
    for dtype, parts in pieces.items():
        if sizes[dtype]:
            buffer = np.concatenate(parts)
            tree.setdefault(_PACKED, {})[dtype] = buffer
            buffers.append(Buffer(dtype, int(buffer.size), _crc32(buffer)))
    if own:
        tree[_OWN] = traverse_util.unflatten_dict(own)
    return tree, tuple(entries), tuple(buffers)


def _whole_on_this_process(leaf: Any) -> np.ndarray | None:
    """``leaf`` as a host array if this process holds all of it (never gathering), else None."""
    if not isinstance(leaf, jax.Array):
        return np.asarray(leaf)
    if leaf.is_fully_addressable:
        return np.asarray(leaf)
    if leaf.sharding.is_fully_replicated:
        return np.asarray(leaf.addressable_data(0))
    return None


def _crc32(array: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(array).reshape(-1).view(np.uint8))


def save_args(tree: dict) -> "ocp.args.CheckpointArgs":
    """The orbax save args of a :func:`stored_tree` for a manager made by :func:`manager`."""
    return ocp.args.Composite(**{_ITEM: ocp.args.PyTreeSave(tree)})


# ----------------------------------------------------------------------------- managers, writing


def manager(
    root: epath.Path, *, max_to_keep: int | None = 1, async_save: bool = False, create: bool = True, **options: Any
) -> "ocp.CheckpointManager":
    """An orbax ``CheckpointManager`` over ``root`` that stores :func:`stored_tree` s and cleans up killed saves."""
    manager_options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,
        create=create,
        **options,
    )
    return ocp.CheckpointManager(
        root, options=manager_options, item_handlers={_ITEM: _handler()}
    )


class _NoOcdbtMergeNotice(logging.Filter):
    """Drops orbax's notice, logged at every save without OCDBT, that there are no OCDBT files to merge."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Skipping merge of OCDBT checkpoints" not in record.getMessage()


logging.getLogger("absl").addFilter(_NoOcdbtMergeNotice())


def _handler() -> "ocp.PyTreeCheckpointHandler":
    # Measured against orbax's other layouts in benchmarks/checkpoint.py: for a few packed buffers, one
    # zarr array each (no OCDBT) and no compression (trained weights hardly compress) is the fastest.
    return ocp.PyTreeCheckpointHandler(use_ocdbt=False, use_compression=False)


def write_checkpoint(root: epath.Path, tree: dict, metadata: Metadata, *, overwrite: bool) -> epath.Path:
    """Saves ``tree`` with ``metadata`` as the next step of ``root``; the previous step goes once it is committed.

    Anything at ``root`` that is not a jadapters checkpoint (or an empty
    directory, or what a killed save left) is never touched.
    """
    _check_replaceable(root, overwrite)
    with checkpoint_errors(root, "write"), manager(root, lightweight_initialize=True) as m:
        step = (m.latest_step() or 0) + 1
        m.save(step, args=save_args(tree), custom_metadata=metadata.to_json(), force=True)
        m.wait_until_finished()
    return root


def _check_replaceable(root: epath.Path, overwrite: bool) -> None:
    if not root.exists():
        return
    if not root.is_dir():
        raise CheckpointError(f"{root} exists and is not a directory; refusing to replace it")
    try:
        _, custom = _step_metadata(root)
    except CheckpointError:
        custom = None
    if not isinstance(custom, Mapping) or custom.get("format") != FORMAT:
        if _only_leftovers(root):
            return
        raise CheckpointError(f"{root} exists and is not a jadapters checkpoint; refusing to replace it")
    if not overwrite:
        raise CheckpointError(f"{root} already exists (pass overwrite=True to replace it)")


def _only_leftovers(root: epath.Path) -> bool:
    """True if ``root`` holds nothing but what orbax writes and a killed save leaves (no committed step)."""
    for child in root.iterdir():
        name = child.name
        if ".orbax-checkpoint-tmp" in name or name.startswith("_"):
            continue
        if name.isdigit() and not _committed(child):
            continue
        return False
    return True


def _committed(step_dir: epath.Path) -> bool:
    return any(m.path.name == step_dir.name for m in ocp.step.standard_name_format().find_all(step_dir.parent))


# ----------------------------------------------------------------------------- reading


def find_checkpoint(path: epath.Path, kind: str | None = None) -> tuple[epath.Path, Metadata]:
    """The step directory to read at ``path`` (a checkpoint, or one of its steps) and its metadata, of ``kind``."""
    step_dir, custom = _step_metadata(path)
    return step_dir, Metadata.from_json(custom, step_dir, kind)


def _step_metadata(path: epath.Path) -> tuple[epath.Path, Any]:
    """The step directory to read at ``path`` and its orbax custom metadata, unchecked."""
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a checkpoint directory")
    step_dir = path
    if not (path / _STEP_METADATA).exists():
        with checkpoint_errors(path, "read"):
            latest = ocp.step.latest_step_metadata(path, ocp.step.standard_name_format())
        if latest is None:
            raise CheckpointError(f"{path} is not a jadapters checkpoint (it holds no committed orbax checkpoint)")
        step_dir = latest.path
    with checkpoint_errors(step_dir, "read"):
        custom = ocp.metadata.get_step_metadata(step_dir).custom_metadata
    return step_dir, custom


def read_arrays(
    restore: Callable[["ocp.args.CheckpointArgs"], Any],
    metadata: Metadata,
    entries: Sequence[ArrayEntry],
    targets: Sequence["jax.sharding.Sharding | None"],
    where: Any,
) -> list:
    """The arrays of ``entries``, each placed on its target sharding (None: the default device).

    ``restore(args)`` is an orbax restore of the step (a manager's or a
    checkpointer's). Packed buffers are read whole and checked against their
    CRC32; arrays stored on their own are read by orbax straight onto their
    target sharding, each process reading only its shards.
    """
    buffers = {b.dtype: b for b in metadata.buffers}
    item: dict = {}
    args: dict = {}
    for entry, target in zip(entries, targets):
        dtype = entry_dtype(entry, where)
        if entry.offset is None:
            sharding = target or default_sharding()
            key = (_OWN,) + entry.path
            item[key] = jax.ShapeDtypeStruct(entry.shape, dtype, sharding=sharding)
            args[key] = ocp.ArrayRestoreArgs(sharding=sharding, global_shape=entry.shape, dtype=dtype)
        elif entry.size:
            buffer = buffers.get(entry.dtype)
            if buffer is None or entry.offset + entry.size > buffer.size:
                raise CheckpointError(f"checkpoint {where} is corrupted: {'/'.join(entry.path)} lies outside its buffer")
            item[(_PACKED, entry.dtype)] = np.zeros((0,), dtype)
            args[(_PACKED, entry.dtype)] = ocp.RestoreArgs(restore_type=np.ndarray)
    restored: dict = {}
    if item:
        with checkpoint_errors(where, "read"):
            out = restore(ocp.args.Composite(**{_ITEM: ocp.args.PyTreeRestore(
                item=traverse_util.unflatten_dict(item),
                restore_args=traverse_util.unflatten_dict(args),
                partial_restore=True,
            )}))
        restored = traverse_util.flatten_dict(out[_ITEM])
    host = {}
    for dtype in {e.dtype for e in entries if e.offset is not None and e.size}:
        data = np.asarray(restored.get((_PACKED, dtype)))
        expected = buffers[dtype]
        if data.ndim != 1 or data.size != expected.size:
            raise CheckpointError(f"checkpoint {where} is truncated or corrupted: the {dtype} buffer has the wrong size")
        if _crc32(data) != expected.crc32:
            raise CheckpointError(f"checkpoint {where} is corrupted: the {dtype} buffer fails its CRC32 check")
        host[dtype] = data if data.dtype.name == dtype else data.view(dtype_named(dtype, where))
    arrays: list = []
    for entry in entries:
        if entry.offset is None:
            arrays.append(restored[(_OWN,) + entry.path])
        elif entry.size == 0:
            arrays.append(np.zeros(entry.shape, entry_dtype(entry, where)))
        else:
            arrays.append(host[entry.dtype][entry.offset : entry.offset + entry.size].reshape(entry.shape))
    placed = place_arrays([a if e.offset is not None else None for a, e in zip(arrays, entries)], arrays, targets)
    return [_as_key(a, e) for a, e in zip(placed, entries)]


def _as_key(array: Any, entry: ArrayEntry) -> Any:
    if entry.prng_impl is None:
        return array
    return jax.random.wrap_key_data(array, impl=entry.prng_impl)


def place_arrays(host: Sequence[Any], arrays: Sequence[Any], targets: Sequence["jax.sharding.Sharding | None"]) -> list:
    """``arrays`` on their targets: host arrays (``host[i]`` not None) in one batched transfer where possible."""
    out = list(arrays)
    batch, batch_arrays, batch_shardings = [], [], []
    for i, (array, target) in enumerate(zip(arrays, targets)):
        if host[i] is None:
            continue  # orbax restored it onto its sharding already
        sharding = target or default_sharding()
        if sharding.is_fully_addressable:
            batch.append(i)
            batch_arrays.append(array)
            batch_shardings.append(sharding)
        else:
            out[i] = jax.make_array_from_callback(array.shape, sharding, lambda index, a=array: a[index])
    if batch:
        for i, placed in zip(batch, jax.device_put(batch_arrays, batch_shardings)):
            out[i] = placed
    return out


def sharding_for(shardings: Shardings, path: KeyPath, shape: tuple, dtype: Any) -> "jax.sharding.Sharding | None":
    """The sharding that ``shardings`` gives the array at ``path`` (None when ``shardings`` is None)."""
    if shardings is None or isinstance(shardings, jax.sharding.Sharding):
        return shardings
    if callable(shardings):
        return shardings("/".join(path), shape, dtype)
    if not isinstance(shardings, Mapping):
        raise AdapterError(f"shardings must be a Sharding, a function or a mapping, got {shardings!r}")
    node = traverse_util.flatten_dict(shardings).get(tuple(path))
    if node is None:
        raise AdapterError(f"shardings has no entry for {'/'.join(path)}")
    if not isinstance(node, jax.sharding.Sharding):
        raise AdapterError(f"shardings at {'/'.join(path)} is {node!r}, not a jax.sharding.Sharding")
    return node


def default_sharding() -> "jax.sharding.Sharding":
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def checkpointer_restore(step_dir: epath.Path) -> Callable[["ocp.args.CheckpointArgs"], Any]:
    """A restore function reading the step directory ``step_dir`` (no manager needed)."""
    checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler(**{_ITEM: _handler()}))
    return lambda args: checkpointer.restore(step_dir, args=args)


def disk_bytes(path: epath.Path) -> int:
    """Bytes of all files under ``path``."""
    return sum(disk_bytes(p) if p.is_dir() else p.stat().length for p in path.iterdir())


@contextlib.contextmanager
def checkpoint_errors(path: Any, doing: str) -> Iterator[None]:
    """Turns what orbax, tensorstore or the file system raise into a :class:`CheckpointError` naming ``path``."""
    try:
        yield
    except AdapterError:
        raise
    except Exception as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if doing == "read":
            raise CheckpointError(f"cannot read checkpoint {path}: it is incomplete or corrupted ({message[:300]})") from error
        raise CheckpointError(f"cannot write checkpoint {path}: {message[:300]}") from error
