"""The benchmarks' shared command line: ``--json FILE``, ``--rounds N``, a table printed.

Imports nothing heavy, so a benchmark may set up threads before jax or torch loads.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Callable


def run(doc: str, measure: Callable[[argparse.Namespace], dict], report: Callable[[dict], None],
        argv: list[str] | None = None, rounds: int = 15,
        extra: Callable[[argparse.ArgumentParser], Any] | None = None) -> dict:
    """Parses ``argv``, runs ``measure(args)``, prints ``report(result)``, writes ``--json``; returns the result."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--no-progress", action="store_true")
    if extra is not None:
        extra(parser)
    args = parser.parse_args(argv)
    result = measure(args)
    report(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result
