"""Many LoRA adapters on one frozen base: a mixed batch in one compiled step, and hot swaps.

On the GPT-style decoder of ``benchmarks/methods.py`` (``nn.scan(nn.remat(block))``,
4 layers, width 128, batch 16 x 64 tokens, LoRA r=8 on query and value, Adam),
measured interleaved in one run (each round runs every variant once, in a
rotating order):

* ``single``: one ordinary LoRA adapter on the whole batch (forward; train step);
* ``mixed8``: an :class:`jadapters.AdapterBank` of 8 LoRA slots, the batch's rows
  spread over all 8 (``adapter_ids = row % 8``), one compiled call;
* ``bank_one``: the same bank with every row on slot 0 (what the bank itself costs);
* ``loop``: what PEFT does for mixed batches, in JAX: a Python loop over the 8
  adapters, each running its own rows (a jitted single-adapter call per
  sub-batch of 2 rows), the results put back in row order;
* ``gather`` / ``ragged``: one LoRA layer's per-row update ``(B, T, 128) -> (B, T, 128)``
  computed by gathering each row's weights and two batched matmuls (what the
  bank does), or by sorting rows by adapter and ``jax.lax.ragged_dot`` over the
  groups (forward and gradient), to back the bank's choice.

Then 20 hot swaps (loading, replacing and removing slots, some from
checkpoints) with a forward call after each, counting XLA compilations.
Usage::

    python benchmarks/multi_adapter.py --json multi_adapter.json [--rounds 15]
"""

from __future__ import annotations

import platform
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import jadapters  # noqa: E402
from benchmarks import cli, timing  # noqa: E402
from benchmarks.methods import BATCH, LENGTH, LR, PRESET, SIZE, next_token_loss  # noqa: E402
from benchmarks.models import GPTLM  # noqa: E402
from jadapters.compiles import count_compilations  # noqa: E402

SLOTS, RANK, SWAPS = 8, 8, 20
LORA = jadapters.LoraConfig(r=RANK, lora_alpha=16, target_modules=("query", "value"))


def _moved(variables: dict, seed: int) -> dict:
    """Adapter weights off their zero init, as trained ones are."""
    adapters, rest = jadapters.split_adapters(variables)
    leaves, tree = jax.tree_util.tree_flatten(adapters)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    moved = [leaf + 0.02 * jax.random.normal(k, leaf.shape, leaf.dtype) for leaf, k in zip(leaves, keys)]
    return jadapters.merge_trees(rest, jax.tree_util.tree_unflatten(tree, moved))


def _lora_layer_variants(ids: jax.Array) -> dict[str, Callable[[], Any]]:
    """One LoRA layer's per-row update, gathered (the bank's way) or grouped with ragged_dot."""
    d = SIZE["dim"]
    x = jax.random.normal(jax.random.key(5), (BATCH, LENGTH, d))
    a = jax.random.normal(jax.random.key(6), (SLOTS, d, RANK)) * 0.05
    b = jax.random.normal(jax.random.key(7), (SLOTS, RANK, d)) * 0.05

    def gathered(x, a, b, ids):
        h = jnp.einsum("btd,bdr->btr", x, jnp.take(a, ids, axis=0))
        return jnp.einsum("btr,bro->bto", h, jnp.take(b, ids, axis=0))

    def ragged(x, a, b, ids):
        order = jnp.argsort(ids)
        sizes = jnp.bincount(ids, length=SLOTS) * LENGTH
        rows = jnp.take(x, order, axis=0).reshape(-1, d)
        h = jax.lax.ragged_dot(rows, a, sizes)
        out = jax.lax.ragged_dot(h, b, sizes).reshape(BATCH, LENGTH, d)
        return jnp.zeros_like(out).at[order].set(out)

    variants = {}
    for name, f in (("gather", gathered), ("ragged", ragged)):
        grad = jax.jit(jax.grad(lambda a, b, f=f: jnp.sum(f(x, a, b, ids) ** 2), argnums=(0, 1)))
        variants[f"layer/{name}"] = lambda grad=grad: grad(a, b)
    return variants


def build(progress: bool = True) -> tuple[dict[str, Callable[[], Any]], dict]:
    model = GPTLM(**SIZE)
    ids = jax.random.randint(jax.random.key(0), (BATCH, LENGTH), 0, SIZE["vocab"])
    rows = jnp.arange(BATCH) % SLOTS
    base = model.init(jax.random.key(1), ids)
    plain = jadapters.with_adapters(model, PRESET)
    variants: dict[str, Callable[[], Any]] = {}

    # Eight ordinary adapters, as users train and save them.
    singles = []
    for i in tqdm(range(SLOTS), desc="adapters", disable=not progress, leave=False):
        single = plain.add_adapter("task", LORA)
        singles.append((single, _moved(jadapters.init_adapters(single, base, jax.random.key(10 + i), ids), i)))
    single, single_vars = singles[0]

    bank = plain.add_adapter("tasks", jadapters.AdapterBankConfig(LORA, slots=SLOTS))
    bank_vars = jadapters.init_adapters(bank, base, jax.random.key(2), ids)
    for slot, (source, source_vars) in enumerate(singles):
        bank_vars = jadapters.hotswap_adapter(bank, bank_vars, "tasks", slot, source, source_vars)

    single_forward = jax.jit(lambda v, x: single.apply(v, x))
    bank_forward = jax.jit(lambda v, x, r: bank.apply(v, x, adapter_ids=r))
    variants["single/forward"] = lambda: single_forward(single_vars, ids)
    variants["mixed8/forward"] = lambda: bank_forward(bank_vars, ids, rows)
    variants["bank_one/forward"] = lambda: bank_forward(bank_vars, ids, jnp.zeros_like(rows))
    per_adapter = [np.nonzero(np.asarray(rows) == s)[0] for s in range(SLOTS)]
    back = np.argsort(np.concatenate(per_adapter))

    def loop_forward():
        parts = [single_forward(v, ids[r]) for (_, v), r in zip(singles, per_adapter)]
        return jnp.concatenate(parts)[back]

    variants["loop/forward"] = loop_forward

    def train(adapted, variables, batch):
        step = jadapters.make_train_step(adapted, lambda logits, b: next_token_loss(logits, b["inputs"]),
                                         optax.adam(LR))
        holder = {"state": step.init(variables, jax.random.key(3))}

        def run(batch=batch):
            holder["state"], metrics = step(holder["state"], batch)
            return metrics["loss"]

        return run

    variants["single/step"] = train(single, single_vars, {"inputs": ids})
    variants["mixed8/step"] = train(bank, bank_vars, {"inputs": ids, "adapter_ids": rows})
    loop_steps = [train(s, v, {"inputs": ids[r]}) for (s, v), r in zip(singles, per_adapter)]
    variants["loop/step"] = lambda: [run() for run in loop_steps][-1]
    variants.update(_lora_layer_variants(rows))
    swaps = {"bank": bank, "variables": bank_vars, "forward": bank_forward, "singles": singles, "ids": ids,
             "rows": rows, "base": base, "model": model}
    return variants, swaps


