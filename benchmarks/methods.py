"""What each adapter method costs, on the matrix's GPT-style family at benchmark size.

Every method of jadapters (by its AdapterHub / PEFT name) on one frozen
GPT-style decoder (``nn.scan(nn.remat(block))``, 4 layers, width 128, batch
8 x 64 tokens, next-token cross-entropy, Adam). Measured interleaved in one
run (each round runs every variant once, in a rotating order):

* ``step``: the method's adapter-only train step (``make_train_step``);
* ``floor``: the frozen base's backward pass w.r.t. its input embeddings only,
  which any training through a frozen model pays anyway;
* ``full_ft``: full fine-tuning (gradients and Adam on every base parameter);
* ``merged``: for methods that fold into the weights, the merged model's
  forward against the base's forward (``merged_vs_base``; 1.0 is the promise).

``trainable_params`` counts the enabled adapter's parameters (what PEFT prints
as trainable). Usage::

    python benchmarks/methods.py --json methods.json [--rounds 15]
"""

from __future__ import annotations

import platform
import sys
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import jadapters  # noqa: E402
from benchmarks import cli, timing  # noqa: E402
from benchmarks.models import GPTLM  # noqa: E402
from jadapters.blocks import ResidualBlock  # noqa: E402
from jadapters.presets import ATTENTION_BLOCK, FFN_BLOCK, Preset  # noqa: E402
from jadapters.sites import AttentionSite, EmbeddingSite, MaskArgument  # noqa: E402

SIZE = dict(vocab=1024, dim=128, heads=4, ff=512, layers=4, max_length=64)
BATCH, LENGTH, LR = 16, 64, 1e-3

PRESET = Preset.make(
    "gpt_benchmark",
    {
        "query": "layers/attention/query",
        "key": "layers/attention/key",
        "value": "layers/attention/value",
        "attention_output": "layers/attention/out",
        "ffn_intermediate": "layers/fc_in",
        "ffn_output": "layers/fc_out",
        "embeddings": "wte",
    },
    global_roles=["ffn_output"],
    sites={
        ATTENTION_BLOCK: ResidualBlock("layers", "attention", residual="ln_1"),
        FFN_BLOCK: ResidualBlock("layers", "Dropout_0", residual="ln_2"),
        "attention": AttentionSite("layers/attention", mask=MaskArgument("mask", 1, kind="attention")),
        "embeddings": EmbeddingSite(word_embeddings="wte", position_embeddings=("wpe",)),
    },
)

#: Each method as its users write it; the LoRA family on the query and value projections (PEFT's default).
METHODS: dict[str, Any] = {
    "linear_adapter": ("ffn_output", jadapters.LinearAdapter(dim=32)),
    "lora": jadapters.LoraConfig(r=8, lora_alpha=16, target_modules=("query", "value")),
    "dora": jadapters.LoraConfig(r=8, lora_alpha=16, target_modules=("query", "value"), use_dora=True),
    "ia3": jadapters.IA3Config(target_modules=("key", "value", "ffn_output"), feedforward_modules=("ffn_output",)),
    "vera": jadapters.VeraConfig(r=64, target_modules=("query", "value")),
    "seq_bn": "seq_bn",
    "double_seq_bn": "double_seq_bn",
    "par_bn": "par_bn",
    "compacter": "compacter",
    "compacter++": "compacter++",
    "prefix_tuning": jadapters.PrefixTuningConfig(num_virtual_tokens=20),
    "prompt_tuning": jadapters.PromptTuningConfig(num_virtual_tokens=20),
}


def next_token_loss(logits: jax.Array, ids: jax.Array) -> jax.Array:
    """Cross-entropy of each position's prediction of the next token (prompts' positions left out)."""
    logits = logits[:, -ids.shape[1] :]
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()


