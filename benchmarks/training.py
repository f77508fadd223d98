"""What an adapter train step costs, against three baselines.

NeMo tutorial's SimpleModel (dim 1024) with a LinearAdapter(dim=32) on all six
blocks, batch 256, Adam, softmax cross-entropy over 10 classes. Variants:

* jadapters: ``make_train_step`` (gradients of the adapter subtree only);
* handwritten: the same step by hand: the adapter inline in each block
  (``benchmarks.models.InlineAdapterModel``, same layers, same maths),
  gradients w.r.t. the adapter params only, optax Adam on them;
* full_ft: full fine-tuning of the base model (gradients of everything, Adam
  on everything, params and optimizer state donated as any real loop does);
* floor: the base model's backward pass w.r.t. its input only, which any
  training through a frozen model pays anyway;
* one_tree: ``adapter_optimizer`` on one params tree (gradients of the whole
  tree, frozen ones zeroed by ``optax.partition``).

Every round runs each variant once (rotating the order); a timing is one
step, ``block_until_ready``. The machine may be shared: rounds during which
other processes used more than 10% of the CPUs are set aside (the reported
medians are over the quiet rounds when at least ``--rounds`` of them were
seen). Page faults and kernel time per step are recorded, and the whole
measurement is repeated in a child process whose glibc malloc reuses freed
memory instead of unmapping it, to separate the allocator's cost from the
maths (see "notes" in the output). Usage::

    python benchmarks/training.py --json training.json [--rounds 30]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import jadapters  # noqa: E402
from benchmarks import timing  # noqa: E402
from benchmarks.models import (  # noqa: E402
    BLOCK_TARGETS,
    DECODER_LAYERS,
    ENCODER_LAYERS,
    InlineAdapterModel,
    SimpleModel,
    inline_params,
    join_inline,
    tree_bytes,
)
from jadapters import LinearAdapter, init_adapters, with_adapters  # noqa: E402
from jadapters.training import adapter_optimizer, make_train_step  # noqa: E402

DIM, BATCH, ADAPTER_DIM, CLASSES, LR = 1024, 256, 32, 10, 1e-3
TARGETS = {"step_vs_handwritten": 1.03, "step_vs_full_ft": 0.75, "step_vs_floor": 1.25}
# glibc malloc that never maps a block of its own and never gives memory back: freed blocks are reused.
REUSING_MALLOC = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967295"
FOREIGN_CPU_LIMIT = 0.10


@dataclasses.dataclass
class Variant:
    run: Callable[[], Any]  # one step; returns something to block on
    memory: Any  # the compiled step's memory_analysis()
    opt_state_bytes: int


def cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def build_variants() -> tuple[dict[str, Variant], dict]:
    keys = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(keys[0], (BATCH, DIM))
    labels = jax.random.randint(keys[1], (BATCH,), 0, CLASSES)
    batch = (x, labels)

    base = SimpleModel(DIM, CLASSES)
    base_variables = base.init(keys[2], x)
    adapted = with_adapters(base, BLOCK_TARGETS).add_adapter("adapter", LinearAdapter(dim=ADAPTER_DIM))
    variables = init_adapters(adapted, base_variables, keys[3], x)
    variants = {}

    step = make_train_step(adapted, lambda logits, b: cross_entropy(logits, b[1]), optax.adam(LR))
    jad = {"state": step.init(variables, jax.random.key(1))}

    def jadapters_step():
        jad["state"], metrics = step(jad["state"], batch)
        return metrics["loss"]

    variants["jadapters"] = Variant(
        jadapters_step,
        step.update.lower(jad["state"], batch).compile().memory_analysis(),
        tree_bytes(jad["state"].opt_state),
    )

    inline = InlineAdapterModel(DIM, ADAPTER_DIM, CLASSES)
    hw_base, hw_adapter = inline_params(variables)
    hw_tx = optax.adam(LR)

    @jax.jit
    def hw_update(adapter, opt_state, base, batch):
        def loss(adapter):
            return cross_entropy(inline.apply({"params": join_inline(base, adapter)}, batch[0]), batch[1])

        value, grads = jax.value_and_grad(loss)(adapter)
        updates, opt_state = hw_tx.update(grads, opt_state, adapter)
        return optax.apply_updates(adapter, updates), opt_state, value

    hw = {"adapter": hw_adapter, "opt": hw_tx.init(hw_adapter)}

    def handwritten_step():
        hw["adapter"], hw["opt"], loss = hw_update(hw["adapter"], hw["opt"], hw_base, batch)
        return loss

    variants["handwritten"] = Variant(
        handwritten_step, hw_update.lower(hw["adapter"], hw["opt"], hw_base, batch).compile().memory_analysis(),
        tree_bytes(hw["opt"]),
    )

    ft_tx = optax.adam(LR)

    def ft_update(params, opt_state, batch):
        value, grads = jax.value_and_grad(lambda p: cross_entropy(base.apply(p, batch[0]), batch[1]))(params)
        updates, opt_state = ft_tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    ft_params = jax.tree_util.tree_map(jnp.copy, base_variables)  # donated below: not the shared base arrays
    ft = {"params": ft_params, "opt": ft_tx.init(ft_params)}
    ft_memory = jax.jit(ft_update).lower(ft["params"], ft["opt"], batch).compile().memory_analysis()
    ft_update = jax.jit(ft_update, donate_argnums=(0, 1))

    def full_ft_step():
        ft["params"], ft["opt"], loss = ft_update(ft["params"], ft["opt"], batch)
        return loss

    variants["full_ft"] = Variant(full_ft_step, ft_memory, tree_bytes(ft["opt"]))

    @jax.jit
    def floor_grad(params, batch):
        return jax.value_and_grad(lambda x: cross_entropy(base.apply(params, x), batch[1]))(batch[0])

    variants["floor"] = Variant(
        lambda: floor_grad(base_variables, batch), floor_grad.lower(base_variables, batch).compile().memory_analysis(), 0
    )

    one_tx = adapter_optimizer(optax.adam(LR), adapted, variables["params"])
    trainer = adapted.clone(training=True)

    @jax.jit
    def one_tree_update(params, opt_state, batch):
        loss = lambda p: cross_entropy(trainer.apply({"params": p}, batch[0]), batch[1])
        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = one_tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    one = {"params": variables["params"], "opt": one_tx.init(variables["params"])}

    def one_tree_step():
        one["params"], one["opt"], loss = one_tree_update(one["params"], one["opt"], batch)
        return loss

    variants["one_tree"] = Variant(
        one_tree_step, one_tree_update.lower(one["params"], one["opt"], batch).compile().memory_analysis(),
        tree_bytes(one["opt"]),
    )

    # The hand-written twin must compute the same function for the comparison to mean anything.
    info = {
        "handwritten_loss_diff": abs(float(jadapters_step()) - float(handwritten_step())),
        "base_params": jadapters.count_parameters(base_variables),
        "adapter_params": jadapters.count_parameters(jad["state"].trainable),
    }
    return variants, info


def _busy_ticks() -> tuple[int, int] | None:
    """(ticks busy on all CPUs, ticks used by this process), or None where /proc is missing."""
    try:
        with open("/proc/stat") as f:
            user, nice, system, idle, iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return user + nice + system + irq + softirq + steal, int(fields[11]) + int(fields[12])


def time_rounds(variants: dict[str, Callable[[], Any]], rounds: int, warmup: int = 3, max_factor: int = 4) -> dict:
    """Interleaved rounds until ``rounds`` quiet ones (or ``max_factor * rounds`` in all).

    Returns per variant: seconds, minor page faults and kernel seconds of each
    timed call, and which rounds were quiet.
    """
    for fn in variants.values():
        for _ in range(warmup):
            jax.block_until_ready(fn())
    names = list(variants)
    ticks_per_s, cpus = os.sysconf("SC_CLK_TCK"), os.cpu_count() or 1
    samples: dict[str, dict[str, list[float]]] = {n: {"s": [], "faults": [], "kernel_s": []} for n in names}
    quiet: list[bool] = []
    r = 0
    while sum(quiet) < rounds and r < max_factor * rounds:
        before, start_round = _busy_ticks(), time.perf_counter()
        for n in names[r % len(names) :] + names[: r % len(names)]:
            usage = resource.getrusage(resource.RUSAGE_SELF)
            start = time.perf_counter()
            jax.block_until_ready(variants[n]())
            elapsed = time.perf_counter() - start
            after = resource.getrusage(resource.RUSAGE_SELF)
            samples[n]["s"].append(elapsed)
            samples[n]["faults"].append(after.ru_minflt - usage.ru_minflt)
            samples[n]["kernel_s"].append(after.ru_stime - usage.ru_stime)
        end = _busy_ticks()
        if before is None or end is None:
            quiet.append(True)
        else:
            foreign = (end[0] - before[0]) - (end[1] - before[1])
            capacity = (time.perf_counter() - start_round) * ticks_per_s * cpus
            quiet.append(foreign <= max(3, FOREIGN_CPU_LIMIT * capacity))
        r += 1
    return {"samples": samples, "quiet": quiet}


def summarise(timed: dict, rounds: int) -> dict:
    """Medians per variant over the quiet rounds (over all rounds if too few were quiet)."""
    quiet = timed["quiet"]
    use = quiet if sum(quiet) >= rounds else [True] * len(quiet)
    out = {"rounds_total": len(quiet), "rounds_quiet": sum(quiet), "only_quiet_rounds": use is quiet}
    for name, s in timed["samples"].items():
        picked = lambda values: [v for v, keep in zip(values, use) if keep]
        out[name] = {
            "ms": 1e3 * statistics.median(picked(s["s"])),
            "page_faults": statistics.median(picked(s["faults"])),
            "kernel_ms": 1e3 * statistics.median(picked(s["kernel_s"])),
        }
    return out


def profile_adapter_pieces(rounds: int) -> dict[str, float]:
    """Median ms of forward + backward of the adapter's pieces at one block, next to a base block.

    Gradients are taken w.r.t. params and input, as in the train step; the
    base block (Dense + LayerNorm) w.r.t. its input only, as in the floor.
    """
    keys = jax.random.split(jax.random.key(5), 2)
    wide = jax.random.normal(keys[0], (BATCH, DIM))
    narrow = jax.random.normal(keys[1], (BATCH, ADAPTER_DIM))

    def fwd_bwd(module, x, wrt_params=True):
        variables = module.init(jax.random.key(0), x)
        cotangent = jax.random.normal(keys[1], jax.eval_shape(module.apply, variables, x).shape)

        @jax.jit
        def run(variables, x):
            grads = jax.vjp(module.apply, variables, x)[1](cotangent)
            return grads if wrt_params else grads[1]

        return lambda: run(variables, x)

    pieces = {
        "base_block": fwd_bwd(nn.Sequential([nn.Dense(DIM), nn.LayerNorm()]), wide, wrt_params=False),
        "whole_adapter": fwd_bwd(LinearAdapter(dim=ADAPTER_DIM), wide),
        "adapter_layernorm": fwd_bwd(nn.LayerNorm(epsilon=1e-5), wide),
        "adapter_down_dense": fwd_bwd(nn.Dense(ADAPTER_DIM, use_bias=False), wide),
        "adapter_silu_up_dense": fwd_bwd(nn.Sequential([jax.nn.silu, nn.Dense(DIM, use_bias=False)]), narrow),
    }
    timed = time_rounds(pieces, rounds)
    return {name: round(stats["ms"], 4) for name, stats in summarise(timed, rounds).items() if name in pieces}


def measure(rounds: int) -> dict:
    variants, info = build_variants()
    timed = summarise(time_rounds({n: v.run for n, v in variants.items()}, rounds), rounds)
    ms = {n: timed[n]["ms"] for n in variants}
    return {
        "step_vs_handwritten": ms["jadapters"] / ms["handwritten"],
        "step_vs_full_ft": ms["jadapters"] / ms["full_ft"],
        "step_vs_floor": ms["jadapters"] / ms["floor"],
        "step_vs_one_tree": ms["jadapters"] / ms["one_tree"],
        "opt_state_bytes_adapter": variants["jadapters"].opt_state_bytes,
        "opt_state_bytes_full": variants["full_ft"].opt_state_bytes,
        "opt_state_bytes": {n: v.opt_state_bytes for n, v in variants.items()},
        "median_ms": ms,
        "page_faults_per_step": {n: timed[n]["page_faults"] for n in variants},
        "kernel_ms_per_step": {n: timed[n]["kernel_ms"] for n in variants},
        "temp_buffer_bytes": {n: int(v.memory.temp_size_in_bytes) for n, v in variants.items()},
        "rounds": {k: timed[k] for k in ("rounds_total", "rounds_quiet", "only_quiet_rounds")},
        **info,
    }


def with_reusing_malloc(rounds: int) -> dict | None:
    """The same measurement in a child process whose malloc reuses freed memory (no mmap, no trim)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "reusing_malloc.json"
        env = {**os.environ, "GLIBC_TUNABLES": REUSING_MALLOC}
        cmd = [sys.executable, __file__, "--rounds", str(rounds), "--json", str(out), "--steps-only"]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            print("the reusing-malloc run failed:", proc.stderr[-2000:], file=sys.stderr)
            return None
        return json.loads(out.read_text())


