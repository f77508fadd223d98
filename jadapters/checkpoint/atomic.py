"""Replacing a checkpoint directory atomically, and cleaning up after saves that were killed.

The new checkpoint is written into a fresh sibling directory; that is then
swapped with the old checkpoint in one ``renameat2(RENAME_EXCHANGE)`` (Linux;
elsewhere two renames), and the old one is deleted only after the new one is
in place: a process killed at any point leaves the previous checkpoint
loadable. Concurrent saves to the same path are not supported.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Callable

_STAGING = "jadapters-staging"
_PREVIOUS = "jadapters-previous"


def replace_directory(path: Path, write: Callable[[Path], None], *, sync: bool) -> None:
    """Calls ``write(staging)`` on a fresh sibling of ``path``, then puts it in place of ``path``.

    ``sync`` fsyncs the parent directory after the swap, so that the rename
    itself survives a power loss. On any error the staging directory is removed.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(path)
    staging = path.parent / f".{path.name}.{_STAGING}-{uuid.uuid4().hex[:12]}"
    try:
        write(staging)
        _move_into_place(staging, path)
        if sync:
            fsync_directory(path.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def previous_copies(path: Path) -> list[Path]:
    """The previous checkpoints that saves interrupted between two renames left beside ``path``, oldest name first."""
    return sorted(path.parent.glob(f".{path.name}.{_PREVIOUS}-*")) if path.parent.exists() else []


def fsync_directory(directory: str | os.PathLike[str]) -> None:
    """Makes the entries of ``directory`` durable, where the platform can open a directory."""
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