def build(progress: bool = True) -> tuple[dict[str, Callable[[], Any]], dict[str, dict]]:
    """The timed variants (one call each) and, per method, what is counted rather than timed."""
    model = GPTLM(**SIZE)
    ids = jax.random.randint(jax.random.key(0), (BATCH, LENGTH), 0, SIZE["vocab"])
    base = model.init(jax.random.key(1), ids)
    variants: dict[str, Callable[[], Any]] = {}
    info: dict[str, dict] = {}

    forward = jax.jit(lambda variables, ids: model.apply(variables, ids))
    variants["base_forward"] = lambda: forward(base, ids)

    @jax.jit
    def floor(variables, ids):
        offset = jnp.zeros(ids.shape + (SIZE["dim"],))
        return jax.grad(lambda o: next_token_loss(model.apply(variables, ids, o), ids))(offset)

    variants["floor"] = lambda: floor(base, ids)

    ft_tx = optax.adam(LR)

    def ft_update(params, opt_state, ids):
        value, grads = jax.value_and_grad(lambda p: next_token_loss(model.apply(p, ids), ids))(params)
        updates, opt_state = ft_tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    ft_update = jax.jit(ft_update, donate_argnums=(0, 1))
    ft_params = jax.tree_util.tree_map(jnp.copy, base)  # donated: not the shared base arrays
    ft = {"params": ft_params, "opt": ft_tx.init(ft_params)}

    def full_ft_step():
        ft["params"], ft["opt"], loss = ft_update(ft["params"], ft["opt"], ids)
        return loss

    variants["full_ft"] = full_ft_step

    for name, method in tqdm(METHODS.items(), desc="building", disable=not progress, leave=False):
        adapted = jadapters.with_adapters(model, PRESET)
        adapted = adapted.add_adapter(f"{method[0]}:{name}", method[1]) if isinstance(method, tuple) else \
            adapted.add_adapter(name, method)
        variables = jadapters.init_adapters(adapted, base, jax.random.key(2), ids)
        step = jadapters.make_train_step(adapted, next_token_loss, optax.adam(LR), inputs=lambda ids: (ids,))
        holder = {"state": step.init(variables, jax.random.key(3))}

        def run_step(holder=holder, step=step):
            holder["state"], metrics = step(holder["state"], ids)
            return metrics["loss"]

        variants[f"{name}/step"] = run_step
        info[name] = {"trainable_params": jadapters.count_parameters(holder["state"].trainable), "mergeable": False}
        try:
            merged_model, merged = jadapters.merge_adapters(adapted, variables, ids)
        except jadapters.AdapterError:
            continue  # a nonlinear method: it does not fold into the weights
        merged_forward = jax.jit(lambda variables, ids, m=merged_model: m.apply(variables, ids))
        variants[f"{name}/merged"] = lambda f=merged_forward, v=merged: f(v, ids)
        info[name]["mergeable"] = True
    return variants, info


def measure(rounds: int, progress: bool = True) -> dict:
    variants, info = build(progress)
    if progress:
        print(f"timing {len(variants)} variants, {rounds} interleaved rounds", file=sys.stderr)
    times = timing.interleaved_times(variants, rounds)
    medians = timing.medians(times)
    methods = {}
    for name, counted in info.items():
        step = f"{name}/step"
        methods[name] = {
            "step_vs_floor": timing.paired_ratio(times, step, "floor"),
            "step_vs_full_ft": timing.paired_ratio(times, step, "full_ft"),
            "trainable_params": counted["trainable_params"],
            "merged_vs_base": timing.paired_ratio(times, f"{name}/merged", "base_forward") if counted["mergeable"]
            else None,
            "step_ms": 1e3 * medians[step],
        }
    return {
        "methods": methods,
        "median_ms": {name: 1e3 * t for name, t in medians.items()},
        "base_params": jadapters.count_parameters(jax.eval_shape(GPTLM(**SIZE).init, jax.random.key(1),
                                                                  jnp.zeros((BATCH, LENGTH), jnp.int32))),
        "config": {**SIZE, "batch": BATCH, "length": LENGTH, "rounds": rounds},
        "machine": {"platform": platform.platform(), "backend": jax.default_backend(),
                    "devices": [str(d) for d in jax.devices()]},
    }


def print_report(result: dict) -> None:
    ms = result["median_ms"]
    print(f"GPT-style decoder, {result['base_params']:,} base parameters, batch {BATCH} x {LENGTH} tokens, "
          f"{jax.default_backend()}; floor {ms['floor']:.1f} ms, full fine-tuning {ms['full_ft']:.1f} ms, "
          f"base forward {ms['base_forward']:.1f} ms")
    rows = [("method", "step ms", "vs floor", "vs full FT", "trainable", "merged vs base")]
    for name, m in result["methods"].items():
        merged = "-" if m["merged_vs_base"] is None else f"{m['merged_vs_base']:.2f}"
        rows.append((name, f"{m['step_ms']:.1f}", f"{m['step_vs_floor']:.2f}", f"{m['step_vs_full_ft']:.2f}",
                     f"{m['trainable_params']:,}", merged))
    timing.print_table(rows)


def main(argv: list[str] | None = None) -> dict:
    return cli.run(__doc__, lambda args: measure(args.rounds, progress=not args.no_progress), print_report, argv, rounds=15)


if __name__ == "__main__":
    main()
