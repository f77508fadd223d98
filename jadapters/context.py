"""What a strategy sees of the call it joins: names, inputs, the module, mode, randomness, losses."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp

from jadapters.errors import AdapterError

#: The variable collection in which strategies record auxiliary losses.
LOSS_COLLECTION = "adapter_losses"

#: ``hook(call, *args, **kwargs) -> output``: runs instead of a module's call; ``call`` runs the module
#: (a :class:`ChildCall`).
ChildHook = Callable[..., Any]


class ChildCall:
    """What a child hook receives as ``call``: running it runs the child (once per call of the child).

    ``module`` is the bound child. A hook that needs the child's function a
    second time (a LayerNorm applied before and after an adapter) uses
    :meth:`again`, which runs a copy of the child on the same variables.
    """

    def __init__(self, run: Callable[..., Any], module: Any):
        self._run, self.module = run, module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._run(*args, **kwargs)

    def again(self, *args: Any, **kwargs: Any) -> Any:
        """The child's output on other inputs, from an unbound copy applied to its variables (pure)."""
        return self.module.clone(parent=None).apply(self.module.variables, *args, **kwargs)


@dataclasses.dataclass(frozen=True)
class AdapterContext:
    """The intercepted call, as a strategy sees it.

    Attributes:
        name: the adapter's bare name.
        path: the intercepted module's path, e.g. ``'encoder/layers_0'``.
        training: whether the adapted module runs in training mode.
        args: the positional arguments the intercepted module was called with.
        kwargs: its keyword arguments.
        module: the intercepted (bound) Flax module, e.g. to read its ``kernel``.
    """

    name: str
    path: str
    training: bool
    args: tuple[Any, ...]
    kwargs: Mapping[str, Any]
    scope: Any = dataclasses.field(default=None, repr=False, compare=False)
    module: Any = dataclasses.field(default=None, repr=False, compare=False)
    session: Any = dataclasses.field(default=None, repr=False, compare=False)
    changes_shape: bool = dataclasses.field(default=False, repr=False, compare=False)

    def where(self) -> str:
        """``"adapter 'name' at 'path'"``, the start of every error message about this call."""
        return f"adapter {self.name!r} at {self.path!r}"

    def argument(self, key: int | str) -> Any:
        """The intercepted module's positional (int) or keyword (str) argument.

        Example:
            >>> ctx = AdapterContext("a", "enc", False, (1, 2), {"mask": 3})
            >>> ctx.argument(1), ctx.argument("mask")
            (2, 3)
        """
        try:
            return self.args[key] if isinstance(key, int) else self.kwargs[key]
        except (IndexError, KeyError):
            raise AdapterError(
                f"{self.where()}: the intercepted call has no argument {key!r} "
                f"(it got {len(self.args)} positional and keywords {sorted(self.kwargs)})"
            ) from None

    def module_param(self, name: str) -> jax.Array:
        """The intercepted module's own parameter ``name`` (e.g. ``'kernel'``), as the module sees it.

        Inside ``nn.scan`` this is the current layer's slice.
        """
        if self.module is None or not self.module.has_variable("params", name):
            raise AdapterError(
                f"{self.where()}: the intercepted module ({type(self.module).__name__}) has no parameter {name!r}"
            )
        return self.module.get_variable("params", name)

    def make_rng(self, stream: str = "dropout") -> jax.Array:
        """A fresh PRNG key from the ``rngs`` stream passed to ``apply``.

        Inside ``nn.scan``, every layer draws the same key unless the scan
        splits that stream (``split_rngs={'dropout': True}``), as for any Flax module.
        """
        if not self.scope.has_rng(stream):
            raise AdapterError(
                f"{self.where()} needs the {stream!r} PRNG stream in training mode: "
                f"pass rngs={{{stream!r}: key}} to apply"
            )
        return self.scope.make_rng(stream)

    def add_loss(self, value: jax.Array, name: str = "l2_loss") -> None:
        """Records an auxiliary loss in the ``'adapter_losses'`` collection.

        Recorded when the caller made that collection mutable
        (``mutable=['adapter_losses']``, as :func:`jadapters.make_train_step`
        does); :func:`jadapters.sum_adapter_losses` adds up everything recorded.
        A lifted transform (``nn.scan``) that does not carry the collection
        would drop the loss: that is an error, never a silent 0.
        """
        if not self.scope.is_mutable_collection(LOSS_COLLECTION):
            if self.session is not None and self.session.losses_requested:
                raise AdapterError(
                    f"{self.where()} records an auxiliary loss ({name}), but this module runs inside a lifted "
                    f"transform (such as nn.scan) that does not carry the {LOSS_COLLECTION!r} collection, so the "
                    f"loss would be lost: add {LOSS_COLLECTION!r}: 0 to that transform's variable_axes"
                )
            return
        recorded = self.scope.get_variable(LOSS_COLLECTION, name) if self.scope.has_variable(LOSS_COLLECTION, name) else ()
        self.scope.put_variable(LOSS_COLLECTION, name, tuple(recorded) + (value,))

    @contextlib.contextmanager
    def intercept_children(self, hooks: Mapping[str, ChildHook]) -> Iterator[None]:
        """While active, calls of the submodules at the relative paths in ``hooks`` run the hooks instead.

        ``hooks[relative_path](call, *args, **kwargs)`` replaces the call of the
        submodule ``path + '/' + relative_path``; ``call`` (a :class:`ChildCall`)
        runs the submodule itself, and ``call.module`` is the submodule. This is
        how a strategy reaches inside the module it wraps, e.g. to read one
        sublayer's output and change what another computes. A hook must return
        what the submodule returns, in shapes and dtypes, unless the strategy
        declares ``changes_shape`` (prompt and prefix tuning).
        """
        if self.session is None:
            raise AdapterError(f"{self.where()}: intercept_children works only inside an adapted model's call")
        if not self.changes_shape:
            hooks = {relative: _shape_kept(self, relative, hook) for relative, hook in hooks.items()}
        with self.session.child_hooks(self.path, hooks):
            yield


def _shape_kept(ctx: AdapterContext, relative: str, hook: ChildHook) -> ChildHook:
    """``hook``, checked to return the submodule's own shapes and dtypes."""

    def checked(call, *args, **kwargs):
        values: list[Any] = []

        def record(*a, **k):
            values.append(call(*a, **k))
            return values[-1]

        result = hook(ChildCall(record, call.module), *args, **kwargs)
        if values:
            from jadapters.strategies import check_like  # strategies import this module

            check_like(result, values[-1], ctx, what=f"its hook on the submodule {relative!r}")
        return result

    return checked


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
    return sum((jnp.sum(leaf.astype(jnp.float32)) for leaf in map(jnp.asarray, leaves)), jnp.zeros((), jnp.float32))
