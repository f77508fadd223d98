"""Adapter banks: mixed-adapter batches, hot-swapping without compiling, training several adapters at once."""

from __future__ import annotations

import flax.linen as nn
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings

import jadapters
from jadapters import AdapterBank, AdapterBankConfig, LoraConfig, clear_slot, hotswap_adapter
from jadapters.compiles import count_compilations
from jadapters.errors import AdapterError

from architectures import zoo

pytestmark = pytest.mark.xdist_group("bank")

LORA = dict(target_modules=("query", "value"))
IDS = jnp.array([1, -1, 0])


def _perturbed(variables, seed):
    """Every adapter leaf moved off its init (a zero LoRA B would hide a wrong row)."""
    adapters, rest = jadapters.split_adapters(variables)
    leaves, tree = jax.tree_util.tree_flatten(adapters)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    moved = [leaf + 0.3 * jax.random.normal(k, leaf.shape, leaf.dtype) for leaf, k in zip(leaves, keys)]
    return jadapters.merge_trees(rest, jax.tree_util.tree_unflatten(tree, moved))


@pytest.fixture(scope="module")
def gpt():
    model, params = zoo.GPT.built()
    tokens = zoo.GPT.inputs(0)[0]
    return model, params, tokens


def _single(gpt, config, seed):
    model, params, tokens = gpt
    adapted = jadapters.with_adapters(model, zoo.GPT.preset).add_adapter("a", config)
    variables = _perturbed(jadapters.init_adapters(adapted, params, jax.random.key(seed), tokens), seed)
    return adapted, variables, adapted.apply(variables, tokens, deterministic=True)


def _bank(gpt, config, slots=3, seed=5):
    model, params, tokens = gpt
    adapted = jadapters.with_adapters(model, zoo.GPT.preset).add_adapter("tasks", AdapterBankConfig(config, slots))
    return adapted, jadapters.init_adapters(adapted, params, jax.random.key(seed), tokens)


@pytest.fixture(scope="module")
def lora_bank(gpt, tmp_path_factory):
    """Slot 0: LoRA r=2 (padded to the bank's 4); slot 1: rsLoRA r=4 loaded from a checkpoint."""
    a = _single(gpt, LoraConfig(r=2, lora_alpha=4, **LORA), 1)
    b = _single(gpt, LoraConfig(r=4, lora_alpha=8, use_rslora=True, **LORA), 2)
    adapted, variables = _bank(gpt, LoraConfig(r=4, **LORA))
    variables = hotswap_adapter(adapted, variables, "tasks", 0, a[0], a[1])
    path = jadapters.save_adapters(tmp_path_factory.mktemp("b") / "b", b[0], b[1])
    variables = hotswap_adapter(adapted, variables, "tasks", 1, path)
    return adapted, variables, a, b


def test_each_row_runs_its_own_adapter_and_minus_one_is_the_base(gpt, lora_bank):
    model, params, tokens = gpt
    adapted, variables, a, b = lora_bank
    out = adapted.apply(variables, tokens, adapter_ids=IDS, deterministic=True)
    base = model.apply(params, tokens, deterministic=True)
    np.testing.assert_allclose(out[0], b[2][0], atol=2e-6, rtol=0)  # rsLoRA from a checkpoint
    np.testing.assert_allclose(out[2], a[2][2], atol=2e-6, rtol=0)  # rank 2 zero-padded to 4: exact
    assert (out[1] == base[1]).all()  # -1: the base, bitwise
    assert not np.allclose(out[0], base[0], atol=1e-3) and not np.allclose(out[2], base[2], atol=1e-3)


