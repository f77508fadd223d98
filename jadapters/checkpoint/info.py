"""What a checkpoint holds, read from its metadata alone: :func:`inspect_checkpoint` and :class:`CheckpointInfo`."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from jadapters.checkpoint.metadata import read_metadata
from jadapters.checkpoint.records import decode_value, jsonable
from jadapters.checkpoint.storage import PathLike, absolute_path


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint holds; ``str()`` is a table, :meth:`as_dict` is JSON-ready.

    Attributes:
        path: the checkpoint directory.
        kind: ``'adapters'``, ``'model'`` or ``'training_state'``.
        metadata: the checkpoint's JSON metadata, as saved.
        disk_bytes: bytes of all files in the directory.
    """

    __module__ = "jadapters.checkpoint"  # its public name

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
                "hyperparameters": decode_value(r["hyperparameters"]),
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
            "adapters": [dict(r, hyperparameters=jsonable(r["hyperparameters"])) for r in self.adapters],
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
        >>> from jadapters import LinearAdapter, with_adapters, init_adapters, save_adapters
        >>> x = jnp.ones((1, 4))
        >>> model = with_adapters(nn.Dense(4), {"d": ""}).add_adapter("a", LinearAdapter(2))
        >>> variables = init_adapters(model, nn.Dense(4).init(jax.random.key(0), x), jax.random.key(1), x)
        >>> info = inspect_checkpoint(save_adapters(tempfile.mkdtemp() + "/a", model, variables))
        >>> info.kind, info.adapters[0]["params"]
        ('adapters', 24)
    """
    path = absolute_path(path)
    if path.is_dir() and not (path / "_CHECKPOINT_METADATA").exists():
        steps = sorted(int(p.name) for p in path.iterdir() if p.name.isdigit() and (p / "_CHECKPOINT_METADATA").exists())
        if steps:
            path = path / str(steps[-1])
    metadata = read_metadata(path, None)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return CheckpointInfo(str(path), metadata["kind"], metadata, size)


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