def notes(result: dict) -> str:
    faults, temp = result["page_faults_per_step"], result["temp_buffer_bytes"]
    kernel, pieces = result["kernel_ms_per_step"], result["adapter_pieces_ms"]
    reusing = result.get("with_reusing_malloc")
    blocks = ENCODER_LAYERS + DECODER_LAYERS
    mib = lambda b: b / 2**20
    text = [
        f"jadapters adds nothing measurable over the hand-written step ({result['step_vs_handwritten']:.3f}); "
        f"the gap to the floor is the adapters' own cost plus the allocator's.",
        f"Allocator: the adapter step's XLA temp buffer is {mib(temp['jadapters']):.0f} MiB (activations kept for "
        f"the adapters' backward) against {mib(temp['floor']):.0f} MiB for the floor. glibc malloc serves "
        f"blocks above its mmap threshold (32 MiB at most) with a fresh mmap and unmaps them on free, so every "
        f"adapter step faults its temp buffer in again: {faults['jadapters']:.0f} minor page faults and "
        f"{kernel['jadapters']:.1f} ms of kernel time per step, against {faults['floor']:.0f} and "
        f"{kernel['floor']:.1f} ms for the floor (the hand-written step has the same: {faults['handwritten']:.0f}). "
        f"A per-op profile shows it as the first ops that write each page (materialised broadcasts, "
        f"elementwise fusions) taking milliseconds, not in the adapter maths.",
    ]
    if reusing:
        text.append(
            f"With GLIBC_TUNABLES={REUSING_MALLOC} (malloc never unmaps, so the temp buffer is reused) the "
            f"faults drop to {reusing['page_faults_per_step']['jadapters']:.0f} per step and the ratios become "
            f"{reusing['step_vs_handwritten']:.3f} (hand-written), {reusing['step_vs_full_ft']:.3f} (full FT), "
            f"{reusing['step_vs_floor']:.3f} (floor)."
        )
    # Forward, input gradient and kernel gradient of the skinny Dense: 3 * 2*B*D*r flops;
    # the base block's Dense forward and input gradient: 2 * 2*B*D*D.
    skinny = 6 * BATCH * DIM * ADAPTER_DIM / (pieces["adapter_down_dense"] * 1e6)
    big = 4 * BATCH * DIM * DIM / (pieces["base_block"] * 1e6)
    share = pieces["whole_adapter"] / pieces["base_block"]
    flop_share = 3 * ADAPTER_DIM / DIM  # two skinny Dense layers (12*B*D*r) over the base block's 4*B*D*D
    text.append(
        f"Maths: per block the adapter's forward+backward takes {pieces['whole_adapter']:.2f} ms, "
        f"{100 * share:.0f}% of the base block's {pieces['base_block']:.2f} ms, for {100 * flop_share:.0f}% of "
        f"its flops: "
        f"the r={ADAPTER_DIM} Dense layers run at ~{skinny:.0f} GFLOP/s against ~{big:.0f} for the "
        f"{DIM}x{DIM} one (down {pieces['adapter_down_dense']:.2f} ms, silu+up "
        f"{pieces['adapter_silu_up_dense']:.2f} ms), and the LayerNorm forward+backward "
        f"({pieces['adapter_layernorm']:.2f} ms) is memory-bound work with no flops to hide behind. "
        f"Over {blocks} blocks the adapters add about that share of the floor's time, whatever the library."
    )
    return " ".join(text)


