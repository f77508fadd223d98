"""The base model's fingerprint: paths, shapes and dtypes of the params of every module an adapter sits on.

An adapter checkpoint records it when saved and checks it when loaded, so
that adapters are not silently loaded onto a different base model.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from jadapters.checkpoint.arrays import dtype_name
from jadapters.checkpoint.errors import CheckpointError
from jadapters.checkpoint.records import record_locations
from jadapters.checkpoint.trees import Variables, flatten
from jadapters.tree import ADAPTERS_KEY


def base_fingerprint(base: Variables, records: list[Mapping[str, Any]]) -> dict:
    """``{"modules": {location: {param path: [shape, dtype]}}, "digest": ...}`` for the locations of ``records``."""
    params = base.get("params", {}) if isinstance(base, Mapping) else {}
    modules = {loc: _module_params(params, loc) for loc in dict.fromkeys(record_locations(records))}
    encoded = json.dumps(modules, sort_keys=True).encode()
    return {"modules": modules, "digest": hashlib.sha256(encoded).hexdigest()[:16]}


def check_fingerprint(variables: Variables, metadata: Mapping[str, Any], records: list[Mapping[str, Any]], path: Path) -> None:
    """Raises a :class:`CheckpointError` listing how the base under ``records`` differs from the saved one."""
    saved = metadata["base_fingerprint"]["modules"]
    params = variables.get("params", {})
    problems = []
    for loc in dict.fromkeys(record_locations(records)):
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


def _module_params(params: Mapping[str, Any], location: str) -> dict[str, list]:
    node: Any = params
    for key in [k for k in location.split("/") if k]:
        if not isinstance(node, Mapping) or key not in node:
            return {}
        node = node[key]
    if not isinstance(node, Mapping):
        return {}
    out = {}
    for key_path, leaf in flatten(node):
        if ADAPTERS_KEY in key_path:
            continue
        out["/".join(key_path)] = [list(np.shape(leaf)), dtype_name(leaf)]
    return out
