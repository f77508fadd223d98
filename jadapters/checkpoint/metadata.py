"""The JSON metadata of a jadapters checkpoint: its layout, and reading and validating it.

It travels as the orbax checkpoint's ``custom_metadata``: the format and its
version, the kind of checkpoint, the library version, the model's placement
config, one record per adapter (see :mod:`jadapters.checkpoint.records`) and
the base model's fingerprint (see :mod:`jadapters.checkpoint.fingerprint`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import orbax.checkpoint as ocp

from jadapters.checkpoint.atomic import previous_copies
from jadapters.checkpoint.errors import CheckpointError, checkpoint_errors
from jadapters.registry import class_path
from jadapters.transform import AdaptedModule

#: Value of the ``format`` field of every jadapters checkpoint's metadata.
FORMAT = "jadapters"
#: Version of the metadata layout; a reader refuses newer ones.
FORMAT_VERSION = 1
KIND_ADAPTERS, KIND_MODEL, KIND_TRAINING = "adapters", "model", "training_state"


def build_metadata(kind: str, adapted: AdaptedModule | None, records: list[dict], fingerprint: dict) -> dict:
    """The metadata of a new checkpoint of ``kind``; ``adapted`` gives the placement config (None: none)."""
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


def read_metadata(path: Path, kind: str | None) -> dict:
    """The validated metadata of the checkpoint at ``path``, which must be of ``kind`` (None: any kind)."""
    if not path.exists():
        hint = ""
        previous = previous_copies(path)
        if previous:
            hint = f"; an interrupted save left the previous checkpoint at {previous[-1]} (rename it to {path.name})"
        raise CheckpointError(f"no checkpoint at {path}{hint}")
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a checkpoint directory")
    if not (path / "_CHECKPOINT_METADATA").exists():
        raise CheckpointError(f"{path} is not a jadapters checkpoint (no orbax checkpoint metadata in it)")
    with checkpoint_errors(path):
        custom = ocp.metadata.get_step_metadata(path).custom_metadata
    return validate_metadata(custom, path, kind)


def validate_metadata(custom: Any, path: Path, kind: str | None) -> dict:
    """``custom`` as a dict if it is the metadata of a jadapters checkpoint of ``kind`` that this version reads."""
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
