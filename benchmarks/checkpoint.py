"""Adapter checkpoints: jadapters against full-model checkpoints, numpy's npz, and orbax's storage options.

The base model is ``--blocks`` residual MLP blocks (Dense(width -> hidden) ->
gelu -> Dense(hidden -> width)); a LinearAdapter(dim) sits on every block, 4
arrays each (with the defaults: 100.7M base params, 1.03M adapter params in 96
arrays). Each measurement writes into a fresh directory after ``os.sync()``;
the variants of a phase are interleaved, in an order that rotates from round
to round, and medians are taken over the rounds after a warm-up.

Phases:

* storage options (``--repeats-options`` rounds): the same 96 adapter arrays
  saved and restored through an orbax ``CheckpointManager`` (a step per save,
  the layout jadapters uses) in each way orbax offers, against packing them
  into one buffer per dtype: ``StandardCheckpointHandler`` (OCDBT),
  ``PyTreeCheckpointHandler`` without OCDBT, with zarr3, and with
  ``SaveArgs(aggregate=True)``; packed buffers through the same handlers
  and without compression;
  ``numpy.savez`` for reference. This is what picked jadapters' storage.
* versus npz and the full model (``--repeats-full`` rounds):
  :func:`jadapters.save_adapters` / :func:`jadapters.load_adapters` against
  :func:`jadapters.save_model` / :func:`jadapters.load_model` (every array of
  the model) and ``numpy.savez`` / ``numpy.load`` of the adapter arrays.

Bytes: everything in the adapter checkpoint's step directory over the raw
bytes of the adapter arrays.

    python benchmarks/checkpoint.py --json results.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
from flax import traverse_util  # noqa: E402

import jadapters  # noqa: E402
from jadapters.checkpoint import io  # noqa: E402
from jadapters.table import format_table  # noqa: E402
from benchmarks.timing import paired_ratio  # noqa: E402


class Block(nn.Module):
    width: int
    hidden: int

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(self.hidden, name="up")(x)
        return x + nn.Dense(self.width, name="down")(nn.gelu(h))


class Tower(nn.Module):
    blocks: int
    width: int
    hidden: int

    @nn.compact
    def __call__(self, x):
        for i in range(self.blocks):
            x = Block(self.width, self.hidden, name=f"block_{i}")(x)
        return x


def directory_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def timed(fn: Callable[[], Any]) -> float:
    os.sync()  # no write-back left by the previous measurement lands on this one
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def interleaved(ops: Callable[[int], list[dict]], rounds: int, label: str) -> dict[str, list[float]]:
    """``rounds + 1`` rounds (the first a warm-up); each runs its groups of ops in a rotated order."""
    times: dict[str, list[float]] = {}
    for r in range(rounds + 1):
        measured = {}
        for group in ops(r):
            names = list(group)
            for name in names[r % len(names):] + names[: r % len(names)]:
                measured[name] = timed(group[name])
        if r:
            for name, t in measured.items():
                times.setdefault(name, []).append(t)
        print(f"{label} round {r}{' (warm-up)' if r == 0 else ''}: "
              + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in measured.items()), flush=True)
    return times


def orbax_options(adapters: dict) -> dict[str, tuple[Callable[[], Any], Callable[[], Any], Callable[[], Any]]]:
    """name -> (handler factory, save args factory, restore args factory) for the adapter arrays."""
    flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(adapters).items()}
    tree = traverse_util.unflatten_dict(flat)
    packed, _, _ = io.stored_tree(list(flat.items()), pack=True)
    as_np = lambda t: jax.tree_util.tree_map(lambda a: ocp.RestoreArgs(restore_type=np.ndarray), t)
    aggregate = jax.tree_util.tree_map(lambda a: ocp.SaveArgs(aggregate=True), tree)

    def pytree(t, **handler_kwargs):
        return (lambda: ocp.PyTreeCheckpointHandler(**handler_kwargs), lambda: ocp.args.PyTreeSave(t),
                lambda: ocp.args.PyTreeRestore(restore_args=as_np(t)))

    return {
        "per-array StandardCheckpointHandler (OCDBT)": (
            ocp.StandardCheckpointHandler, lambda: ocp.args.StandardSave(tree),
            lambda: ocp.args.StandardRestore(jax.tree_util.tree_map(lambda a: np.zeros_like(a), tree))),
        "per-array PyTree, OCDBT off": pytree(tree, use_ocdbt=False),
        "per-array PyTree, zarr3 + OCDBT": pytree(tree, use_zarr3=True),
        "per-array PyTree, SaveArgs(aggregate=True)": (
            lambda: ocp.PyTreeCheckpointHandler(use_ocdbt=False),
            lambda: ocp.args.PyTreeSave(tree, save_args=aggregate),
            lambda: ocp.args.PyTreeRestore(restore_args=as_np(tree))),
        "packed, StandardCheckpointHandler (OCDBT)": (
            ocp.StandardCheckpointHandler, lambda: ocp.args.StandardSave(packed),
            lambda: ocp.args.StandardRestore(jax.tree_util.tree_map(lambda a: np.zeros_like(a), packed))),
        "packed, PyTree, OCDBT off": pytree(packed, use_ocdbt=False),
        "packed, PyTree, OCDBT off, no compression (jadapters)": pytree(packed, use_ocdbt=False, use_compression=False),
        "packed, PyTree, zarr3 + OCDBT": pytree(packed, use_zarr3=True),
    }


def option_ops(options: dict, where: Callable[[str, int], str], named: dict) -> Callable[[int], list[dict]]:
    def manager(name: str, run: int, handler):
        return ocp.CheckpointManager(
            where(name, run),
            options=ocp.CheckpointManagerOptions(max_to_keep=1, enable_async_checkpointing=False,
                                                 cleanup_tmp_directories=True),
            item_handlers=handler(),
        )

    def save(name, run):
        handler, args, _ = options[name]
        with manager(name, run, handler) as m:
            m.save(1, args=args())

    def load(name, run):
        handler, _, restore = options[name]
        with manager(name, run, handler) as m:
            return m.restore(1, args=restore())

    def npz_load(run):
        with np.load(where("npz", run) + ".npz") as z:
            return {k: z[k] for k in z.files}

    def ops(run: int) -> list[dict]:
        saves = {name: (lambda n=name: save(n, run)) for name in options}
        saves["numpy.savez"] = lambda: np.savez(where("npz", run) + ".npz", **named)
        loads = {f"{name} (load)": (lambda n=name: load(n, run)) for name in options}
        loads["numpy.savez (load)"] = lambda: npz_load(run)
        return [saves, loads]

    return ops


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the figures to this file")
    parser.add_argument("--blocks", type=int, default=24)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--dim", type=int, default=20, help="LinearAdapter bottleneck width")
    parser.add_argument("--repeats-options", type=int, default=7)
    parser.add_argument("--repeats-full", type=int, default=5)
    parser.add_argument("--dir", help="where to write the checkpoints (default: a temporary directory)")
    args = parser.parse_args(argv)
    logging.getLogger("absl").setLevel(logging.ERROR)

    base = Tower(args.blocks, args.width, args.hidden)
    x = jnp.ones((1, args.width), jnp.float32)
    base_variables = jax.jit(base.init)(jax.random.key(0), x)
    model = jadapters.with_adapters(base, {"blocks": "block_*"}).add_adapter("task", jadapters.LinearAdapter(args.dim))
    variables = jadapters.init_adapters(model, base_variables, jax.random.key(1), x)
    adapters, rest = jadapters.split_adapters(variables)  # non-zero adapter weights, as after training
    keys = iter(jax.random.split(jax.random.key(2), len(jax.tree_util.tree_leaves(adapters))))
    adapters = jax.tree_util.tree_map(lambda a: a + 0.01 * jax.random.normal(next(keys), a.shape, a.dtype), adapters)
    variables = jadapters.merge_trees(adapters, rest)

    named = {jax.tree_util.keystr(p): np.asarray(a) for p, a in jax.tree_util.tree_leaves_with_path(adapters)}
    base_params = jadapters.count_parameters(base_variables)
    adapter_params = jadapters.count_parameters(adapters)
    raw = sum(a.nbytes for a in named.values())
    print(f"base model: {base_params / 1e6:.1f}M params in {args.blocks} blocks; adapters: {adapter_params:,} params "
          f"({100 * adapter_params / base_params:.2f}%) in {len(named)} arrays, {raw / 2**20:.2f} MiB", flush=True)

    root = tempfile.mkdtemp(prefix="jadapters-bench-", dir=args.dir)
    fresh = jadapters.with_adapters(base, {"blocks": "block_*"})
    where = lambda name, run: os.path.join(root, f"{name.replace(' ', '_').replace(',', '')}_{run}")
    options = orbax_options(adapters)

    def npz_load(run: int) -> dict:
        with np.load(where("npz_full", run) + ".npz") as z:
            return {k: z[k] for k in z.files}

    def full_ops(run: int) -> list[dict]:
        return [
            {
                "adapter_save": lambda: jadapters.save_adapters(where("adapters", run), model, variables),
                "full_save": lambda: jadapters.save_model(where("full", run), model, variables),
                "npz_save": lambda: np.savez(where("npz_full", run) + ".npz", **named),
            },
            {
                "adapter_load": lambda: jadapters.load_adapters(where("adapters", run), fresh, base_variables),
                "full_load": lambda: jadapters.load_model(where("full", run), base),
                "npz_load": lambda: npz_load(run),
            },
        ]

    try:
        option_times = interleaved(option_ops(options, where, named), args.repeats_options, "options")
        option_bytes = {name: directory_bytes(where(name, 0)) for name in options}
        option_bytes["numpy.savez"] = os.path.getsize(where("npz", 0) + ".npz")
        full = interleaved(full_ops, args.repeats_full, "vs full")
        _, loaded = jadapters.load_adapters(where("adapters", 0), fresh, base_variables)
        got = jax.tree_util.tree_leaves(jadapters.split_adapters(loaded)[0])
        assert all(np.array_equal(a, b) for a, b in zip(got, jax.tree_util.tree_leaves(adapters), strict=True))
        sizes = {
            "adapter_checkpoint_bytes": directory_bytes(where("adapters", 0)),
            "full_checkpoint_bytes": directory_bytes(where("full", 0)),
            "npz_bytes": os.path.getsize(where("npz_full", 0) + ".npz"),
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)

    m = {k: statistics.median(v) for k, v in full.items()}
    opt = {k: statistics.median(v) for k, v in option_times.items()}
    names = list(options) + ["numpy.savez"]
    results = {
        "adapter_bytes_vs_raw": sizes["adapter_checkpoint_bytes"] / raw,
        # Medians of ratios paired within a round, which cancels the slow drifts of a shared machine.
        "adapter_save_vs_full": paired_ratio(full, "adapter_save", "full_save"),
        "adapter_load_vs_full": paired_ratio(full, "adapter_load", "full_load"),
        "adapter_save_vs_npz": paired_ratio(full, "adapter_save", "npz_save"),
        "adapter_load_vs_npz": paired_ratio(full, "adapter_load", "npz_load"),
        "median_seconds": m,
        "bytes": dict(sizes, raw_adapter_bytes=raw),
        "options": {
            name: {"save_s": opt[name], "load_s": opt[f"{name} (load)"],
                   "bytes": option_bytes[name], "bytes_vs_raw": option_bytes[name] / raw}
            for name in names
        },
        "setup": {
            "base_params": base_params, "adapter_params": adapter_params, "adapter_arrays": len(named),
            "blocks": args.blocks, "width": args.width, "hidden": args.hidden, "adapter_dim": args.dim,
            "repeats_options": args.repeats_options, "repeats_full": args.repeats_full,
            "jax": jax.__version__, "orbax_checkpoint": ocp.__version__, "cpu_count": os.cpu_count(),
        },
    }
    print()
    rows = [[name, f"{1e3 * o['save_s']:.1f}", f"{1e3 * o['load_s']:.1f}", f"{o['bytes_vs_raw']:.3f}"]
            for name, o in results["options"].items()]
    print(format_table([f"{len(named)} adapter arrays, stored as", "save ms", "load ms", "bytes / raw"], rows, max_width=60))
    print()
    rows = [
        ["adapter checkpoint bytes / raw adapter bytes", f"{results['adapter_bytes_vs_raw']:.3f}", "<= 1.10"],
        ["adapter save / full-model save", f"{results['adapter_save_vs_full']:.3f}", "<= 0.05"],
        ["adapter load / full-model load", f"{results['adapter_load_vs_full']:.3f}", "<= 0.05"],
        ["adapter save / npz save", f"{results['adapter_save_vs_npz']:.2f}", ""],
        ["adapter load / npz load", f"{results['adapter_load_vs_npz']:.2f}", ""],
    ]
    print(format_table(["ratio (median of paired rounds)", "value", "target"], rows, max_width=60))
    print("medians: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in m.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
