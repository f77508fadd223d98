"""Counting XLA compilations, to show that something (a hot swap, a new mask of rows) compiles nothing."""

from __future__ import annotations

import contextlib
from typing import Iterator

import jax

#: The event JAX records once per backend compilation.
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def count_compilations() -> Iterator[list[str]]:
    """Collects one entry per XLA compilation inside the ``with`` block.

    Example:
        >>> import jax.numpy as jnp
        >>> f = jax.jit(lambda x: x * 2)
        >>> _ = f(jnp.ones(3))
        >>> with count_compilations() as compiled:
        ...     _ = f(jnp.zeros(3))      # same shapes: cached
        >>> len(compiled)
        0
    """
    compiled: list[str] = []

    def listener(event: str, duration: float, **kwargs) -> None:
        if event == COMPILE_EVENT:
            compiled.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield compiled
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
