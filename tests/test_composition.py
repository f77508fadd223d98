"""Composition blocks: parity with AdapterHub 1.3 on the reference fixtures, nesting rules, LoRA, fusion training.

The fixtures hold two ``seq_bn`` adapters a, b on the tiny BERT under each
block (``tests/fixtures/reference/README.md``, "Compositions"); both are loaded
with ``load_adapterhub``, the fusion with ``load_adapterhub_fusion``.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jadapters as ja
from jadapters import Average, BatchSplit, Fuse, FusionConfig, Parallel, Split, Stack
from jadapters.adapterhub_format import bottleneck_leaf
from jadapters.blocks import InResidualBlock, ResidualBlock
from jadapters.errors import AdapterError

# One worker with the AdapterHub format's tests: the tiny BERT loads once.
pytestmark = pytest.mark.xdist_group("adapterhub_format")
TOLERANCE = 1e-5
D = 8


# ----------------------------------------------------------------------------- AdapterHub parity


@functools.cache
def loaded_model():
    """The tiny BERT with AdapterHub's adapters a and b, loaded by ``load_adapterhub`` (the stack case's files)."""
    import reference

    module, base = reference.tiny_bert()
    inputs = reference.bert_inputs()
    folder = reference.case_dir("adapters/stack")
    adapted, variables = ja.load_adapterhub(folder / "adapter_a", module, base, *inputs)
    adapted, variables = ja.load_adapterhub(folder / "adapter_b", adapted, variables, *inputs)
    return adapted, variables, inputs


def with_case_weights(variables, case):
    """``variables`` with the case's saved a and b (torch names -> Flax params; one compile less than loading)."""
    import reference
    from flax import traverse_util

    flat = traverse_util.flatten_dict(variables)
    for name in "ab":
        folder = reference.case_dir(f"adapters/{case}") / f"adapter_{name}"
        for tensor, array in reference.weights(folder / "adapter.safetensors").items():
            module, rest = tensor.split(f".adapters.{name}.")
            leaf, transpose = bottleneck_leaf(rest)
            key = ("params", *module.split("."), "__adapters__", name, *leaf)
            assert key in flat and flat[key].shape == array.T.shape if transpose else array.shape, key
            flat[key] = jnp.asarray(array.T if transpose else array)
    return traverse_util.unflatten_dict(flat)


def loaded(case):
    import reference

    adapted, variables, inputs = loaded_model()
    return adapted, with_case_weights(variables, case), inputs, reference.expected(f"adapters/{case}")


def hidden(adapted, variables, inputs):
    return np.asarray(adapted.apply(variables, *inputs).last_hidden_state)


PARITY = [
    ("stack", Stack("a", "b"), "last_hidden_state"),
    ("parallel", Parallel("a", "b"), "last_hidden_state"),
    ("batch_split", BatchSplit("a", "b", batch_sizes=[2, 1]), "last_hidden_state"),
    ("split", Split("a", "b", splits=[4, 3]), "last_hidden_state"),
    # AdapterHub's own Average output carries an extra 1/N; this key is exactly sum_i w_i h_i.
    ("average", Average("a", "b", weights=[2, 1]), "weighted_sum_last_hidden_state"),
]


@pytest.mark.parametrize("case,setup,key", PARITY, ids=[c for c, _, _ in PARITY])
def test_blocks_match_adapterhub(case, setup, key):
    pytest.importorskip("transformers")
    adapted, variables, inputs, expected = loaded(case)
    out = hidden(adapted.set_active(setup), variables, inputs)
    assert out.shape == expected[key].shape
    np.testing.assert_allclose(out, expected[key], atol=TOLERANCE, rtol=0)
    if case == "parallel":  # each copy equals its adapter alone
        b = expected["single_a_last_hidden_state"].shape[0]
        np.testing.assert_allclose(out[:b], expected["single_a_last_hidden_state"], atol=TOLERANCE, rtol=0)
        np.testing.assert_allclose(out[b:], expected["single_b_last_hidden_state"], atol=TOLERANCE, rtol=0)
    if case == "average":  # not AdapterHub's extra mean
        assert np.abs(out - expected["last_hidden_state"]).max() > 1e-2


