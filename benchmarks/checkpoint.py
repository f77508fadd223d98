"""Adapter-only checkpoints against full-model checkpoints and numpy's npz, on a 100M-param model.

The base model is ``--blocks`` residual MLP blocks (Dense(width -> hidden) ->
gelu -> Dense(hidden -> width)); a LinearAdapter(dim) sits on every block, 4
arrays each. Measured, as medians over ``--repeats`` interleaved runs, each
into a fresh directory:

* adapter save / load: :func:`jadapters.save_adapters` / :func:`jadapters.load_adapters`
  (load onto fresh base params, arrays ready on the device);
* full save / load: :func:`jadapters.save_model` / :func:`jadapters.load_model`
  (orbax, one array per variable), same model and variables;
* npz save / load: ``numpy.savez`` of the same adapter arrays / ``numpy.load``
  reading every array back (host numpy arrays only: no device transfer, no
  fsync, no atomic rename, no metadata). ``npz_device_put`` adds the transfer.

For context, also: ``save_adapters(..., durable=True)`` (fsync before commit),
and orbax's ``Checkpointer.save`` of an empty item with the same handler: the
fixed cost of an orbax save (temporary directory, metadata, commit).

Bytes: everything in the adapter checkpoint's directory over the raw bytes of
the adapter arrays. Every measurement starts after ``os.sync()``, so that no
write-back left by the previous one (the full checkpoint is ~400 MB) lands on
the next; page caches stay warm for all methods alike.

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

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jadapters


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


def timed(fn):
    os.sync()  # start every measurement with no dirty pages from the previous one
    start = time.perf_counter()
    out = fn()
    jax.block_until_ready(out)
    return time.perf_counter() - start, out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the figures to this file")
    parser.add_argument("--blocks", type=int, default=24)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--dim", type=int, default=20, help="LinearAdapter bottleneck width")
    parser.add_argument("--repeats", type=int, default=7)
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

    adapter_leaves = jax.tree_util.tree_leaves_with_path(adapters)
    named = {jax.tree_util.keystr(p): np.asarray(a) for p, a in adapter_leaves}
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
    times: dict[str, list[float]] = {k: [] for k in (
        "adapter_save", "adapter_load", "full_save", "full_load", "npz_save", "npz_load", "npz_device_put_load",
        "adapter_save_durable", "orbax_empty_save")}
    from jadapters.checkpoint import PackedArraysHandler, PackedArraysSave
    import orbax.checkpoint as ocp

    empty_checkpointer = ocp.Checkpointer(PackedArraysHandler())
    sizes = {}
    try:
        # one warm-up round (imports, orbax thread pools, first-call dispatch), not measured
        for rep in range(args.repeats + 1):
            adapter_path = os.path.join(root, f"adapters_{rep}")
            full_path = os.path.join(root, f"full_{rep}")
            npz_path = os.path.join(root, f"adapters_{rep}.npz")

            def npz_load():
                with np.load(npz_path) as z:
                    return {k: z[k] for k in z.files}

            saves = {
                "adapter_save": lambda: jadapters.save_adapters(adapter_path, model, variables),
                "npz_save": lambda: np.savez(npz_path, **{k: np.asarray(v) for k, v in named.items()}),
                "adapter_save_durable": lambda: jadapters.save_adapters(
                    adapter_path + "_durable", model, variables, durable=True),
                "orbax_empty_save": lambda: empty_checkpointer.save(
                    os.path.join(root, f"empty_{rep}"), args=PackedArraysSave({})),
                "full_save": lambda: jadapters.save_model(full_path, model, variables),
            }
            loads = {
                "adapter_load": lambda: jadapters.load_adapters(adapter_path, fresh, base_variables),
                "npz_load": npz_load,
                "npz_device_put_load": lambda: jax.device_put(npz_load()),
                "full_load": lambda: jadapters.load_model(full_path, base),
            }
            measured, outputs = {}, {}
            # The order rotates from run to run, so that no method always runs
            # right after the 400 MB full checkpoint.
            for ops in (saves, loads):
                names = list(ops)
                for k in names[rep % len(names):] + names[: rep % len(names)]:
                    measured[k], outputs[k] = timed(ops[k])
            loaded_model, loaded = outputs["adapter_load"]
            if rep == 0:
                got = jax.tree_util.tree_leaves(jadapters.split_adapters(loaded)[0])
                assert all(np.array_equal(a, b) for a, b in zip(got, jax.tree_util.tree_leaves(adapters)))
                sizes = {
                    "adapter_checkpoint_bytes": directory_bytes(adapter_path),
                    "full_checkpoint_bytes": directory_bytes(full_path),
                    "npz_bytes": os.path.getsize(npz_path),
                }
            else:
                for k, v in measured.items():
                    times[k].append(v)
            del outputs, loaded  # everything is deleted at the end, none of it in between
            print(f"run {rep}{' (warm-up)' if rep == 0 else ''}: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in measured.items()), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    median = {k: statistics.median(v) for k, v in times.items()}
    results = {
        "adapter_bytes_vs_raw": sizes["adapter_checkpoint_bytes"] / raw_adapter_bytes,
        "adapter_save_vs_full": median["adapter_save"] / median["full_save"],
        "adapter_load_vs_full": median["adapter_load"] / median["full_load"],
        "adapter_save_vs_npz": median["adapter_save"] / median["npz_save"],
        "adapter_load_vs_npz": median["adapter_load"] / median["npz_load"],
        "adapter_load_vs_npz_device_put": median["adapter_load"] / median["npz_device_put_load"],
        "adapter_save_durable_vs_npz": median["adapter_save_durable"] / median["npz_save"],
        "orbax_empty_save_vs_npz": median["orbax_empty_save"] / median["npz_save"],
        "median_seconds": median,
        "bytes": dict(sizes, raw_adapter_bytes=raw_adapter_bytes),
        "setup": {
            "base_params": base_params,
            "adapter_params": adapter_params,
            "adapter_arrays": len(named),
            "blocks": args.blocks,
            "width": args.width,
            "hidden": args.hidden,
            "adapter_dim": args.dim,
            "repeats": args.repeats,
            "jax": jax.__version__,
            "orbax_checkpoint": __import__("orbax.checkpoint").checkpoint.__version__,
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
        ("adapter save with durable=True (fsync) / npz save", results["adapter_save_durable_vs_npz"], ""),
        ("orbax Checkpointer.save of nothing / npz save", results["orbax_empty_save_vs_npz"], ""),
    ]
    print()
    print(f"{'ratio':46s} {'value':>8s}  target")
    for label, value, target in rows:
        print(f"{label:46s} {value:8.3f}  {target}")
    print()
    print("medians: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in median.items()))
    print(f"sizes: adapter checkpoint {sizes['adapter_checkpoint_bytes']:,} B, raw adapters {raw_adapter_bytes:,} B, "
          f"full checkpoint {sizes['full_checkpoint_bytes']:,} B")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