def test_hot_swaps_compile_nothing(gpt, lora_bank):
    model, params, tokens = gpt
    adapted, variables, a, b = lora_bank
    forward = jax.jit(lambda v, x, ids: adapted.apply(v, x, adapter_ids=ids, deterministic=True))
    forward(variables, tokens, IDS).block_until_ready()
    with count_compilations() as compiles:
        swapped = hotswap_adapter(adapted, variables, "tasks", 2, b[0], b[1])   # load
        swapped = hotswap_adapter(adapted, swapped, "tasks", 1, a[0], a[1])     # replace
        swapped = clear_slot(adapted, swapped, "tasks", 0)                      # remove
        out = forward(swapped, tokens, jnp.array([2, 1, 0])).block_until_ready()
    assert compiles == []
    base = model.apply(params, tokens, deterministic=True)
    np.testing.assert_allclose(out[0], b[2][0], atol=2e-6, rtol=0)
    np.testing.assert_allclose(out[1], a[2][1], atol=2e-6, rtol=0)
    assert (out[2] == base[2]).all()  # an emptied slot computes the base


def test_bank_saves_and_loads(gpt, lora_bank, tmp_path):
    model, params, tokens = gpt
    adapted, variables, _, _ = lora_bank
    path = jadapters.save_adapters(tmp_path / "bank", adapted, variables)
    restored, restored_vars = jadapters.load_adapters(path, model, params)
    np.testing.assert_array_equal(
        restored.apply(restored_vars, tokens, adapter_ids=IDS, deterministic=True),
        adapted.apply(variables, tokens, adapter_ids=IDS, deterministic=True),
    )


@pytest.mark.parametrize("config, padded", [
    (jadapters.IA3Config(), None),
    (jadapters.SeqBnConfig(reduction_factor=4), jadapters.SeqBnConfig(reduction_factor=8)),
], ids=["ia3", "seq_bn"])
def test_ia3_and_bottleneck_banks(gpt, config, padded):
    model, params, tokens = gpt
    a = _single(gpt, config, 3)
    b = _single(gpt, padded or config, 4)  # seq_bn: a narrower bottleneck, zero-padded
    adapted, variables = _bank(gpt, config, slots=2)
    variables = hotswap_adapter(adapted, variables, "tasks", 0, a[0], a[1])
    variables = hotswap_adapter(adapted, variables, "tasks", 1, b[0], b[1])
    out = adapted.apply(variables, tokens, adapter_ids=IDS, deterministic=True)
    np.testing.assert_allclose(out[0], b[2][0], atol=2e-6, rtol=0)
    np.testing.assert_allclose(out[2], a[2][2], atol=2e-6, rtol=0)
    assert (out[1] == model.apply(params, tokens, deterministic=True)[1]).all()


def test_mixed_batch_step_equals_the_per_adapter_steps(gpt):
    """One step on rows of slots 0 and 1 == a step on slot 0's rows, then one on slot 1's (Adam, per-slot state)."""
    _, _, tokens = gpt
    adapted, variables = _bank(gpt, LoraConfig(r=2, init_lora_weights="gaussian", **LORA), slots=3)
    variables = _perturbed(variables, 7)
    loss = lambda logits, batch: jnp.sum(logits ** 2) * 1e-3  # sums over rows: each row's gradient is its own
    step = jadapters.make_train_step(adapted, loss, optax.adam(1e-2), model_kwargs={"deterministic": True})
    start = step.init(variables, jax.random.key(0))
    mixed, _ = step(start, {"inputs": tokens, "adapter_ids": jnp.array([0, 1, 0])})
    first, _ = step(start, {"inputs": tokens, "adapter_ids": jnp.array([0, -1, 0])})
    both, _ = step(first, {"inputs": tokens, "adapter_ids": jnp.array([-1, 1, -1])})
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-7, rtol=1e-6),
                           mixed.trainable, both.trainable)
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-7, rtol=1e-6),
                           mixed.opt_state, both.opt_state)
    slot = lambda state, i: jax.tree_util.tree_map(lambda leaf: leaf[:, i], state.trainable)  # (layers, slots, ...)
    # Slot 2 was in no batch: its weights and its optimizer state never moved; slots 0 and 1 did.
    jax.tree_util.tree_map(np.testing.assert_array_equal, slot(mixed, 2), slot(start, 2))
    assert not np.allclose(slot(mixed, 1)["params"]["layers"]["attention"]["query"]["__adapters__"]["tasks"]["slots"]
                           ["lora_a"]["kernel"], slot(start, 1)["params"]["layers"]["attention"]["query"]
                           ["__adapters__"]["tasks"]["slots"]["lora_a"]["kernel"])
    counts = [leaf for leaf in jax.tree_util.tree_leaves(mixed.opt_state) if leaf.dtype == jnp.int32]
    assert counts and all(c.tolist() == [1, 1, 0] for c in counts)
    # The gains are data: not trained, no optimizer state.
    assert "__data__" not in str(jax.tree_util.tree_structure(mixed.trainable))


