"""Adapter-only checkpoints against full-model checkpoints and numpy's npz, on a 100M-param model.

The base model is ``--blocks`` residual MLP blocks (Dense(width -> hidden) ->
gelu -> Dense(hidden -> width)); a LinearAdapter(dim) sits on every block, 4
arrays each (with the defaults: 100.7M base params, 1.03M adapter params in 96
arrays). Each measurement writes into a fresh directory and starts after
``os.sync()``; medians are taken over runs in which the methods are
interleaved, in an order that rotates from run to run.

Two phases, because a 400 MB write disturbs the timing of whatever small write
follows it (page reclaim), and it should not decide the small comparisons:

* versus npz (``--repeats-npz`` runs): :func:`jadapters.save_adapters` /
  :func:`jadapters.load_adapters` (onto fresh base params, arrays on the
  device) against ``numpy.savez`` of the same adapter arrays / ``numpy.load``
  reading every array back (host arrays only: no device transfer, no fsync,
  no atomic rename, no metadata; ``npz_device_put`` adds the transfer). For
  context: ``save_adapters(..., durable=True)`` (fsync before the commit), and
  orbax's ``Checkpointer.save`` of an empty item with the same handler, the
  fixed cost of any orbax save.
* versus the full model (``--repeats-full`` runs): the same adapter save/load
  against :func:`jadapters.save_model` / :func:`jadapters.load_model` of the
  whole model (orbax, one array per variable), interleaved.

Bytes: everything in the adapter checkpoint's directory over the raw bytes of
the adapter arrays.

    python benchmarks/checkpoint.py --json results.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

import jadapters
from jadapters.checkpoint import PackedArraysHandler, PackedArraysSave


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


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    os.sync()  # no write-back left by the previous measurement lands on this one
    start = time.perf_counter()
    out = fn()
    jax.block_until_ready(out)
    return time.perf_counter() - start, out


def interleaved(ops_per_run: Callable[[int], list[dict]], runs: int, label: str) -> dict[str, list[float]]:
    """Runs ``runs + 1`` rounds (the first is a warm-up); each round runs its groups of ops in rotated order."""
    times: dict[str, list[float]] = {}
    for run in range(runs + 1):
        measured = {}
        for group in ops_per_run(run):
            names = list(group)
            for name in names[run % len(names):] + names[: run % len(names)]:
                measured[name], _ = timed(group[name])
        if run:
            for name, t in measured.items():
                times.setdefault(name, []).append(t)
        print(f"{label} run {run}{' (warm-up)' if run == 0 else ''}: "
              + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in measured.items()), flush=True)
    return times


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the figures to this file")
    parser.add_argument("--blocks", type=int, default=24)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--dim", type=int, default=20, help="LinearAdapter bottleneck width")
    parser.add_argument("--repeats-npz", type=int, default=15)
    parser.add_argument("--repeats-full", type=int, default=5)
    parser.add_argument("--dir", help="where to write the checkpoints (default: a temporary directory)")
    args = parser.parse_args(argv)

    base = Tower(args.blocks, args.width, args.hidden)
    x = jnp.ones((1, args.width), jnp.float32)
    base_variables = jax.jit(base.init)(jax.random.key(0), x)
    model = jadapters.with_adapters(base, {"blocks": "block_*"}).add_adapter("task", jadapters.LinearAdapter(args.dim))
    variables = jadapters.init_adapters(model, base_variables, jax.random.key(1), x)
    # Non-zero adapter weights, as after training.
    adapters, rest = jadapters.split_adapters(variables)
    keys = iter(jax.random.split(jax.random.key(2), len(jax.tree_util.tree_leaves(adapters))))
    adapters = jax.tree_util.tree_map(lambda a: a + 0.01 * jax.random.normal(next(keys), a.shape, a.dtype), adapters)
    variables = jadapters.merge_trees(adapters, rest)

    named = {jax.tree_util.keystr(p): np.asarray(a) for p, a in jax.tree_util.tree_leaves_with_path(adapters)}
    base_params = jadapters.count_parameters(base_variables)
    adapter_params = jadapters.count_parameters(adapters)
    raw_adapter_bytes = sum(a.nbytes for a in named.values())
    print(
        f"base model: {base_params / 1e6:.1f}M params in {args.blocks} blocks; adapters: "
        f"{adapter_params:,} params ({100 * adapter_params / base_params:.2f}%) in {len(named)} arrays, "
        f"{raw_adapter_bytes / 2**20:.2f} MiB",
        flush=True,
    )

    root = tempfile.mkdtemp(prefix="jadapters-bench-", dir=args.dir)
    fresh = jadapters.with_adapters(base, {"blocks": "block_*"})
    empty_checkpointer = ocp.Checkpointer(PackedArraysHandler())
    where = lambda name, run: os.path.join(root, f"{name}_{run}")

    def npz_load(path: str) -> dict:
        with np.load(path) as z:
            return {k: z[k] for k in z.files}

    def small_ops(run: int) -> list[dict]:
        return [
            {
                "adapter_save": lambda: jadapters.save_adapters(where("adapters", run), model, variables),
                "npz_save": lambda: np.savez(where("npz", run) + ".npz", **{k: np.asarray(v) for k, v in named.items()}),
                "adapter_save_durable": lambda: jadapters.save_adapters(
                    where("durable", run), model, variables, durable=True),
                "orbax_empty_save": lambda: empty_checkpointer.save(where("empty", run), args=PackedArraysSave({})),
            },
            {
                "adapter_load": lambda: jadapters.load_adapters(where("adapters", run), fresh, base_variables),
                "npz_load": lambda: npz_load(where("npz", run) + ".npz"),
                "npz_device_put_load": lambda: jax.device_put(npz_load(where("npz", run) + ".npz")),
            },
        ]

    def full_ops(run: int) -> list[dict]:
        return [
            {
                "adapter_save": lambda: jadapters.save_adapters(where("f_adapters", run), model, variables),
                "full_save": lambda: jadapters.save_model(where("full", run), model, variables),
            },
            {
                "adapter_load": lambda: jadapters.load_adapters(where("f_adapters", run), fresh, base_variables),
                "full_load": lambda: jadapters.load_model(where("full", run), base),
            },
        ]

    try:
        small = interleaved(small_ops, args.repeats_npz, "vs npz")
        full = interleaved(full_ops, args.repeats_full, "vs full")
        _, (_, loaded) = timed(lambda: jadapters.load_adapters(where("adapters", 0), fresh, base_variables))
        got = jax.tree_util.tree_leaves(jadapters.split_adapters(loaded)[0])
        assert all(np.array_equal(a, b) for a, b in zip(got, jax.tree_util.tree_leaves(adapters), strict=True))
        sizes = {
            "adapter_checkpoint_bytes": directory_bytes(where("adapters", 0)),
            "full_checkpoint_bytes": directory_bytes(where("full", 0)),
            "npz_bytes": os.path.getsize(where("npz", 0) + ".npz"),
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)

    m_small = {k: statistics.median(v) for k, v in small.items()}
    m_full = {k: statistics.median(v) for k, v in full.items()}
    results = {
        "adapter_bytes_vs_raw": sizes["adapter_checkpoint_bytes"] / raw_adapter_bytes,
        "adapter_save_vs_full": m_full["adapter_save"] / m_full["full_save"],
        "adapter_load_vs_full": m_full["adapter_load"] / m_full["full_load"],
        "adapter_save_vs_npz": m_small["adapter_save"] / m_small["npz_save"],
        "adapter_load_vs_npz": m_small["adapter_load"] / m_small["npz_load"],
        "adapter_load_vs_npz_device_put": m_small["adapter_load"] / m_small["npz_device_put_load"],
        "adapter_save_durable_vs_npz": m_small["adapter_save_durable"] / m_small["npz_save"],
        "orbax_empty_save_vs_npz": m_small["orbax_empty_save"] / m_small["npz_save"],
        "median_seconds": {"vs_npz": m_small, "vs_full": m_full},
        "bytes": dict(sizes, raw_adapter_bytes=raw_adapter_bytes),
        "setup": {
            "base_params": base_params,
            "adapter_params": adapter_params,
            "adapter_arrays": len(named),
            "blocks": args.blocks,
            "width": args.width,
            "hidden": args.hidden,
            "adapter_dim": args.dim,
            "repeats_npz": args.repeats_npz,
            "repeats_full": args.repeats_full,
            "jax": jax.__version__,
            "orbax_checkpoint": ocp.__version__,
            "cpu_count": os.cpu_count(),
        },
    }
    rows = [
        ("adapter checkpoint bytes / raw adapter bytes", results["adapter_bytes_vs_raw"], "<= 1.10"),
        ("adapter save / full-model save", results["adapter_save_vs_full"], "<= 0.05"),
        ("adapter load / full-model load", results["adapter_load_vs_full"], "<= 0.05"),
        ("adapter save / npz save", results["adapter_save_vs_npz"], "<= 2.0"),
        ("adapter load / npz load", results["adapter_load_vs_npz"], "<= 2.0"),
        ("adapter load / (npz load + device_put)", results["adapter_load_vs_npz_device_put"], ""),
        ("adapter save, durable=True (fsync) / npz save", results["adapter_save_durable_vs_npz"], ""),
        ("orbax save of an empty item / npz save", results["orbax_empty_save_vs_npz"], ""),
    ]
    print()
    print(f"{'ratio':46s} {'value':>8s}  target")
    for label, value, target in rows:
        print(f"{label:46s} {value:8.3f}  {target}")
    print()
    print("medians vs npz:  " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in m_small.items()))
    print("medians vs full: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in m_full.items()))
    print(f"sizes: adapter checkpoint {sizes['adapter_checkpoint_bytes']:,} B, raw adapters {raw_adapter_bytes:,} B, "
          f"npz {sizes['npz_bytes']:,} B, full checkpoint {sizes['full_checkpoint_bytes']:,} B")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
