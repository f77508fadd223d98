"""``list_modules``: every module path a model calls, with its type and output shape.

Targets for :func:`jadapters.with_adapters` are module paths; this is how to
find them in a model you did not write. Nothing is computed: the model runs
under ``jax.eval_shape``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax

from jadapters.table import format_table
from jadapters.transform import AdaptedModule, split_static
from jadapters.tree import ADAPTERS_KEY

COLUMNS = ("path", "type", "output")


def describe_output(value: Any) -> str:
    """A compact description of what a module returned: ``'float32[2,5,8]'``, tuples in parentheses.

    Example:
        >>> import jax.numpy as jnp
        >>> describe_output((jnp.zeros((2, 3)), None))
        '(float32[2,3], None)'
    """
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return f"{jax.numpy.dtype(value.dtype).name}[{','.join(map(str, value.shape))}]"
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(describe_output(v) for v in value) + ")"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {describe_output(v)}" for k, v in value.items()) + "}"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        return type(value).__name__ + describe_output({k: v for k, v in fields.items() if v is not None})
    return type(value).__name__ if value is not None else "None"


@dataclasses.dataclass(frozen=True)
class ModuleList:
    """The modules a model called, in the order of their first call: ``str()`` is a table, :meth:`as_dict` a dict."""

    rows: tuple[dict, ...]

    @property
    def paths(self) -> list[str]:
        """The module paths, in the order of their first call."""
        return [r["path"] for r in self.rows]

    def as_dict(self) -> dict[str, dict]:
        """``{path: {'type': ..., 'output': ...}}``."""
        return {r["path"]: {k: v for k, v in r.items() if k != "path"} for r in self.rows}

    def __str__(self) -> str:
        return format_table(COLUMNS, [[r["path"] or "(root)", r["type"], r["output"]] for r in self.rows])


def list_modules(model: nn.Module, variables: Mapping[str, Any] | None, *args: Any, **kwargs: Any) -> ModuleList:
    """Every module path that ``model`` calls on these inputs, with its type and output.

    ``variables`` may be None (the model is then initialised abstractly). An
    :class:`jadapters.AdaptedModule` lists its wrapped model's modules. Python
    values among the inputs (``train=False``) are passed as they are.

    Example:
        >>> import jax.numpy as jnp, flax.linen as nn
        >>> class MLP(nn.Module):
        ...     @nn.compact
        ...     def __call__(self, x):
        ...         return nn.Dense(2, name="out")(nn.relu(nn.Dense(8, name="hidden")(x)))
        >>> print(list_modules(MLP(), None, jnp.ones((4, 3))))
        path   | type  | output
        -------+-------+-------------
        (root) | MLP   | float32[4,2]
        hidden | Dense | float32[4,8]
        out    | Dense | float32[4,2]
    """
    if isinstance(model, AdaptedModule):
        model = model.model
    rows: dict[str, dict] = {}

    active: set[str] = set()

    def record(next_fun, call_args, call_kwargs, context):
        module = context.module
        if context.method_name != "__call__" or module.scope is None or ADAPTERS_KEY in module.scope.path:
            return next_fun(*call_args, **call_kwargs)
        path = "/".join(module.scope.path)
        if path in active:  # super().__call__ of the same module
            return next_fun(*call_args, **call_kwargs)
        row = rows.setdefault(path, {"path": path, "type": type(module).__name__, "output": ""})
        active.add(path)
        try:
            out = next_fun(*call_args, **call_kwargs)
        finally:
            active.discard(path)
        row["output"] = describe_output(out)
        return out

    traced, rebuild = split_static((args, kwargs))

    def run(variables, traced):
        call_args, call_kwargs = rebuild(traced)
        with nn.intercept_methods(record):
            if variables is None:
                model.init_with_output(jax.random.key(0), *call_args, **call_kwargs)
            else:
                model.apply(variables, *call_args, **call_kwargs)

    jax.eval_shape(run, variables, traced)
    return ModuleList(tuple(rows.values()))
