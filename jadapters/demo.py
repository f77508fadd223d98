"""``jadapters demo``: specialise a digit classifier to a shifted domain with adapters.

On scikit-learn's bundled handwritten digits (8x8 images, offline), a small
MLP of residual blocks is trained on normal digits. Rotated by 90 degrees, the
same digits fool it. LinearAdapters on its blocks, trained on rotated digits
with the base frozen, recover the accuracy while training a few percent of the
parameters; full fine-tuning is run for comparison. The adapter-only
checkpoint is saved, reloaded onto fresh base params and checked to give
identical predictions; training curves go to a PNG.

Needs the ``demo`` extra: ``pip install 'jadapters[demo]'`` (scikit-learn, matplotlib).

Example:
    >>> from jadapters.demo import run_demo  # doctest: +SKIP
    >>> result = run_demo("jadapters-demo", steps=50, progress=False)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from jadapters.adapters import LinearAdapter
from jadapters.checkpoint import inspect_checkpoint, load_adapters, save_adapters, save_model
from jadapters.checkpoint import adapter_checkpoint_manager, save_training_state
from jadapters.table import format_table
from jadapters.training import fit, make_train_step
from jadapters.transform import init_adapters, with_adapters
from jadapters.tree import count_parameters, split_adapters

Batch = tuple[jax.Array, jax.Array]


class DigitsMLP(nn.Module):
    """Embed (64 pixels -> width), ``blocks`` pre-norm residual MLP blocks, classify (10)."""

    width: int = 256
    blocks: int = 4
    classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.Dense(self.width, name="embed")(x.reshape(x.shape[0], -1))
        for i in range(self.blocks):
            h = ResidualBlock(self.width, name=f"block_{i}")(h)
        return nn.Dense(self.classes, name="head")(nn.LayerNorm(name="final_norm")(h))


class ResidualBlock(nn.Module):
    width: int

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        u = nn.Dense(2 * self.width, name="fc1")(nn.LayerNorm(name="norm")(h))
        return h + nn.Dense(self.width, name="fc2")(nn.gelu(u))


@dataclasses.dataclass
class PhaseResult:
    """One row of the demo's table."""

    label: str
    accuracy_normal: float
    accuracy_shifted: float
    trained_params: int
    seconds: float
    losses: list[float]


@dataclasses.dataclass
class DemoResult:
    phases: list[PhaseResult]
    total_params: int
    adapter_checkpoint: Path
    adapter_checkpoint_bytes: int
    full_checkpoint: Path
    full_checkpoint_bytes: int
    reload_identical: bool
    accuracy_adapters_disabled_normal: float
    curves_png: Path
    seconds: float


