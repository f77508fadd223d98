"""``adapter_summary``: what adapters a model has, where, how big, and whether they run."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from jadapters.registry import registered_name
from jadapters.transform import AdaptedModule
from jadapters.tree import adapter_locations, count_parameters, split_adapters

COLUMNS = ("name", "type", "targets", "params", "% of base", "enabled")


@dataclasses.dataclass(frozen=True)
class AdapterSummary:
    """Rows (one per adapter) plus the base model's parameter count.

    ``str()`` gives a table; :meth:`as_dict` a JSON-ready dict.
    """

    rows: tuple[dict, ...]
    base_params: int | None

    def as_dict(self) -> dict:
        return {"adapters": [dict(r) for r in self.rows], "base_params": self.base_params}

    def __str__(self) -> str:
        def cell(row, column):
            value = row[column]
            if column == "targets":
                return ", ".join(value) or "-"
            if column == "% of base":
                return "-" if value is None else f"{value:.3f}"
            if value is None:
                return "-"
            if column == "params":
                return f"{value:,}"
            return str(value)

        table = [COLUMNS] + [tuple(cell(r, c) for c in COLUMNS) for r in self.rows]
        if self.base_params is not None:
            table.append(("base model", "", "", f"{self.base_params:,}", "100.000", ""))
        widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
        rule = "-+-".join("-" * w for w in widths)
        lines = [" | ".join(v.ljust(w) for v, w in zip(line, widths)) for line in table]
        return "\n".join([lines[0], rule] + lines[1:])


def adapter_summary(adapted: AdaptedModule, variables: Mapping[str, Any] | None = None) -> AdapterSummary:
    """Summarises the adapters of ``adapted``; with ``variables`` it counts params.

    With variables, ``targets`` lists the module paths where each adapter's
    params are; without, the declared target patterns.

    Example:
        >>> import jax, jax.numpy as jnp, flax.linen as nn
        >>> from jadapters import LinearAdapter, with_adapters, init_adapters
        >>> x = jnp.ones((1, 8))
        >>> model = with_adapters(nn.Dense(8), {"dense": ""}).add_adapter("a", LinearAdapter(2))
        >>> variables = init_adapters(model, nn.Dense(8).init(jax.random.key(0), x), jax.random.key(1), x)
        >>> adapter_summary(model, variables).rows[0]["params"]
        48
    """
    base_params = None
    located: dict[str, list[str]] = {}
    per_adapter: dict[str, int] = {}
    if variables is not None:
        params = {"params": variables.get("params", {})}
        adapters, base = split_adapters(params)
        base_params = count_parameters(base)
        located = adapter_locations(adapters)
        for spec in adapted.adapters:
            per_adapter[spec.name] = count_parameters(split_adapters(adapters, [spec.name])[0])
    rows = []
    for spec in adapted.adapters:
        count = per_adapter.get(spec.name)
        rows.append(
            {
                "name": spec.name,
                "type": registered_name(type(spec.adapter)),
                "targets": list(located.get(spec.name, spec.targets) if variables is not None else spec.targets),
                "params": count,
                "% of base": None if count is None or not base_params else 100.0 * count / base_params,
                "enabled": spec.enabled,
            }
        )
    return AdapterSummary(tuple(rows), base_params)
