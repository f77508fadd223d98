"""The model that saved adapters go into: checked to be adapted, rebuilt from the saved placement, checked against it.

A plain Flax module is wrapped with the placement config saved in the
checkpoint; an :class:`AdaptedModule` must declare the modules the saved
adapters sit on, with the same target patterns, and accept their types.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn

from jadapters.checkpoint.errors import CheckpointError
from jadapters.checkpoint.records import import_class
from jadapters.errors import AdapterError
from jadapters.transform import AdaptedModule, AdapterSpec, with_adapters


def require_adapted(adapted: Any, what: str) -> AdaptedModule:
    """``adapted`` if it is an :class:`AdaptedModule`; else an error saying that ``what`` expects one."""
    if not isinstance(adapted, AdaptedModule):
        raise AdapterError(f"{what} expects the AdaptedModule returned by with_adapters, got {type(adapted).__name__}")
    return adapted


def target_model(model: Any, metadata: Mapping[str, Any], what: str) -> AdaptedModule:
    """``model`` as an :class:`AdaptedModule`: a plain Flax module gets the checkpoint's placement config."""
    if isinstance(model, AdaptedModule):
        return model
    if not isinstance(model, nn.Module):
        raise AdapterError(f"{what} expects a Flax module or an AdaptedModule, got {type(model).__name__}")
    placement = metadata.get("placement") or {}
    accepted = {}
    for module_name, paths in (placement.get("accepted_types") or {}).items():
        try:
            accepted[module_name] = tuple(import_class(p, "accepted type") for p in paths)
        except CheckpointError:
            continue  # a restriction we cannot import is not enforced
    return with_adapters(
        model,
        {m: list(t) for m, t in (placement.get("modules") or {}).items()},
        global_modules=placement.get("global_modules"),
        accepted_types=accepted or None,
    )


def check_placement(adapted: AdaptedModule, metadata: Mapping[str, Any], records: list[dict]) -> None:
    """Raises a :class:`CheckpointError` if ``adapted`` lacks a module of ``records`` or targets it differently."""
    saved = (metadata.get("placement") or {}).get("modules") or {}
    declared = dict(adapted.placement.modules)
    for r in records:
        for module_name in r["modules"]:
            if module_name not in declared:
                raise CheckpointError(
                    f"adapter {r['name']!r} was saved on module {module_name!r} ({saved.get(module_name)}), which "
                    f"this model does not declare (it declares {list(declared)}); declare it in with_adapters, "
                    f"or pass strict=False to place the adapter at its saved targets {r['targets']}"
                )
            if module_name in saved and tuple(saved[module_name]) != tuple(declared[module_name]):
                raise CheckpointError(
                    f"adapter {r['name']!r}: module {module_name!r} targeted {list(saved[module_name])} when saved, "
                    f"but {list(declared[module_name])} in this model (pass strict=False to load anyway)"
                )


def add_specs(adapted: AdaptedModule, specs: list[AdapterSpec]) -> AdaptedModule:
    """``adapted`` with the adapters ``specs`` added, each checked against the types its modules accept."""
    for spec in specs:
        for module_name in spec.modules:
            accepted = adapted.placement.accepted(module_name)
            if accepted is not None and not isinstance(spec.adapter, accepted):
                raise AdapterError(
                    f"adapter {spec.name!r}: module {module_name!r} accepts only "
                    f"{[t.__name__ for t in accepted]} (or subclasses), got {type(spec.adapter).__name__}"
                )
    return adapted.clone(adapters=adapted.adapters + tuple(specs))
