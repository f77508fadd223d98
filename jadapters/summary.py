"""``adapter_summary``: what adapters a model has, where, how big, and whether they run."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from jadapters.registry import registered_name
from jadapters.table import format_table
from jadapters.transform import AdaptedModule
from jadapters.tree import adapter_locations, count_parameters, split_adapters

COLUMNS = ("name", "type", "targets", "params", "% of base", "enabled")


@dataclasses.dataclass(frozen=True)
class AdapterSummary:
    """Rows (one per adapter) plus the base model's parameter count.

    ``str()`` gives a table whose lines stay short whatever the model (long
    cells are shortened in the middle) and PEFT's one-line total;
    :meth:`as_dict` a JSON-ready dict.
    """

    rows: tuple[dict, ...]
    base_params: int | None

    @property
    def trainable_params(self) -> int | None:
        """Params of the enabled adapters (what :func:`jadapters.make_train_step` trains by default)."""
        counts = [r["params"] for r in self.rows if r["enabled"]]
        return None if any(c is None for c in counts) else sum(counts)

    @property
    def all_params(self) -> int | None:
        """Base params plus every adapter's."""
        if self.base_params is None or any(r["params"] is None for r in self.rows):
            return None
        return self.base_params + sum(r["params"] for r in self.rows)

    def trainable_line(self) -> str:
        """PEFT's ``print_trainable_parameters`` line: ``trainable params: X || all params: Y || trainable%: Z``."""
        trainable, total = self.trainable_params, self.all_params
        if trainable is None or not total:
            return "trainable params: - || all params: - || trainable%: - (pass variables to count)"
        return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"

    def as_dict(self) -> dict:
        return {
            "adapters": [dict(r) for r in self.rows],
            "base_params": self.base_params,
            "trainable_params": self.trainable_params,
            "all_params": self.all_params,
        }

    def __str__(self) -> str:
        def cells(row):
            percent = row["% of base"]
            targets = row["targets"]
            where = ", ".join(targets) if len(targets) <= 2 else f"{len(targets)} modules: {targets[0]}, ..."
            return (row["name"], row["type"], where or "-", row["params"],
                    "-" if percent is None else f"{percent:.3f}", row["enabled"])

        footer = [("base model", "", "", self.base_params, "100.000", "")] if self.base_params is not None else []
        table = format_table(COLUMNS, [cells(r) for r in self.rows], footer=footer)
        return table + "\n" + self.trainable_line()


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
