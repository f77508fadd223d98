"""Interleaved timing: every round runs each variant once, so machine noise hits all alike."""

from __future__ import annotations

import statistics
import time
from typing import Callable, Mapping

import jax


def interleaved_medians(variants: Mapping[str, Callable[[], object]], rounds: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each variant over ``rounds`` interleaved rounds.

    The order of the variants rotates from round to round.
    """
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            jax.block_until_ready(variants[name]())
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            start = time.perf_counter()
            jax.block_until_ready(variants[name]())
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def print_table(rows: list[tuple[str, ...]]) -> None:
    """Prints rows (the first is the header) as an aligned table."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for k, row in enumerate(rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
        if k == 0:
            print("  ".join("-" * w for w in widths))