def load_domains(seed: int) -> dict[str, np.ndarray]:
    """Normal and rotated (90 degrees) digits, split 70/30 into train and test."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    labels = digits.target.astype(np.int32)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=0.3, random_state=seed, stratify=labels
    )
    rotate = lambda x: np.ascontiguousarray(np.rot90(x, k=1, axes=(1, 2)))
    return {
        "x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test,
        "xr_train": rotate(x_train), "xr_test": rotate(x_test),
    }


def minibatches(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int) -> Iterator[Batch]:
    """Endless shuffled minibatches."""
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(x))
        for start in range(0, len(order) - batch_size + 1, batch_size):
            idx = order[start : start + batch_size]
            yield jnp.asarray(x[idx]), jnp.asarray(y[idx])


def cross_entropy(logits: jax.Array, batch: Batch) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()


def accuracy(apply: Callable, variables, x: np.ndarray, y: np.ndarray) -> float:
    return float((np.asarray(apply(variables, jnp.asarray(x))).argmax(-1) == y).mean())


def train_all_params(model: nn.Module, variables, batches: Iterator[Batch], steps: int, lr: float, progress: bool, desc: str):
    """Plain full training (every parameter), used for the base model and for full fine-tuning."""
    tx = optax.adamw(lr, weight_decay=1e-4)
    params = variables["params"]
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(lambda p: cross_entropy(model.apply({"params": p}, batch[0]), batch))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    with tqdm(total=steps, desc=desc, unit="step", disable=not progress, leave=False) as bar:
        for _ in range(steps):
            params, opt_state, loss = step(params, opt_state, next(batches))
            losses.append(float(loss))
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
            bar.update(1)
    return {"params": params}, losses


def run_demo(
    out: str | os.PathLike = "jadapters-demo",
    *,
    steps: int = 500,
    seed: int = 0,
    width: int = 256,
    blocks: int = 4,
    adapter_dim: int = 16,
    batch_size: int = 64,
    progress: bool = True,
    print_fn: Callable[[str], None] = print,
) -> DemoResult:
    """Runs the whole demo, prints its table, and returns the figures."""
    start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_domains(seed)
    base = DigitsMLP(width, blocks)
    apply = jax.jit(base.apply)
    sample = jnp.asarray(data["x_train"][:1])
    phases = []

    # 1. The base model, trained on normal digits.
    t0 = time.perf_counter()
    variables = base.init(jax.random.key(seed), sample)
    variables, base_losses = train_all_params(
        base, variables, minibatches(data["x_train"], data["y_train"], batch_size, seed), steps, 3e-3, progress, "base model"
    )
    total_params = count_parameters(variables)
    phases.append(PhaseResult(
        "base model (trained on normal digits)",
        accuracy(apply, variables, data["x_test"], data["y_test"]),
        accuracy(apply, variables, data["xr_test"], data["y_test"]),
        total_params, time.perf_counter() - t0, base_losses,
    ))

    # 2. Adapters on every block, trained on rotated digits; the base stays frozen.
    t0 = time.perf_counter()
    adapted = with_adapters(base, {"blocks": "block_*", "embed": "embed"})
    adapted = adapted.add_adapter("blocks+embed:rotated", LinearAdapter(dim=adapter_dim))
    adapter_variables = init_adapters(adapted, variables, jax.random.key(seed + 1), sample)
    train_step = make_train_step(adapted, cross_entropy, optax.adam(3e-3))
    state = train_step.init(adapter_variables, jax.random.key(seed + 2))
    runs = out / "training_checkpoints"
    _clear_previous_runs(runs)  # a fresh run: orbax would not save steps older than the ones kept
    with adapter_checkpoint_manager(runs, max_to_keep=2, save_interval_steps=max(1, steps // 4)) as manager:
        state, adapter_losses = fit(
            train_step, state, minibatches(data["xr_train"], data["y_train"], batch_size, seed + 1), steps,
            progress=progress, on_step=lambda s, _: save_training_state(manager, s, adapted),
        )
        manager.wait_until_finished()  # all_steps() must not race an asynchronous save
        if int(state.step) not in manager.all_steps():
            save_training_state(manager, state, adapted, force=True)  # the final state, whatever the interval
        manager.wait_until_finished()
        kept_steps = list(manager.all_steps())
    adapter_variables = state.variables
    trained = count_parameters(split_adapters(adapter_variables)[0])
    adapted_apply = jax.jit(adapted.apply)
    phases.append(PhaseResult(
        f"+ LinearAdapter(dim={adapter_dim}) (trained on rotated)",
        accuracy(adapted_apply, adapter_variables, data["x_test"], data["y_test"]),
        accuracy(adapted_apply, adapter_variables, data["xr_test"], data["y_test"]),
        trained, time.perf_counter() - t0, adapter_losses,
    ))
    disabled = adapted.set_enabled_adapters(enabled=False)
    accuracy_disabled = accuracy(jax.jit(disabled.apply), adapter_variables, data["x_test"], data["y_test"])

    # 3. Full fine-tuning on rotated digits, for comparison.
    t0 = time.perf_counter()
    tuned, tune_losses = train_all_params(
        base, variables, minibatches(data["xr_train"], data["y_train"], batch_size, seed + 1), steps, 1e-3, progress,
        "full fine-tuning",
    )
    phases.append(PhaseResult(
        "full fine-tuning (trained on rotated)",
        accuracy(apply, tuned, data["x_test"], data["y_test"]),
        accuracy(apply, tuned, data["xr_test"], data["y_test"]),
        count_parameters(tuned), time.perf_counter() - t0, tune_losses,
    ))

    # 4. Checkpoints: adapter-only vs full; reload the adapters onto fresh base params.
    adapter_path = save_adapters(out / "adapters", adapted, adapter_variables)
    full_path = save_model(out / "full_model", adapted, adapter_variables)
    fresh_base = jax.tree_util.tree_map(lambda a: jnp.array(np.asarray(a)), variables)
    reloaded_model, reloaded = load_adapters(adapter_path, base, fresh_base)
    x_check = jnp.asarray(data["xr_test"])
    reload_identical = bool(np.array_equal(
        np.asarray(adapted.apply(adapter_variables, x_check)), np.asarray(reloaded_model.apply(reloaded, x_check))
    ))
    curves = _plot_curves(out / "training_curves.png", phases)

    result = DemoResult(
        phases=phases,
        total_params=total_params,
        adapter_checkpoint=out / adapter_path.name,
        adapter_checkpoint_bytes=inspect_checkpoint(adapter_path).disk_bytes,
        full_checkpoint=out / full_path.name,
        full_checkpoint_bytes=inspect_checkpoint(full_path).disk_bytes,
        reload_identical=reload_identical,
        accuracy_adapters_disabled_normal=accuracy_disabled,
        curves_png=curves,
        seconds=time.perf_counter() - start,
    )
    print_fn(format_result(result, steps=steps, kept_steps=kept_steps, runs=runs))
    return result


def format_result(result: DemoResult, *, steps: int, kept_steps: list[int], runs: Path) -> str:
    """The demo's report: a table of accuracies, trained parameters and times, then the checkpoints."""
    rows = []
    for p in result.phases:
        share = 100.0 * p.trained_params / result.total_params
        rows.append((
            p.label, f"{100 * p.accuracy_normal:.1f} %", f"{100 * p.accuracy_shifted:.1f} %",
            f"{p.trained_params:,} ({share:.1f} %)", f"{p.seconds:.1f} s",
        ))
    table = format_table(["", "normal digits", "rotated digits", "params trained", "train time"], rows, max_width=60)
    ratio = result.full_checkpoint_bytes / max(result.adapter_checkpoint_bytes, 1)
    lines = [
        f"jadapters demo: scikit-learn digits, {steps} steps per phase; shifted domain = digits rotated 90 degrees",
        "",
        table,
        "",
        f"adapters disabled again: normal digits {100 * result.accuracy_adapters_disabled_normal:.1f} % "
        f"(the base model, unchanged)",
        f"checkpoint, adapters only: {_size(result.adapter_checkpoint_bytes):>10}  {result.adapter_checkpoint}",
        f"checkpoint, full model:    {_size(result.full_checkpoint_bytes):>10}  {result.full_checkpoint}  "
        f"({ratio:.0f}x larger)",
        f"training checkpoints kept (adapters + optimizer state): steps {kept_steps} in {runs}",
        f"adapters reloaded onto fresh base params: predictions "
        f"{'identical' if result.reload_identical else 'DIFFERENT'}",
        f"training curves: {result.curves_png}",
        f"total wall time: {result.seconds:.1f} s",
    ]
    return "\n".join(lines)


def _clear_previous_runs(runs: Path) -> None:
    """Deletes the step directories of an earlier demo run (and nothing else)."""
    if not runs.exists():
        return
    entries = list(runs.iterdir())
    if not all(e.is_dir() and (e.name.isdigit() or ".orbax-checkpoint-tmp" in e.name) for e in entries):
        raise FileExistsError(f"{runs} holds files that are not demo training checkpoints; choose another --out")
    for entry in entries:
        shutil.rmtree(entry)


def _size(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _plot_curves(path: Path, phases: list[PhaseResult]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for p in phases:
        losses = np.asarray(p.losses)
        window = max(1, len(losses) // 25)
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax.plot(np.arange(len(smooth)) + window - 1, smooth, label=p.label)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (cross-entropy)")
    ax.set_yscale("log")
    ax.set_title("jadapters demo: digits, then rotated digits")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
