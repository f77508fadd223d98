"""Arrays packed into one flat buffer per dtype, with a CRC32 each, and the orbax handler that stores the buffers.

Orbax's array handler pays a fixed cost per array saved or restored (about a
millisecond) plus several milliseconds of tensorstore machinery per save, far
more than the bytes of a typical adapter checkpoint. So the arrays are packed
into one flat buffer per dtype, saved as ONE ``<dtype>.npy`` file each by
:class:`PackedArraysHandler`, with an index (path, shape, dtype, offset) and a
CRC32 per buffer in the checkpoint's JSON metadata. Orbax still owns the
checkpoint directory: temporary directory, commit by rename, step metadata,
``CheckpointManager`` policies.
"""

from __future__ import annotations

import dataclasses
import math
import os
import zlib
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from jadapters.checkpoint.arrays import array_entry, dtype_from_name
from jadapters.checkpoint.atomic import fsync_directory
from jadapters.checkpoint.errors import CheckpointError, checkpoint_errors

_WRITE_CHUNK = 1 << 17


def pack_arrays(leaves: list[Any], paths: list[tuple[str, ...]]) -> tuple[dict[str, list[np.ndarray]], list[dict], dict]:
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
        entry = array_entry(path, array)
        dtype = entry["dtype"]
        offset = entry["offset"] = sizes.get(dtype, 0)
        index.append(entry)
        sizes[dtype] = offset + array.size
        if array.size:
            flat = np.ascontiguousarray(array).reshape(-1)
            pieces.setdefault(dtype, []).append(flat)
            crcs[dtype] = _crc32(flat, crcs.get(dtype, 0))
    checksums = {dtype: {"size": sizes[dtype], "crc32": crcs[dtype]} for dtype in pieces}
    return pieces, index, checksums


def unpack_arrays(buffers: Mapping[str, np.ndarray], entries: list[Mapping[str, Any]], path: Path) -> list[np.ndarray]:
    """The arrays that index ``entries`` describe, as views of ``buffers``."""
    arrays = []
    for e in entries:
        shape = tuple(e["shape"])
        size = math.prod(shape)
        if size == 0:
            arrays.append(np.zeros(shape, dtype_from_name(e["dtype"], path)))
            continue
        buffer = buffers.get(e["dtype"])
        if buffer is None or e["offset"] + size > buffer.size:
            raise CheckpointError(f"checkpoint {path} is corrupted: {'/'.join(e['path'])} lies outside its buffer")
        arrays.append(buffer[e["offset"] : e["offset"] + size].reshape(shape))
    return arrays


def verify_buffers(buffers: Mapping[str, Any], checksums: Mapping[str, Any], path: Path) -> None:
    """Raises a :class:`CheckpointError` unless every buffer has its recorded size and CRC32."""
    for dtype, expected in checksums.items():
        buffer = buffers.get(dtype)
        if buffer is None or np.size(buffer) != expected["size"]:
            raise CheckpointError(f"checkpoint {path} is corrupted: the {dtype} buffer is missing or has the wrong size")
        if _crc32(buffer) != expected["crc32"]:
            raise CheckpointError(f"checkpoint {path} is corrupted: the {dtype} buffer fails its CRC32 check")


def restore_buffers(
    restore: Callable[..., Mapping[str, np.ndarray]], checksums: Mapping[str, Mapping[str, Any]], path: Path
) -> Mapping[str, np.ndarray]:
    """The buffers that ``checksums`` lists, read by ``restore(args=PackedArraysRestore(...))`` and verified."""
    layout = {key: (key, int(c["size"])) for key, c in checksums.items()}
    with checkpoint_errors(path):
        buffers = restore(args=PackedArraysRestore(layout))
    verify_buffers(buffers, checksums, path)
    return buffers


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


def _bytes_of(array: np.ndarray) -> np.ndarray:
    """The bytes of an array, flat, in C order."""
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8)


def _crc32(array: np.ndarray, running: int = 0) -> int:
    """The CRC32 of the bytes of ``array``, going on from ``running`` (the CRC32 of the bytes before them)."""
    return zlib.crc32(_bytes_of(array), running)


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

    # Its public name, which orbax also records in every checkpoint's metadata.
    __module__ = "jadapters.checkpoint"

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
                    data = memoryview(_bytes_of(piece))
                    # Moderate writes: on Linux one multi-megabyte write() was measured
                    # several times slower than the same bytes in 128 KiB pieces.
                    for start in range(0, len(data), _WRITE_CHUNK):
                        f.write(data[start : start + _WRITE_CHUNK])
                if self.durable:
                    f.flush()
                    os.fsync(f.fileno())
        if self.durable:
            fsync_directory(directory)

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
            dtype = dtype_from_name(dtype, directory)
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

    __module__ = "jadapters.checkpoint"  # its public name

    buffers: Mapping[str, Any]


@ocp.args.register_with_handler(PackedArraysHandler, for_restore=True)
@dataclasses.dataclass
class PackedArraysRestore(ocp.args.CheckpointArgs):
    """Restore args of :class:`PackedArraysHandler`: ``{key: (dtype name, size)}``."""

    __module__ = "jadapters.checkpoint"  # its public name

    layout: Mapping[str, tuple[str, int]]