class _Tiny(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(5, name="out")(nn.relu(nn.Dense(6, name="hidden")(x)))


@pytest.fixture(scope="module")
def tiny():
    x = jax.random.normal(jax.random.key(0), (6, 4))
    params = _Tiny().init(jax.random.key(1), x)
    base = jadapters.with_adapters(_Tiny(), {"layers": ["hidden", "out"]})
    singles = []
    for i, rank in enumerate((1, 3, 2)):
        single = base.add_adapter("a", jadapters.LoRA(rank=rank, alpha=2.0 * (i + 1), init_weights="random"),
                                  targets=["hidden", "out"])
        single_vars = _perturbed(jadapters.init_adapters(single, params, jax.random.key(10 + i), x), i)
        singles.append((single, single_vars, single.apply(single_vars, x)))
    banked = base.add_adapter("tasks", AdapterBank(jadapters.LoRA(rank=3), slots=3), targets=["hidden", "out"])
    variables = jadapters.init_adapters(banked, params, jax.random.key(2), x)
    for slot, (single, single_vars, _) in enumerate(singles):
        variables = hotswap_adapter(banked, variables, "tasks", slot, single, single_vars)
    forward = jax.jit(lambda v, ids: banked.apply(v, x, adapter_ids=ids))
    return forward, variables, singles, _Tiny().apply(params, x)


@settings(max_examples=12, deadline=None)
@given(st.lists(st.integers(-1, 2), min_size=6, max_size=6))
def test_any_assignment_of_rows_to_slots(tiny, ids):
    forward, variables, singles, base = tiny
    out = forward(variables, jnp.array(ids))
    for row, slot in enumerate(ids):
        expected = base[row] if slot < 0 else singles[slot][2][row]
        np.testing.assert_allclose(out[row], expected, atol=2e-6, rtol=0)


def test_bad_ids_and_bad_banks_are_clear_errors(tiny, gpt):
    forward, variables, singles, _ = tiny
    x = jnp.ones((6, 4))
    banked = jadapters.with_adapters(_Tiny(), {"layers": ["hidden", "out"]}).add_adapter(
        "tasks", AdapterBank(jadapters.LoRA(rank=3), slots=3), targets=["hidden", "out"])
    with pytest.raises(AdapterError, match=r"adapter_ids must be in \[-1, 3\).*got \[3\] at rows \[1\]"):
        banked.apply(variables, x, adapter_ids=np.array([0, 3, 0, 0, 0, 0]))
    with pytest.raises(AdapterError, match="adapter_ids has 2 entries but the layer's input has 6 rows"):
        banked.apply(variables, x, adapter_ids=jnp.array([0, 1]))
    with pytest.raises(AdapterError, match="needs adapter_ids="):
        banked.apply(variables, x)
    with pytest.raises(AdapterError, match="no enabled adapter is a bank"):
        banked.set_enabled_adapters(enabled=False).apply(variables, x, adapter_ids=jnp.zeros(6, jnp.int32))
    # Out-of-range ids under jit cannot raise: their rows are NaN, never another adapter's output.
    out = forward(variables, jnp.array([0, 7, 0, 0, 0, 0]))
    assert np.isnan(out[1]).all() and np.isfinite(out[0]).all()
    with pytest.raises(ValueError, match="cannot hold DoRA"):
        AdapterBank(jadapters.LoRA(rank=2, use_dora=True))
    with pytest.raises(ValueError, match="ln_after=True"):
        AdapterBank(jadapters.Bottleneck(ln_after=True))
    model, _, _ = gpt
    with pytest.raises(AdapterError, match="residual_before_ln=True"):
        jadapters.with_adapters(model, zoo.GPT.preset).add_adapter(
            "tasks", AdapterBankConfig(jadapters.SeqBnConfig(residual_before_ln=False)))
    single, single_vars, _ = singles[0]
    with pytest.raises(AdapterError, match="has slots 0..2, got slot 3"):
        hotswap_adapter(banked, variables, "tasks", 3, single, single_vars)
    big = single.clone(adapters=()).add_adapter("a", jadapters.LoRA(rank=5), targets=["hidden", "out"])
    big_vars = jadapters.init_adapters(big, _Tiny().init(jax.random.key(1), x), jax.random.key(3), x)
    with pytest.raises(AdapterError, match=r"does not fit the bank's \(4, 3\)"):
        hotswap_adapter(banked, variables, "tasks", 0, big, big_vars)
    ia3 = single.clone(adapters=()).add_adapter("a", jadapters.IA3(), targets=["hidden"])
    ia3_vars = jadapters.init_adapters(ia3, _Tiny().init(jax.random.key(1), x), jax.random.key(3), x)
    with pytest.raises(AdapterError, match="cannot go into a bank of LoRA"):
        hotswap_adapter(banked, variables, "tasks", 0, ia3, ia3_vars)
    before = jax.tree_util.tree_map(np.array, variables)
    with pytest.raises(AdapterError):
        hotswap_adapter(banked, variables, "tasks", 0, big, big_vars)
    jax.tree_util.tree_map(np.testing.assert_array_equal, variables, before)  # nothing the caller holds changed


def test_a_bank_on_hugging_face_gpt2_fused_qkv():
    """LoRA sized from GPT-2's Conv1D ``c_attn`` (64 -> 192), per row, on a model nobody here wrote."""
    pytest.importorskip("transformers")
    family = next((f for f in zoo.families() if f.name == "hf_gpt2"), None)
    if family is None:
        pytest.skip("transformers without its Flax models")
    model, params = family.built()
    inputs = family.inputs(0)
    plain = jadapters.with_adapters(model, family.preset)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=("qkv",))
    singles = []
    for seed in (1, 2):
        single = plain.add_adapter("a", config)
        single_vars = _perturbed(jadapters.init_adapters(single, params, jax.random.key(seed), *inputs), seed)
        run = jax.jit(lambda v, single=single: zoo.primary_output(single.apply(v, *inputs, deterministic=True)))
        singles.append((single, single_vars, run(single_vars)))
    bank = plain.add_adapter("tasks", AdapterBankConfig(config, slots=2))
    variables = jadapters.init_adapters(bank, params, jax.random.key(3), *inputs)
    for slot, (single, single_vars, _) in enumerate(singles):
        variables = hotswap_adapter(bank, variables, "tasks", slot, single, single_vars)
    out = jax.jit(lambda v: zoo.primary_output(bank.apply(v, *inputs, adapter_ids=IDS, deterministic=True)))(variables)
    base = jax.jit(lambda p: zoo.primary_output(model.apply(p, *inputs, deterministic=True)))(params)
    np.testing.assert_allclose(out[0], singles[1][2][0], atol=2e-6, rtol=0)
    np.testing.assert_allclose(out[2], singles[0][2][2], atol=2e-6, rtol=0)
    assert (out[1] == base[1]).all()
