"""What a strategy sees of the call it joins: names, inputs, mode, randomness, losses."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from jadapters.errors import AdapterError

#: The variable collection in which strategies record auxiliary losses.
LOSS_COLLECTION = "adapter_losses"


@dataclasses.dataclass(frozen=True)
class AdapterContext:
    """The intercepted call, as a strategy sees it.

    Attributes:
        name: the adapter's bare name.
        path: the intercepted module's path, e.g. ``'encoder/layers_0'``.
        training: whether the adapted module runs in training mode.
        args: the positional arguments the intercepted module was called with.
        kwargs: its keyword arguments.
    """

    name: str
    path: str
    training: bool
    args: tuple[Any, ...]
    kwargs: Mapping[str, Any]
    scope: Any = dataclasses.field(repr=False, compare=False)

    def argument(self, key: int | str) -> Any:
        """The intercepted module's positional (int) or keyword (str) argument.

        Example:
            >>> ctx = AdapterContext("a", "enc", False, (1, 2), {"mask": 3}, None)
            >>> ctx.argument(1), ctx.argument("mask")
            (2, 3)
        """
        try:
            return self.args[key] if isinstance(key, int) else self.kwargs[key]
        except (IndexError, KeyError):
            raise AdapterError(
                f"adapter {self.name!r} at {self.path!r}: the intercepted call has no argument "
                f"{key!r} (it got {len(self.args)} positional and keywords {sorted(self.kwargs)})"
            ) from None

    def make_rng(self, stream: str = "dropout") -> jax.Array:
        """A fresh PRNG key from the ``rngs`` stream passed to ``apply``."""
        if not self.scope.has_rng(stream):
            raise AdapterError(
                f"adapter {self.name!r} at {self.path!r} needs the {stream!r} PRNG stream in "
                f"training mode: pass rngs={{{stream!r}: key}} to apply"
            )
        return self.scope.make_rng(stream)

    def add_loss(self, value: jax.Array, name: str = "l2_loss") -> None:
        """Records an auxiliary loss in the ``'adapter_losses'`` collection.

        Recorded only when that collection is mutable (``mutable=['adapter_losses']``);
        :func:`jadapters.sum_adapter_losses` adds up everything recorded.
        """
        if not self.scope.is_mutable_collection(LOSS_COLLECTION):
            return
        recorded = self.scope.get_variable(LOSS_COLLECTION, name) if self.scope.has_variable(LOSS_COLLECTION, name) else ()
        self.scope.put_variable(LOSS_COLLECTION, name, tuple(recorded) + (value,))


def sum_adapter_losses(variables: Mapping[str, Any]) -> jax.Array:
    """Sums every auxiliary loss recorded in ``variables['adapter_losses']``.

    Pass the mutated variables that ``apply(..., mutable=['adapter_losses'])``
    returns; an absent collection sums to 0.

    Example:
        >>> float(sum_adapter_losses({"adapter_losses": {"enc": {"l2_loss": (1.0, 2.0)}}}))
        3.0
        >>> float(sum_adapter_losses({}))
        0.0
    """
    leaves = jax.tree_util.tree_leaves(variables.get(LOSS_COLLECTION, {}))
    return sum((jnp.sum(leaf) for leaf in leaves), jnp.zeros((), jnp.float32))
