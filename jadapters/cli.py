"""The ``jadapters`` command: ``jadapters demo`` and ``jadapters inspect PATH``.

Example:
    >>> main(["inspect", "/no/such/checkpoint"])  # doctest: +SKIP
    jadapters: error: no checkpoint at /no/such/checkpoint
    1
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from typing import Sequence

from jadapters import __version__
from jadapters.checkpoint import inspect_checkpoint
from jadapters.errors import AdapterError

#: Exit codes: success, a user error (bad path, bad checkpoint, missing extra), bad arguments (argparse's).
EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``jadapters`` command."""
    parser = argparse.ArgumentParser(
        prog="jadapters",
        description="NeMo-style adapters for any Flax model: a demo, and a look inside checkpoints.",
    )
    parser.add_argument("--version", action="version", version=f"jadapters {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    demo = commands.add_parser(
        "demo",
        help="train a digit classifier, adapt it to rotated digits with adapters, compare with full fine-tuning",
        description=(
            "Trains a small MLP on scikit-learn's handwritten digits, specialises it to digits rotated by 90 "
            "degrees with LinearAdapters (a few percent of the parameters), compares with full fine-tuning, "
            "saves and reloads the adapter checkpoint, and plots the training curves. Needs the 'demo' extra."
        ),
    )
    demo.add_argument("--out", default="jadapters-demo", metavar="DIR", help="output directory (default: %(default)s)")
    demo.add_argument("--steps", type=_positive_int, default=500, help="training steps per phase (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")

    inspect = commands.add_parser(
        "inspect",
        help="show what a checkpoint holds",
        description="Shows the adapters of a jadapters checkpoint: names, types, placement, enabled, sizes, "
        "and the base model's fingerprint. PATH may also be a training checkpoint directory (latest step).",
    )
    inspect.add_argument("path", metavar="PATH", help="checkpoint directory: a local path or gs://bucket/...")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line ``argv`` (default: ``sys.argv[1:]``) and returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            return _demo(args)
        return _inspect(args)
    except BrokenPipeError:  # e.g. `jadapters inspect PATH | head`: the reader is gone, nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except (AdapterError, OSError) as e:
        print(f"jadapters: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("jadapters: interrupted", file=sys.stderr)
        return 130


def _inspect(args: argparse.Namespace) -> int:
    info = inspect_checkpoint(args.path)
    print(json.dumps(info.as_dict(), indent=2) if args.json else info)
    return EXIT_OK


def _demo(args: argparse.Namespace) -> int:
    missing = [name for module, name in (("sklearn", "scikit-learn"), ("matplotlib", "matplotlib"))
               if importlib.util.find_spec(module) is None]
    if missing:
        print(
            f"jadapters: error: the demo needs {' and '.join(missing)}; install them with: "
            f"pip install 'jadapters[demo]'",
            file=sys.stderr,
        )
        return EXIT_ERROR
    from jadapters.demo import run_demo

    result = run_demo(args.out, steps=args.steps, seed=args.seed, progress=not args.no_progress)
    return EXIT_OK if result.reload_identical else EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
