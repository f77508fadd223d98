"""Forward-pass overhead of jadapters, measured against hand-written Flax.

The tutorial model (dim 1024, batch 256) with a LinearAdapter(dim=32) on all
six MLP blocks:

* forward through jadapters vs the same model written by hand with the
  adapter inlined in each block (target: ratio <= 1.02);
* all adapters disabled vs the base model (target: ratio <= 1.02).

All four are jitted; each ratio is the median over interleaved rounds of the
two variants' times in the same round.

Run: ``python benchmarks/overhead.py --json overhead.json``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jadapters  # noqa: E402
from benchmarks.models import BLOCK_TARGETS, InlineAdapterModel, SimpleModel, inline_params, join_inline  # noqa: E402
from benchmarks.timing import interleaved_times, medians, paired_ratio, print_table  # noqa: E402

TARGETS = {"forward_vs_handwritten": 1.02, "disabled_vs_base": 1.02}


def build(dim: int, batch: int, adapter_dim: int):
    """The four jitted forwards, checked to compute what they should."""
    keys = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(keys[0], (batch, dim))
    base = SimpleModel(dim)
    base_vars = base.init(keys[1], x)
    adapted = jadapters.with_adapters(base, BLOCK_TARGETS).add_adapter("adapter", jadapters.LinearAdapter(dim=adapter_dim))
    variables = jadapters.init_adapters(adapted, base_vars, keys[2], x)
    # move the adapters off their zero init so that the adapted forward really differs
    adapters, rest = jadapters.split_adapters(variables)
    noise = lambda a, k: a + 0.02 * jax.random.normal(k, a.shape, a.dtype)
    leaves, treedef = jax.tree_util.tree_flatten(adapters)
    adapters = jax.tree_util.tree_unflatten(treedef, [noise(a, k) for a, k in zip(leaves, jax.random.split(keys[3], len(leaves)))])
    variables = jadapters.merge_trees(rest, adapters)
    disabled = adapted.set_enabled_adapters(enabled=False)
    inline = InlineAdapterModel(dim, adapter_dim)
    inline_vars = {"params": join_inline(*inline_params(variables))}

    forwards = {
        "jadapters": (jax.jit(adapted.apply), variables),
        "handwritten": (jax.jit(inline.apply), inline_vars),
        "disabled": (jax.jit(disabled.apply), variables),
        "base": (jax.jit(base.apply), base_vars),
    }
    outputs = {name: fn(v, x) for name, (fn, v) in forwards.items()}
    np.testing.assert_allclose(outputs["jadapters"], outputs["handwritten"], rtol=2e-4, atol=2e-4)
    assert jnp.array_equal(outputs["disabled"], outputs["base"]), "disabled adapters changed the output"
    assert not jnp.allclose(outputs["jadapters"], outputs["base"]), "the adapters had no effect"
    return {name: (lambda fn=fn, v=v: fn(v, x)) for name, (fn, v) in forwards.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="FILE", help="write the results here")
    parser.add_argument("--rounds", type=int, default=100, help="interleaved rounds (>= 20 for the report)")
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--adapter-dim", type=int, default=32)
    args = parser.parse_args(argv)

    times = interleaved_times(build(args.dim, args.batch, args.adapter_dim), args.rounds)
    seconds = medians(times)
    result = {
        "forward_vs_handwritten": paired_ratio(times, "jadapters", "handwritten"),
        "disabled_vs_base": paired_ratio(times, "disabled", "base"),
        "median_ms": {name: 1e3 * s for name, s in seconds.items()},
        "config": {"dim": args.dim, "batch": args.batch, "adapter_dim": args.adapter_dim, "rounds": args.rounds,
                   "backend": jax.default_backend(), "devices": jax.device_count(), "machine": platform.machine(),
                   "jax": jax.__version__},
    }
    print(f"forward pass, dim {args.dim}, batch {args.batch}, LinearAdapter(dim={args.adapter_dim}) on 6 blocks, "
          f"{args.rounds} interleaved rounds ({jax.default_backend()})")
    print_table([("variant", "median ms")] + [(name, f"{1e3 * s:.2f}") for name, s in seconds.items()])
    print()
    print_table([("ratio (median of paired rounds)", "value", "target")] + [(k, f"{result[k]:.3f}", f"<= {t}") for k, t in TARGETS.items()])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