def print_table(result: dict, title: str) -> None:
    ms, faults = result["median_ms"], result["page_faults_per_step"]
    ratio_key = {"handwritten": "step_vs_handwritten", "full_ft": "step_vs_full_ft", "floor": "step_vs_floor",
                 "one_tree": "step_vs_one_tree"}
    rounds = result["rounds"]
    print(f"{title} ({rounds['rounds_quiet']} quiet of {rounds['rounds_total']} rounds; "
          f"medians over {'quiet' if rounds['only_quiet_rounds'] else 'all'} rounds)")
    rows = [("variant", "median ms", "jadapters/variant", "target", "faults/step", "temp MiB", "opt state bytes")]
    for name in ms:
        key = ratio_key.get(name)
        rows.append((name, f"{ms[name]:.2f}", f"{result[key]:.3f}" if key else "1.000",
                     f"<= {TARGETS[key]}" if key in TARGETS else "", f"{faults[name]:.0f}",
                     f"{result['temp_buffer_bytes'][name] / 2**20:.1f}", result["opt_state_bytes"][name]))
    timing.print_table(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    parser.add_argument("--rounds", type=int, default=30, help="quiet rounds to collect (>= 20 for reported figures)")
    parser.add_argument("--no-malloc-run", action="store_true", help="skip the reusing-malloc comparison")
    parser.add_argument("--steps-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    result = measure(args.rounds)
    if args.steps_only:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        return
    result["adapter_pieces_ms"] = profile_adapter_pieces(args.rounds)
    if not args.no_malloc_run:
        reusing = with_reusing_malloc(args.rounds)
        if reusing:
            keys = ("step_vs_handwritten", "step_vs_full_ft", "step_vs_floor", "step_vs_one_tree", "median_ms",
                    "page_faults_per_step", "kernel_ms_per_step", "rounds")
            result["with_reusing_malloc"] = {k: reusing[k] for k in keys}
    result["targets"] = TARGETS
    result["config"] = {
        "dim": DIM, "batch": BATCH, "adapter_dim": ADAPTER_DIM, "rounds": args.rounds,
        "jax": jax.__version__, "backend": jax.default_backend(), "cpu_count": os.cpu_count(),
        "machine": platform.machine(), "glibc": "-".join(platform.libc_ver()),
    }
    result["notes"] = notes(result)

    print_table(result, "default malloc")
    if "with_reusing_malloc" in result:
        print_table({**result, **result["with_reusing_malloc"]}, f"GLIBC_TUNABLES={REUSING_MALLOC}")
    print("adapter pieces at one block (median ms):")
    timing.print_table([("piece", "median ms")] + [(k, f"{v:.3f}") for k, v in result["adapter_pieces_ms"].items()])
    print("notes:", result["notes"])
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
