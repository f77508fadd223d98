"""Interleaved timing: every round runs each variant once, so machine noise hits all alike."""

from __future__ import annotations

import statistics
import time
from typing import Callable, Mapping

import jax

from jadapters.table import format_table


def interleaved_times(variants: Mapping[str, Callable[[], object]], rounds: int, warmup: int = 3) -> dict[str, list[float]]:
    """Seconds per call of each variant in each of ``rounds`` interleaved rounds.

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
    return times


def paired_ratio(times: Mapping[str, list[float]], numerator: str, denominator: str) -> float:
    """Median over rounds of ``numerator / denominator`` timed in the same round.

    Pairing within a round cancels the slow drifts of a shared machine.
    """
    return statistics.median(a / b for a, b in zip(times[numerator], times[denominator]))


def medians(times: Mapping[str, list[float]]) -> dict[str, float]:
    """Median seconds of each variant."""
    return {name: statistics.median(ts) for name, ts in times.items()}


def print_table(rows: list[tuple[str, ...]]) -> None:
    """Prints rows (the first is the header) as an aligned table, through jadapters' one table formatter."""
    print(format_table(rows[0], rows[1:], max_width=80))