def test_fuse_matches_adapterhub_with_attention_scores():
    pytest.importorskip("transformers")
    import reference

    adapted, variables, inputs, expected = loaded("fuse")
    fused, variables = ja.load_adapterhub_fusion(reference.case_dir("adapters/fuse") / "fusion", adapted, variables,
                                                 *inputs)
    assert fused.active_setup == Fuse("a", "b") and fused.active_setup.name == "a,b"
    out, state = jax.jit(lambda v: fused.apply(v, *inputs, mutable=["intermediates"]))(variables)
    np.testing.assert_allclose(np.asarray(out.last_hidden_state), expected["last_hidden_state"], atol=TOLERANCE,
                               rtol=0)
    layers = state["intermediates"]["encoder"]["layer"]
    for i in ("0", "1"):
        (scores,) = layers[i]["output"]["__adapters__"]["a,b"]["attention_scores"]
        assert scores.shape == (3, 7, 2)
        np.testing.assert_allclose(np.asarray(scores), expected[f"fusion_attentions/a,b/{i}/output_adapter"],
                                   atol=TOLERANCE, rtol=0)


def test_batch_and_sequence_sizes_are_checked_at_call_time():
    pytest.importorskip("transformers")
    adapted, variables, inputs, _ = loaded("batch_split")
    with pytest.raises(AdapterError, match=r"BatchSplit\('a', 'b', batch_sizes=\(2, 2\)\): its batch_sizes \[2, 2\] "
                                           r"sum to 4, but the batch is 3 \(hidden states of shape \(3, 7, 32\)\)"):
        adapted.set_active(BatchSplit("a", "b", batch_sizes=2)).apply(variables, *inputs)
    with pytest.raises(AdapterError, match=r"Split\('a', 'b', splits=\(4, 4\)\): its splits \[4, 4\] sum to 8, "
                                           r"but the sequence length is 7"):
        adapted.set_active(Split("a", "b", splits=4)).apply(variables, *inputs)


# ----------------------------------------------------------------------------- blocks and their rules


@pytest.mark.parametrize("make,message", [
    (lambda: Parallel("a", Parallel("b", "c")), r"cannot nest Parallel\('b', 'c'\) in Parallel: it holds adapter "
                                                r"names, Stack, BatchSplit, Average"),
    (lambda: Stack("a", Stack("b")), r"cannot nest Stack\('b'\) in Stack"),
    (lambda: Fuse("a", Average("b", "c")), r"cannot nest Average\('b', 'c'\) in Fuse: it holds adapter names, Stack"),
    (lambda: Average("a", Fuse("b", "c")), r"cannot nest Fuse.* in Average"),
    (lambda: Split("a", Parallel("b", "c"), splits=2), r"cannot nest Parallel.* in Split"),
    (lambda: BatchSplit("a", Fuse("b", "c"), batch_sizes=1), r"cannot nest Fuse.* in BatchSplit"),
    (lambda: Stack("a", BatchSplit("b", Average("c", "d"), batch_sizes=1)),
     r"adapter setup too deep: Average\('c', 'd'\) sits at level 2, where only Stack or adapter names may"),
    (lambda: BatchSplit("a", "b", batch_sizes=[1]), r"BatchSplit: batch_sizes must be 2 ints >= 0"),
    (lambda: Split("a", "b", splits=[1, -1]), r"Split: splits must be 2 ints >= 0"),
    (lambda: Average("a", "b", weights=[1, -1]), r"sum to 0 and cannot be normalised"),
    (lambda: Stack(), r"Stack needs at least one adapter name or block"),
    (lambda: Stack("a", 3), r"children are adapter names or blocks, got 3"),
    (lambda: Fuse("a", "b", config="wild"), r"unknown fusion config 'wild'"),
    (lambda: FusionConfig(temperature=True), r"temperature=True .* is not supported"),
])
def test_nesting_and_argument_errors(make, message):
    with pytest.raises(AdapterError, match=message):
        make()


