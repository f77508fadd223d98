"""Plain-text tables: the one formatter behind every table jadapters prints.

Summaries, ``jadapters inspect``, the demo and the benchmarks all print
through :func:`format_table`, so every table looks the same and no cell can
make a line unboundedly long: a cell wider than ``max_width`` keeps its head
and tail around an ellipsis.
"""

from __future__ import annotations

from typing import Any, Sequence

ELLIPSIS = "…"


def clip(text: str, max_width: int) -> str:
    """``text`` shortened to ``max_width`` characters, keeping both ends.

    Example:
        >>> clip("encoder/block/11/layer/0/SelfAttention/q", 20)
        'encoder/b…ttention/q'
        >>> clip("short", 20)
        'short'
    """
    if max_width < 3 or len(text) <= max_width:
        return text
    head = (max_width - 1) // 2
    tail = max_width - 1 - head
    return text[:head] + ELLIPSIS + text[len(text) - tail :]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def format_table(
    header: Sequence[str],
    rows: Sequence[Sequence[Any]],
    *,
    max_width: int = 48,
    footer: Sequence[Sequence[Any]] = (),
) -> str:
    """Formats ``rows`` under ``header`` as an aligned text table.

    Numbers are right-aligned (ints with thousands separators, floats as
    given by ``str`` unless already strings), everything else left-aligned;
    no cell is wider than ``max_width``. ``footer`` rows follow a second rule.

    Example:
        >>> print(format_table(["name", "params"], [["lora", 1024], ["bottleneck", 64]]))
        name       | params
        -----------+-------
        lora       |  1,024
        bottleneck |     64
    """
    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, int) and not isinstance(value, bool):
            return f"{value:,}"
        return clip(str(value), max_width)

    body = [[cell(v) for v in row] for row in rows]
    tail = [[cell(v) for v in row] for row in footer]
    head = [clip(str(h), max_width) for h in header]
    every = [head] + body + tail
    widths = [max(len(r[i]) if i < len(r) else 0 for r in every) for i in range(len(head))]
    numeric = [
        bool(rows) and all(_is_number(r[i]) or r[i] is None for r in rows if i < len(r)) for i in range(len(head))
    ]

    def line(values: Sequence[str]) -> str:
        padded = [
            (v.rjust(w) if numeric[i] else v.ljust(w)) for i, (v, w) in enumerate(zip(values, widths))
        ]
        return " | ".join(padded).rstrip()

    rule = "-+-".join("-" * w for w in widths)
    lines = [line(head), rule] + [line(r) for r in body]
    if tail:
        lines += [rule] + [line(r) for r in tail]
    return "\n".join(lines)