def hot_swaps(swaps: dict, progress: bool = True) -> dict:
    """Compilations during SWAPS hot swaps (each followed by a forward call) and their wall time."""
    import time

    bank, variables, forward, singles = swaps["bank"], swaps["variables"], swaps["forward"], swaps["singles"]
    with tempfile.TemporaryDirectory() as tmp:
        paths = [jadapters.save_adapters(Path(tmp) / f"task{i}", s, v) for i, (s, v) in enumerate(singles[:2])]
        forward(variables, swaps["ids"], swaps["rows"]).block_until_ready()
        seconds = []
        with count_compilations() as compiled:
            for i in tqdm(range(SWAPS), desc="hot swaps", disable=not progress, leave=False):
                start = time.perf_counter()
                slot = i % SLOTS
                if i % 5 == 4:
                    variables = jadapters.clear_slot(bank, variables, "tasks", slot)
                elif i % 5 == 3:
                    variables = jadapters.hotswap_adapter(bank, variables, "tasks", slot, paths[i % 2])
                else:
                    source, source_vars = singles[(i * 3 + 1) % SLOTS]
                    variables = jadapters.hotswap_adapter(bank, variables, "tasks", slot, source, source_vars)
                forward(variables, swaps["ids"], swaps["rows"]).block_until_ready()
                seconds.append(time.perf_counter() - start)
    return {"compiles": len(compiled), "swap_and_forward_ms": 1e3 * float(np.median(seconds))}


def measure(rounds: int, progress: bool = True) -> dict:
    variants, swaps = build(progress)
    if progress:
        print(f"timing {len(variants)} variants, {rounds} interleaved rounds", file=sys.stderr)
    times = timing.interleaved_times(variants, rounds)
    swapped = hot_swaps(swaps, progress)
    ratio = lambda a, b: timing.paired_ratio(times, a, b)
    return {
        "mixed8_forward_vs_single": ratio("mixed8/forward", "single/forward"),
        "mixed8_step_vs_single": ratio("mixed8/step", "single/step"),
        "mixed8_forward_vs_loop": ratio("mixed8/forward", "loop/forward"),
        "mixed8_step_vs_loop": ratio("mixed8/step", "loop/step"),
        "bank_one_forward_vs_single": ratio("bank_one/forward", "single/forward"),
        "gather_vs_ragged_dot": ratio("layer/gather", "layer/ragged"),
        "hot_swap_compiles": swapped["compiles"],
        "hot_swap_and_forward_ms": swapped["swap_and_forward_ms"],
        "median_ms": {name: 1e3 * t for name, t in timing.medians(times).items()},
        "config": {**SIZE, "batch": BATCH, "length": LENGTH, "slots": SLOTS, "rank": RANK, "rounds": rounds,
                   "swaps": SWAPS},
        "machine": {"platform": platform.platform(), "backend": jax.default_backend(),
                    "devices": [str(d) for d in jax.devices()]},
    }


def print_report(result: dict) -> None:
    ms = result["median_ms"]
    print(f"GPT-style decoder, batch {BATCH} x {LENGTH}, {SLOTS} LoRA adapters r={RANK}, {jax.default_backend()}")
    rows = [("variant", "forward ms", "train step ms")]
    for name in ("single", "mixed8", "bank_one", "loop"):
        step = ms.get(f"{name}/step")
        rows.append((name, f"{ms[f'{name}/forward']:.1f}", "-" if step is None else f"{step:.1f}"))
    timing.print_table(rows)
    rows = [("ratio", "value")]
    for key in ("mixed8_forward_vs_single", "mixed8_step_vs_single", "mixed8_forward_vs_loop", "mixed8_step_vs_loop",
                "bank_one_forward_vs_single", "gather_vs_ragged_dot"):
        rows.append((key, f"{result[key]:.2f}"))
    rows.append(("hot_swap_compiles", str(result["hot_swap_compiles"])))
    rows.append(("hot swap + forward, ms", f"{result['hot_swap_and_forward_ms']:.1f}"))
    timing.print_table(rows)


def main(argv: list[str] | None = None) -> dict:
    return cli.run(__doc__, lambda args: measure(args.rounds, progress=not args.no_progress), print_report, argv, rounds=15)


if __name__ == "__main__":
    main()