def test_allowed_nestings_and_hashing():
    setup = Stack("a", Fuse("b", Stack("c", "d")), Split("e", "f", splits=[1, 1]))
    assert setup.names() == set("abcdef") and setup.fusions()[0].name == "b,d"
    assert hash(setup) == hash(Stack("a", Fuse("b", Stack("c", "d")), Split("e", "f", splits=[1, 1])))
    assert BatchSplit(Split("a", Stack("b", "c"), splits=1), "d", batch_sizes=1).names() == set("abcd")
    assert Average("a", "b") != Average("a", "b", weights=[2, 1])
    assert Stack("a", Parallel("b", "c")).parallel_channels == Parallel("b", Average("c", "d")).parallel_channels == 2
    assert ja.composition.setup_from_json(setup.to_json()) == setup
    average = Average("a", "b", weights=[1, 3], normalize_weights=False)
    assert average.effective_weights == (1.0, 3.0) and ja.composition.setup_from_json(average.to_json()) == average
    fuse = Fuse("a", "b", config="static", name="ab")
    assert ja.composition.setup_from_json(fuse.to_json()) == fuse and fuse.config.value is False


# ----------------------------------------------------------------------------- a tiny model: bottleneck and LoRA


class AddNorm(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(D, name="ffn")(x)
        return nn.LayerNorm(name="ln")(nn.Dropout(0.0, deterministic=True, name="drop")(h) + x)


class Tiny(nn.Module):
    @nn.compact
    def __call__(self, x):
        return AddNorm(name="block")(nn.Dense(D, name="q")(x))


SITE = ResidualBlock("block", hidden="drop", layer_norm="ln", residual=0)
SEQ = InResidualBlock((("ffn", SITE),), original_ln_before=True)


def perturbed(tree, seed):
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noisy = [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    return jax.tree_util.tree_unflatten(treedef, noisy)


@functools.cache
def tiny(kind):
    """``(adapted, variables, x)``: Tiny with bottlenecks a, b, c ('bn') or LoRAs a, b on ``q`` ('lora'), non-zero."""
    x = jax.random.normal(jax.random.key(0), (4, 5, D))
    adapted = ja.with_adapters(Tiny())
    if kind == "bn":
        for name in "abc":
            adapted = adapted.add_adapter(name, ja.Bottleneck(reduction_factor=2), strategy=SEQ, targets="block")
    else:
        for name, rank in (("a", 2), ("b", 3)):
            adapted = adapted.add_adapter(name, ja.LoRA(rank=rank, alpha=2.0 * rank), targets="q")
    setup = Fuse("a", "b") if kind == "bn" else None
    base = Tiny().init(jax.random.key(1), x)
    variables = ja.init_adapters(adapted.set_active(setup), base, jax.random.key(2), x)
    adapters, rest = ja.split_adapters(variables)
    return adapted, ja.merge_trees(rest, perturbed(adapters, 3)), x


def out(adapted, variables, x, setup):
    return outs(adapted, variables, x, [setup])[0]


def outs(adapted, variables, x, setups):
    """The outputs under each setup, from one compile."""
    return [np.asarray(o) for o in jax.jit(lambda v: [adapted.set_active(s).apply(v, x) for s in setups])(variables)]





class FakeCall:
    """An adapter for the composers alone (no Flax): ``x @ w`` (LoRA) or ``tanh(x @ w) + residual`` (bottleneck)."""

    def __init__(self, w, bottleneck):
        self.w, self.bottleneck = w, bottleneck

    def accepts(self, argument):
        return False

    def __call__(self, x, residual=None):
        if not self.bottleneck:
            return x @ self.w
        return jnp.tanh(x @ self.w) + (0.0 if residual is None else residual)


def composed(kind, setup, hidden, x):
    """What ``setup`` makes of ``hidden`` (the layer's output) and ``x`` (its input) with fake adapters a, b, c."""
    from jadapters.context import AdapterContext

    ctx = AdapterContext("a", "layer", False, (x,), {})
    ws = {n: jax.random.normal(jax.random.key(i), (D, D)) / 3 for i, n in enumerate("abc")}
    if kind == "bn":
        spec = lambda n: ja.AdapterSpec(n, (), (), ja.Bottleneck(), SEQ)
        members = {n: ja.composition.Member(spec(n), FakeCall(w, True), ctx) for n, w in ws.items()}
        composer = ja.composition.BottleneckComposer(members, ctx, "ffn", lambda v: 2.0 * v, False)
        state = composer.compose(ja.composition.as_setup(setup), ja.composition._Bottleneck(hidden, x, x))
        return np.asarray(composer.finish(state, hidden))
    members = {n: ja.composition.Member(None, FakeCall(w, False), ctx) for n, w in ws.items()}
    composer = ja.composition.LoraComposer(members, ctx, None)
    state = composer.compose(ja.composition.as_setup(setup), ja.composition._Lora(x, None, hidden))
    return np.asarray(hidden + state.delta)


@settings(max_examples=6, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=1, max_size=3), st.sampled_from(["bn", "lora"]), st.integers(0, 2**16))
def test_block_rows_equal_the_single_adapters(sizes, kind, seed):
    batch = sum(sizes)
    names = "abc"[: len(sizes)]
    hidden, x = jax.random.normal(jax.random.key(seed), (2, max(batch, 1), 3, D))
    if batch:
        got = composed(kind, BatchSplit(*names, batch_sizes=sizes), hidden[:batch], x[:batch])
        bounds = np.cumsum([0] + sizes)
        for name, lo, hi in zip(names, bounds[:-1], bounds[1:]):
            np.testing.assert_allclose(got[lo:hi], composed(kind, name, hidden, x)[lo:hi], atol=1e-5, rtol=0)
    n, rows = len(names), hidden.shape[0]
    got = composed(kind, Parallel(*names), jnp.concatenate([hidden] * n), jnp.concatenate([x] * n))
    for i, name in enumerate(names):
        np.testing.assert_allclose(got[rows * i: rows * (i + 1)], composed(kind, name, hidden, x), atol=1e-5, rtol=0)
    weights = [s + 1.0 for s in sizes]
    got = composed(kind, Average(*names, weights=weights, normalize_weights=False), hidden, x)
    singles = [composed(kind, name, hidden, x) for name in names]
    if kind == "lora":  # the deltas are averaged, added to the output once
        expected = hidden + sum(w * (s - hidden) for w, s in zip(weights, singles))
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    one = composed(kind, Average("a", weights=[weights[0]]), hidden, x)
    np.testing.assert_allclose(one, composed(kind, "a", hidden, x), atol=1e-5, rtol=0)


def test_bottleneck_blocks_by_hand():
    adapted, variables, x = tiny("bn")
    params = variables["params"]
    q = x @ params["q"]["kernel"] + params["q"]["bias"]
    h = q @ params["block"]["ffn"]["kernel"] + params["block"]["ffn"]["bias"]
    ln = lambda v: nn.LayerNorm().apply({"params": params["block"]["ln"]}, v)

    def bn(name, v):
        p = params["block"]["__adapters__"][name]
        down = jax.nn.relu(v @ p["adapter_down"]["kernel"] + p["adapter_down"]["bias"])
        return down @ p["adapter_up"]["kernel"] + p["adapter_up"]["bias"]

    inp = ln(h + q)
    out_a = bn("a", inp) + h
    expected = {
        Stack("a", "b"): ln(bn("b", ln(out_a + q)) + out_a + q),
        Average("a", "b", weights=[1, 3]): ln(0.25 * (bn("a", inp) + h) + 0.75 * (bn("b", inp) + h) + q),
        Average("a", "b", weights=[2, 1], normalize_weights=False): ln(2 * (bn("a", inp) + h) + (bn("b", inp) + h) + q),
        Split("a", "b", splits=[2, 3]): ln(jnp.concatenate([bn("a", inp[:, :2]), bn("b", inp[:, 2:])], axis=1) + h + q),
        "a": ln(bn("a", inp) + h + q),  # only the setup's adapters run (b and c are enabled too)
    }
    for setup, got in zip(expected, outs(adapted, variables, x, list(expected))):
        np.testing.assert_allclose(got, expected[setup], atol=1e-5, rtol=0, err_msg=repr(setup))


def test_lora_blocks_by_hand():
    adapted, variables, x = tiny("lora")
    params = variables["params"]
    y = x @ params["q"]["kernel"] + params["q"]["bias"]

    def delta(name, v):  # alpha / rank = 2 for both
        p = params["q"]["__adapters__"][name]
        return (v @ p["lora_a"]["kernel"] @ p["lora_b"]["kernel"]) * 2.0

    assert sorted(params["q"]["__adapters__"]["a"]) == ["lora_a", "lora_b"]
    d_a, d_b = delta("a", x), delta("b", x)
    rest = lambda q: AddNorm().apply({"params": params["block"]}, q)
    stack, average = outs(adapted, variables, x, [Stack("a", "b"), Average("a", "b", weights=[3, 1])])
    # Stack: b reads a's delta (AdapterHub's LoRA), added once to the layer's output.
    np.testing.assert_allclose(stack, rest(y + delta("b", d_a)), atol=1e-5, rtol=0)
    np.testing.assert_allclose(average, rest(y + 0.75 * d_a + 0.25 * d_b), atol=1e-5, rtol=0)
    with pytest.raises(AdapterError, match=r"Split is not defined for adapters joined by ParallelAdd \(LoRA\)"):
        out(adapted, variables, x, Split("a", "b", splits=[2, 3]))
    with pytest.raises(AdapterError, match=r"Fuse is not defined for adapters joined by ParallelAdd"):
        out(adapted, variables, x, Fuse("a", "b"))


def test_set_active_errors_and_disabled_adapters():
    adapted, variables, x = tiny("bn")
    with pytest.raises(AdapterError, match=r"names adapters \['z'\] that the model does not have"):
        adapted.set_active(Stack("a", "z"))
    with pytest.raises(AdapterError, match=r"adapters \['a'\] are in the active setup Stack\('a', 'b'\); change it"):
        adapted.set_active(Stack("a", "b")).remove_adapter("a")
    assert adapted.set_active("a").remove_adapter("c").adapter_names() == ["a", "b"]
    assert adapted.set_active("a").active_setup == Stack("a")
    assert adapted.set_active(None).active_setup is None
    off = adapted.set_enabled_adapters("b", enabled=False).set_active(Stack("a", "b"))
    with pytest.raises(AdapterError, match=r"adapters \['b'\] at 'block' are in the active setup .* but disabled"):
        off.apply(variables, x)


def test_fusion_trains_alone_with_its_regularization_loss():
    adapted, variables, x = tiny("bn")
    fused = adapted.set_active(Fuse("a", "b"))
    fusion = variables["params"]["block"]["__adapters__"]["a,b"]
    assert sorted(fusion) == ["key", "query", "value"]
    _, losses = fused.clone(training=True).apply(variables, x, mutable=["adapter_losses"])
    kernel = fusion["value"]["kernel"]
    expected = 0.01 * np.sum((np.eye(D) - np.asarray(kernel)) ** 2)
    np.testing.assert_allclose(float(ja.sum_adapter_losses(losses)), expected, rtol=1e-5)
    step = ja.make_train_step(fused, lambda o, batch: jnp.mean(o[..., 0]), optax.sgd(1.0), which=["a,b"])
    state = step.init(variables, jax.random.key(0))
    assert list(state.trainable["params"]["block"]["__adapters__"]) == ["a,b"]
    state, metrics = step(state, (x,))
    assert float(metrics["aux_loss"]) > 0
    after = state.variables["params"]["block"]["__adapters__"]
    assert not np.allclose(after["a,b"]["query"]["kernel"], fusion["query"]["kernel"])
    for name in "ab":
        jax.tree_util.tree_map(np.testing.assert_array_equal, after[name],
                               variables["params"]["block"]["__adapters__"][name])
    assert "a,b" in ja.training.selected_adapters(fused)  # the enabled default trains the fusion too
    with pytest.raises(AdapterError, match=r"which names \['z'\], which are neither adapters"):
        ja.make_train_step(fused, lambda o, b: jnp.mean(o), optax.sgd(0.1), which=["z"])


def test_static_fusion_has_no_value_matrix():
    adapted, variables, x = tiny("bn")
    fused = adapted.set_active(Fuse("a", "c", config="static"))
    created = ja.init_adapters(fused, variables, jax.random.key(0), x)
    assert sorted(created["params"]["block"]["__adapters__"]["a,c"]) == ["key", "query"]
    _, state = fused.apply(created, x, mutable=["intermediates"])
    (scores,) = state["intermediates"]["block"]["__adapters__"]["a,c"]["attention_scores"]
    assert scores.shape == (4, 5, 2)
    np.testing.assert_allclose(np.asarray(scores).sum(-1), 1.0, atol=1e-6)


def test_checkpoints_keep_the_setup_and_the_fusion(tmp_path):
    adapted, variables, x = tiny("bn")
    fused = adapted.set_active(Stack("c", Fuse("a", "b")))
    expected = fused.apply(variables, x)
    base = Tiny().init(jax.random.key(1), x)
    path = ja.save_adapters(tmp_path / "adapters", fused, variables)
    restored, restored_variables = ja.load_adapters(path, Tiny(), base)
    assert restored.active_setup == fused.active_setup
    np.testing.assert_array_equal(restored.apply(restored_variables, x), expected)
    restored, restored_variables = ja.load_model(ja.save_model(tmp_path / "model", fused, variables), Tiny())
    assert restored.active_setup == fused.active_setup
    np.testing.assert_array_equal(restored.apply(restored_variables, x), expected)
    # Saving some adapters keeps the setup only if it names no other.
    ja.save_adapters(tmp_path / "c", fused, variables, "c")
    only_c, _ = ja.load_adapters(tmp_path / "c", Tiny(), base)
    assert only_c.active_setup is None
    # Older checkpoints have no setup in their metadata.
    meta = ja.checkpoint.format.Metadata(kind="adapters", library_version="0").to_json()
    del meta["active_setup"]
    assert ja.checkpoint.format.Metadata.from_json(meta, "old").active_setup is None


# ----------------------------------------------------------------------------- a scanned GPT-style model


def test_stack_and_parallel_on_the_scanned_gpt_family():
    from architectures.zoo import GPT, base_variables

    model, _ = GPT.built()
    base = base_variables(GPT)
    (ids,) = GPT.inputs(0)
    adapted = ja.with_adapters(model, GPT.preset)
    for name in "ab":
        adapted = adapted.add_adapter(name, "seq_bn[reduction_factor=4]")
    variables = ja.init_adapters(adapted, base, jax.random.key(0), ids)
    adapters, rest = ja.split_adapters(variables)
    variables = ja.merge_trees(rest, perturbed(adapters, 1))
    b = ids.shape[0]
    run = lambda setup, ids: adapted.set_active(setup).apply(variables, ids, **GPT.eval_kwargs)
    # The batch replicated at the entry, then split in every scanned layer; one copy through a Stack.
    parallel, split = map(np.asarray, jax.jit(lambda ids: (
        run(Parallel(Stack("a", "b"), "a"), ids),
        run(BatchSplit(Stack("a", "b"), "a", batch_sizes=b), jnp.concatenate([ids, ids]))))(ids))
    assert parallel.shape[0] == 2 * b
    np.testing.assert_allclose(parallel, split, atol=1e-5, rtol=0)
    assert np.abs(parallel[:b] - parallel[b:]).max() > 1e-4
    # With no setup, two enabled bottlenecks in one residual block run as a Stack (both of them),
    # as AdapterHub runs a list of active adapters; never only the first.
    chained, stacked, alone = (np.asarray(adapted.set_active(setup).apply(variables, ids, **GPT.eval_kwargs))
                               for setup in (None, Stack("a", "b"), "a"))
    np.testing.assert_array_equal(chained, stacked)
    assert np.abs(chained - alone).max() > 1e-4
