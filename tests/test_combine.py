"""Weighted combinations of adapters (``jadapters.combination``): parity with PEFT's
``add_weighted_adapter`` and AdapterHub's ``average_adapter`` on their saved results
(``fixtures/reference/combine``, made by ``make_combine_reference.py``), laws, and errors.

The sources load with ``load_peft`` / ``load_adapterhub``; the combined adapter's update
``scaling * B A`` (per layer, torch layout) and the model's output are compared with the
library's within 1e-5. SVD factors are unique only up to signs: their product is compared.
"""

from __future__ import annotations

import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("transformers")
import reference  # noqa: E402

import jadapters as ja  # noqa: E402
from jadapters.combination import dare_keys  # noqa: E402

pytestmark = pytest.mark.xdist_group("combine")
TOLERANCE = 1e-5
FIXTURES = reference.FIXTURES / "combine"
CASES = json.loads((FIXTURES / "cases.json").read_text())
PREFIX = "base_model.model."


# ---------------------------------------------------------------------------------- helpers


def peft_deltas(folder):
    """PEFT's saved adapter -> {Flax path: scaling * B A} in torch's (out, in) layout."""
    config = json.loads((folder / "adapter_config.json").read_text())
    r, alpha = config["r"], config["lora_alpha"]
    scaling = alpha / math.sqrt(r) if config["use_rslora"] else alpha / r
    tensors = reference.weights(folder / "adapter_model.safetensors")
    deltas = {}
    for key, a in tensors.items():
        for a_name, b_name in (("lora_A.weight", "lora_B.weight"), ("lora_embedding_A", "lora_embedding_B")):
            if key.endswith("." + a_name):
                module = key[len(PREFIX): -len(a_name) - 1]
                b = tensors[key[: -len(a_name)] + b_name]
                assert a.shape[0] == b.shape[1] <= r  # PEFT keeps a smaller rank where a rank_pattern gave one
                deltas[module.replace(".", "/")] = scaling * (b.astype(np.float64) @ a.astype(np.float64))
    return deltas


def jadapters_deltas(adapted, variables, name):
    """The adapter's {path: scaling * (A B)^T} (torch's layout), from its params."""
    lora = adapted.get_adapter(name).adapter
    out = {}
    for path in ja.tree.adapter_locations(variables)[name]:
        node = variables["params"]
        for key in path.split("/") if path else []:
            node = node[key]
        p = node["__adapters__"][name]
        if "lora_embedding_a" in p:
            a, b = p["lora_embedding_a"], p["lora_embedding_b"]
        else:
            a, b = p["lora_a"]["kernel"], p["lora_b"]["kernel"]
        assert a.shape[-1] == b.shape[-2] == lora.rank
        scaling = lora.scaling_for(*lora.rank_and_alpha(path))
        out[path] = scaling * np.asarray(a, np.float64) @ np.asarray(b, np.float64)
        out[path] = np.swapaxes(out[path], -1, -2)
    return out


def np_prune(t, density):
    """PEFT's magnitude_based_pruning in numpy: keep the int(density * size) largest |entries|."""
    flat = np.abs(t).ravel()
    mask = np.zeros(flat.size)
    mask[np.argsort(-flat, kind="stable")[: int(density * flat.size)]] = 1
    return t * mask.reshape(t.shape)


def np_ties(tensors, weights, density, method="total"):
    """PEFT's ties in numpy: prune, elect the sign from the unweighted tensors, disjoint mean."""
    stacked = np.stack([np_prune(t, density) for t in tensors])
    sign = np.sign(stacked)
    elected = np.where((stacked.sum(0) if method == "total" else sign.sum(0)) >= 0, 1, -1)
    mask = sign == elected
    weighted = stacked * np.asarray(weights).reshape((-1,) + (1,) * (stacked.ndim - 1))
    return (weighted * mask).sum(0) / np.maximum(mask.sum(0), 1)


def max_diff(a, b):
    assert sorted(a) == sorted(b)
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def only(adapted, name):
    return adapted.set_enabled_adapters(enabled=False).set_enabled_adapters(name)


@pytest.fixture(scope="module")
def peft_sources():
    module, params = reference.tiny_bert()
    inputs = reference.bert_inputs()
    adapted, variables = module, params
    for name in CASES["peft_sources"]:
        adapted, variables = ja.load_peft(FIXTURES / "peft_sources" / name, adapted, variables, *inputs,
                                          adapter_name=name)
    return adapted, variables, inputs


@pytest.fixture(scope="module")
def forward():
    # eager: the op-by-op caches serve every case (a jit would compile the model once per adapter set)
    return lambda adapted, variables, inputs: adapted.apply(variables, *inputs)[0]


# ---------------------------------------------------------------------------------- PEFT parity

# The updates above decide the outputs; a few cases check the wiring end to end (rsLoRA's scaling,
# padded and stacked ranks, an embedding).
OUTPUT_CASES = {"linear_rslora_first", "cat", "svd"}


@pytest.mark.parametrize("case", sorted(CASES["peft"]))
def test_peft_parity(case, peft_sources, forward):
    adapted, variables, inputs = peft_sources
    info = CASES["peft"][case]
    new, new_vars = ja.add_weighted_adapter(adapted, variables, adapter_name=case, **info["args"])
    lora = new.get_adapter(case).adapter
    assert (lora.rank, lora.alpha, lora.use_rslora) == (info["r"], info["lora_alpha"], info["use_rslora"])
    expected = peft_deltas(FIXTURES / "peft" / case)
    mine = jadapters_deltas(new, new_vars, case)
    if "svd_clamp" in info["args"]:
        # The clamp threshold is a quantile of the SIGNED factor entries (PEFT's rule), so it depends on the
        # SVD's sign convention: LAPACK's in JAX and torch agree on the linear layers here, not on the
        # embedding (a 32 x 99 update), where the clamped products differ.
        mine.pop("embeddings/word_embeddings"), expected.pop("embeddings/word_embeddings")
    # float32 SVDs (torch's, JAX's) agree to ~5e-6 relative: the embedding's update reaches 3.
    scale = max(1.0, max(float(np.abs(d).max()) for d in expected.values())) if "svd" in case else 1.0
    assert max_diff(mine, expected) < TOLERANCE * scale
    if case in OUTPUT_CASES:
        out = forward(only(new, case), new_vars, inputs)
        with np.load(FIXTURES / "peft" / case / "expected.npz") as data:
            assert np.abs(np.asarray(out) - data["last_hidden_state"]).max() < TOLERANCE


def test_peft_sources_parity(peft_sources, forward):
    """The loaded sources compute PEFT's outputs: the parity above starts from the same adapters."""
    adapted, variables, inputs = peft_sources
    with np.load(FIXTURES / "peft_sources" / "expected.npz") as data:
        assert np.abs(np.asarray(forward(only(adapted, "c"), variables, inputs)) - data["c"]).max() < TOLERANCE


def test_combined_adapter_saves_loads_and_merges(peft_sources, forward, tmp_path):
    adapted, variables, inputs = peft_sources
    before = jax.tree_util.tree_map(lambda x: x, variables)
    new, new_vars = ja.add_weighted_adapter(adapted, variables, ["a", "c"], [0.6, -0.5], "mix", "cat")
    # the sources and the caller's variables are untouched
    assert "mix" not in ja.tree.adapter_locations(variables)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda x, y: x is y, variables, before))
    rest, _ = ja.split_adapters(new_vars, ["a", "b", "c", "d"])
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda x, y: x is y, rest, ja.split_adapters(variables)[0]))
    mixed = only(new, "mix")
    out = forward(mixed, new_vars, inputs)
    path = ja.save_adapters(tmp_path / "mix", new, new_vars, name="mix")
    module, params = reference.tiny_bert()
    loaded, loaded_vars = ja.load_adapters(path, module, params)
    assert loaded.adapter_names() == ["mix"]
    saved, _ = ja.split_adapters(new_vars, ["mix"])
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, ja.split_adapters(loaded_vars)[0], saved))
    base, merged = ja.merge_adapters(loaded, loaded_vars, *inputs)
    assert np.abs(np.asarray(base.apply(merged, *inputs)[0]) - np.asarray(out)).max() < TOLERANCE


# ---------------------------------------------------------------------------------- AdapterHub parity


@pytest.fixture(scope="module")
def adapterhub_sources():
    module, params = reference.tiny_bert()
    inputs = reference.bert_inputs()
    adapted, variables = module, params
    for name in ("x", "y", "p", "q"):
        adapted, variables = ja.load_adapterhub(FIXTURES / "adapterhub_sources" / name, adapted, variables, *inputs)
    return adapted, variables, inputs


@pytest.mark.parametrize("case", sorted(CASES["adapterhub"]))
def test_adapterhub_parity(case, adapterhub_sources, forward):
    adapted, variables, inputs = adapterhub_sources
    new, new_vars = ja.average_adapter(adapted, variables, case, **CASES["adapterhub"][case]["args"])
    out = forward(only(new, case), new_vars, inputs)
    with np.load(FIXTURES / "adapterhub" / case / "expected.npz") as data:
        assert np.abs(np.asarray(out) - data["last_hidden_state"]).max() < TOLERANCE
    if case.startswith("lora"):  # the averaged tensors too (B A for the SVD: signs are not unique)
        tensors = reference.weights(FIXTURES / "adapterhub" / case / "adapter" / "adapter.safetensors")
        lora = new.get_adapter(case).adapter
        assert lora.rank == (3 if "svd" in case else 4)
        mine = jadapters_deltas(new, new_vars, case)
        for key, a in tensors.items():
            if key.endswith(".lora_A"):
                b = tensors[key[: -len("lora_A")] + "lora_B"]
                path = key.split(".loras.")[0].replace(".", "/")
                assert np.abs(mine[path] - lora.alpha / lora.rank * (b @ a)).max() < TOLERANCE


# ---------------------------------------------------------------------------------- laws (any shapes)


def dense_model(n_in, n_out, ranks, alphas, rslora=False, seed=0):
    """A Dense layer with LoRAs a0, a1, ... and hand-made (non-zero) variables: no tracing needed."""
    adapted = ja.with_adapters(nn.Dense(n_out), {"dense": ""})
    rng = np.random.default_rng(seed)
    adapters = {}
    for i, (r, alpha) in enumerate(zip(ranks, alphas)):
        adapted = adapted.add_adapter(f"a{i}", ja.LoRA(rank=r, alpha=alpha, use_rslora=rslora))
        adapters[f"a{i}"] = {"lora_a": {"kernel": jnp.asarray(rng.normal(size=(n_in, r)), jnp.float32)},
                             "lora_b": {"kernel": jnp.asarray(rng.normal(size=(r, n_out)), jnp.float32)}}
    params = {"kernel": jnp.asarray(rng.normal(size=(n_in, n_out)), jnp.float32), "bias": jnp.zeros(n_out),
              "__adapters__": adapters}
    return adapted, {"params": params}


def delta(adapted, variables, name):
    return jadapters_deltas(adapted, variables, name)[""]


@settings(max_examples=10, deadline=None)
@given(n_in=st.integers(1, 6), n_out=st.integers(1, 6), ranks=st.lists(st.integers(1, 4), min_size=1, max_size=3),
       weights=st.lists(st.floats(-2, 2, allow_nan=False), min_size=3, max_size=3), rslora=st.booleans())
def test_laws_for_all_shapes(n_in, n_out, ranks, weights, rslora):
    alphas = [2.0 * (i + 1) for i in range(len(ranks))]
    adapted, v = dense_model(n_in, n_out, ranks, alphas, rslora)
    names, weights = [f"a{i}" for i in range(len(ranks))], weights[: len(ranks)]
    sources = [delta(adapted, v, n) for n in names]
    want = sum(w * d for w, d in zip(weights, sources))
    # PEFT gives the new adapter r = alpha and the first source's rsLoRA flag: scaling 1, or sqrt(r)
    rs = lambda rank: math.sqrt(rank) if rslora else 1.0
    # cat is exact: delta = sum_i w_i delta_i (times rsLoRA's factor), rank = sum of ranks
    new, nv = ja.add_weighted_adapter(adapted, v, names, weights, "cat", "cat")
    assert new.get_adapter("cat").adapter.rank == sum(ranks)
    np.testing.assert_allclose(delta(new, nv, "cat"), rs(sum(ranks)) * want, atol=1e-4, rtol=1e-5)
    # svd at full rank is exact too (for rank <= min(in, out))
    if sum(ranks) <= min(n_in, n_out) and len(ranks) > 1:
        new, nv = ja.add_weighted_adapter(adapted, v, names, weights, "svd", "svd", svd_rank=sum(ranks))
        np.testing.assert_allclose(delta(new, nv, "svd"), rs(sum(ranks)) * want, atol=1e-4, rtol=1e-5)
    # linear of one adapter with weight 1 is that adapter
    new, nv = ja.add_weighted_adapter(adapted, v, ["a0"], [1.0], "one", "linear")
    np.testing.assert_allclose(delta(new, nv, "one"), rs(ranks[0]) * sources[0], atol=1e-5, rtol=1e-5)


def test_ties_and_magnitude_prune_rank_each_layer_of_a_scan():
    """Inside nn.scan, A and B are stacked on a layer axis: pruning ranks each layer on its own."""
    layers, n, r = 3, 5, 2
    rng = np.random.default_rng(1)
    adapted = ja.with_adapters(nn.Dense(n), {"dense": ""})
    adapters = {}
    for name in ("a", "b"):
        adapted = adapted.add_adapter(name, ja.LoRA(rank=r, alpha=4.0))
        # one layer much larger than the others: a global top-k would keep only its entries
        scale = np.array([100.0, 1.0, 0.01])[:, None, None]
        adapters[name] = {"lora_a": {"kernel": jnp.asarray(scale * rng.normal(size=(layers, n, r)), jnp.float32)},
                          "lora_b": {"kernel": jnp.asarray(scale * rng.normal(size=(layers, r, n)), jnp.float32)}}
    v = {"params": {"kernel": jnp.zeros((layers, n, n)), "__adapters__": adapters}}
    weights = [0.7, -0.4]
    root = [math.sqrt(abs(w * 2.0)) * np.sign(w) for w in weights]
    for kind in ("ties", "magnitude_prune"):
        new, nv = ja.add_weighted_adapter(adapted, v, ["a", "b"], weights, "t", kind, density=0.5)
        got = np.asarray(nv["params"]["__adapters__"]["t"]["lora_a"]["kernel"])
        for layer in range(layers):
            tensors = [np.asarray(adapters[s]["lora_a"]["kernel"][layer], np.float64) for s in ("a", "b")]
            if kind == "ties":
                want = np_ties(tensors, root, 0.5)
            else:
                want = sum(w * np_prune(t, 0.5) for w, t in zip(root, tensors))
            np.testing.assert_allclose(got[layer], want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
            assert (got[layer] != 0).sum() >= 5  # int(0.5 * 10) kept per source, per layer
    new, nv = ja.add_weighted_adapter(adapted, v, ["a", "b"], weights, "s", "svd", svd_rank=2)
    d = delta(new, nv, "s")
    for layer in range(layers):
        exact = sum(w * 2.0 * adapters[s]["lora_a"]["kernel"][layer] @ adapters[s]["lora_b"]["kernel"][layer]
                    for w, s in zip(weights, ("a", "b")))
        u, sv, vh = np.linalg.svd(np.asarray(exact, np.float64).T)
        np.testing.assert_allclose(d[layer], (u[:, :2] * sv[:2]) @ vh[:2], rtol=1e-4, atol=1e-4 * sv[0])


def test_scan_model_combination_runs_and_merges():
    class Block(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            return x + nn.Dense(x.shape[-1], name="fc")(x), None

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)(name="blocks")(
                x, None)[0]

    x = jax.random.normal(jax.random.key(0), (2, 4))
    base = Model()
    params = base.init(jax.random.key(1), x)
    adapted = ja.with_adapters(base, {"fc": "**/fc"})
    for name, r in (("a", 2), ("b", 3)):
        adapted = adapted.add_adapter(f"fc:{name}", ja.LoRA(rank=r, init_weights="random"))
    v = ja.init_adapters(adapted, params, jax.random.key(2), x)
    new, nv = ja.add_weighted_adapter(adapted, v, ["a", "b"], [0.5, -1.5], "ab", "cat")
    assert nv["params"]["blocks"]["fc"]["__adapters__"]["ab"]["lora_a"]["kernel"].shape == (3, 4, 5)
    y = only(new, "ab").apply(nv, x)
    model, merged = ja.merge_adapters(only(new, "ab"), nv, x, name="ab")
    np.testing.assert_allclose(model.apply(merged, x), y, atol=1e-5)
    # cat's output equals the sources' weighted deltas at each layer
    da, db, dab = delta_stack(nv, "a", 8.0 / 2), delta_stack(nv, "b", 8.0 / 3), delta_stack(nv, "ab", 1.0)
    np.testing.assert_allclose(dab, 0.5 * da - 1.5 * db, atol=1e-5)


def delta_stack(v, name, scaling):
    p = v["params"]["blocks"]["fc"]["__adapters__"][name]
    return scaling * np.asarray(p["lora_a"]["kernel"] @ p["lora_b"]["kernel"])


def test_dare_masks_follow_the_density_and_the_documented_keys():
    adapted, v = dense_model(40, 30, [4, 4], [4.0, 4.0])
    weights = [0.8, -0.5]
    new, nv = ja.add_weighted_adapter(adapted, v, ["a0", "a1"], weights, "d", "dare_linear", density=0.3, seed=7)
    got = nv["params"]["__adapters__"]["d"]
    srcs = [v["params"]["__adapters__"][n] for n in ("a0", "a1")]
    root = [math.sqrt(abs(w)) for w in weights]
    for factor, leaf, w in ((0, "lora_a", [r * np.sign(x) for r, x in zip(root, weights)]), (1, "lora_b", root)):
        masks = [np.asarray(jax.random.bernoulli(dare_keys(7, 0, i, factor), 0.3, srcs[i][leaf]["kernel"].shape))
                 for i in (0, 1)]
        want = sum(wi * m * np.asarray(s[leaf]["kernel"]) / 0.3 for wi, m, s in zip(w, masks, srcs))
        np.testing.assert_allclose(got[leaf]["kernel"], want, rtol=1e-5, atol=1e-6)
        kept = np.mean([m.mean() for m in masks])
        assert abs(kept - 0.3) < 0.05  # 160 or 120 entries per mask
    # another seed, other masks; density 1 prunes nothing (dare_linear == linear, as in PEFT)
    _, other = ja.add_weighted_adapter(adapted, v, ["a0", "a1"], weights, "d", "dare_linear", density=0.3, seed=8)
    assert not np.array_equal(other["params"]["__adapters__"]["d"]["lora_a"]["kernel"], got["lora_a"]["kernel"])
    _, full = ja.add_weighted_adapter(adapted, v, ["a0", "a1"], weights, "d", "dare_ties", density=1.0)
    _, plain = ja.add_weighted_adapter(adapted, v, ["a0", "a1"], weights, "d", "ties", density=1.0)
    np.testing.assert_array_equal(full["params"]["__adapters__"]["d"]["lora_b"]["kernel"],
                                  plain["params"]["__adapters__"]["d"]["lora_b"]["kernel"])


def test_average_adapter_linear_is_the_weighted_mean_of_every_variable():
    adapted, v = dense_model(3, 4, [2, 2], [4.0, 4.0])
    new, nv = ja.average_adapter(adapted, v, "avg", {"a0": 3.0, "a1": 1.0})
    p = nv["params"]["__adapters__"]
    for leaf in ("lora_a", "lora_b"):
        np.testing.assert_allclose(p["avg"][leaf]["kernel"],
                                   0.75 * p["a0"][leaf]["kernel"] + 0.25 * p["a1"][leaf]["kernel"], rtol=1e-6)
    assert new.get_adapter("avg").adapter == adapted.get_adapter("a0").adapter


# ---------------------------------------------------------------------------------- errors


def test_errors_name_the_problem():
    adapted, v = dense_model(3, 4, [2, 3], [4.0, 4.0])
    add = ja.add_weighted_adapter
    with pytest.raises(ja.AdapterError, match=r"unknown adapter 'nope'; the model has \['a0', 'a1'\]"):
        add(adapted, v, ["a0", "nope"], [1.0, 1.0], "n", "cat")
    with pytest.raises(ja.AdapterError, match="adapter 'a1' already exists"):
        add(adapted, v, ["a0", "a1"], [1.0, 1.0], "a1", "cat")
    with pytest.raises(ja.AdapterError, match=r"same rank; got \{'a0': 2, 'a1': 3\}"):
        add(adapted, v, ["a0", "a1"], [1.0, 1.0], "n", "linear")
    with pytest.raises(ja.AdapterError, match=r"needs density in \(0, 1\], got 1.5"):
        add(adapted, v, ["a0", "a0"], [1.0, 1.0], "n", "ties", density=1.5)
    with pytest.raises(ja.AdapterError, match=r"needs density in \(0, 1\], got None"):
        add(adapted, v, ["a0", "a1"], [1.0, 1.0], "n", "ties_svd")
    with pytest.raises(ja.AdapterError, match="svd_rank must be a positive int, got 0"):
        add(adapted, v, ["a0", "a1"], [1.0, 1.0], "n", "svd", svd_rank=0)
    with pytest.raises(ja.AdapterError, match="the SVD rank 5 exceeds the layer at '' \\(3 in, 4 out\\)"):
        add(adapted, v, ["a0", "a1"], [1.0, 1.0], "n", "svd", svd_rank=5)
    with pytest.raises(ja.AdapterError, match="expected 2 weights, one per adapter"):
        add(adapted, v, ["a0", "a1"], [1.0], "n", "cat")
    with pytest.raises(ja.AdapterError, match="combination_type must be one of"):
        add(adapted, v, ["a0", "a1"], [1.0, 1.0], "n", "mean")
    with pytest.raises(ja.AdapterError, match="majority_sign_method must be one of"):
        add(adapted, v, ["a0", "a0"], [1.0, 1.0], "n", "ties", density=0.5, majority_sign_method="vote")
    mixed = adapted.add_adapter("lin", ja.LinearAdapter(dim=2))
    with pytest.raises(ja.AdapterError, match="combines LoRA adapters; 'lin' is a LinearAdapter"):
        add(mixed, v, ["a0", "lin"], [1.0, 1.0], "n", "cat")
    dora = adapted.add_adapter("dora", ja.LoRA(rank=2, use_dora=True))
    with pytest.raises(ja.AdapterError, match="'dora' is not a plain LoRA"):
        add(dora, v, ["a0", "dora"], [1.0, 1.0], "n", "cat")
    fresh = adapted.add_adapter("fresh", ja.LoRA(rank=2))
    with pytest.raises(ja.AdapterError, match="'fresh' has no params in the variables given"):
        add(fresh, v, ["a0", "fresh"], [1.0, 1.0], "n", "cat")

    avg = ja.average_adapter
    with pytest.raises(ja.AdapterError, match="cannot average adapters with different configurations"):
        avg(adapted, v, "n", ["a0", "a1"])
    same, sv = dense_model(3, 4, [2, 2], [4.0, 4.0])
    with pytest.raises(ja.AdapterError, match=r"svd_rank \(a positive int\) must be set when using 'lora_delta_w_svd'"):
        avg(same, sv, "n", ["a0", "a1"], combine_strategy="lora_delta_w_svd")
    with pytest.raises(ja.AdapterError, match=r"the weights \[1.0, -1.0\] sum to zero"):
        avg(same, sv, "n", ["a0", "a1"], weights=[1.0, -1.0])
    with pytest.raises(ja.AdapterError, match="combine_strategy must be one of"):
        avg(same, sv, "n", ["a0", "a1"], combine_strategy="ties")
    with pytest.raises(ja.AdapterError, match="unknown adapter 'zz'"):
        avg(same, sv, "n", ["a0", "zz"])
    lin = ja.with_adapters(nn.Dense(4), {"dense": ""}).add_adapter("p", ja.LinearAdapter(2))
    with pytest.raises(ja.AdapterError, match="'lora_linear_only_negate_b' is for LoRA adapters; 'p' is a Linear"):
        avg(lin.add_adapter("q", ja.LinearAdapter(2)), {"params": {}}, "n", ["p", "q"],
            combine_strategy="lora_linear_only_negate_b")


def test_conv_loras_combine_elementwise_only():
    """A Conv's LoRA factors hold a window: per-tensor types (ties, pruning, SVD) are refused there."""
    conv = ja.with_adapters(nn.Conv(4, (3,)), {"conv": ""})
    adapters = {}
    for i in range(2):
        conv = conv.add_adapter(f"c{i}", ja.LoRA(rank=2))
        adapters[f"c{i}"] = {"lora_a": {"kernel": jnp.full((3, 5, 2), i + 1.0)},
                             "lora_b": {"kernel": jnp.full((1, 2, 4), 0.5)}}
    v = {"params": {"kernel": jnp.zeros((3, 5, 4)), "__adapters__": adapters}}
    with pytest.raises(ja.AdapterError, match="'ties' at the Conv at '' is not supported"):
        ja.add_weighted_adapter(conv, v, ["c0", "c1"], [1.0, 1.0], "n", "ties", density=0.5)
    with pytest.raises(ja.AdapterError, match="'svd' at the Conv at '' is not supported"):
        ja.add_weighted_adapter(conv, v, ["c0", "c1"], [1.0, 1.0], "n", "svd")
    _, nv = ja.add_weighted_adapter(conv, v, ["c0", "c1"], [1.0, -1.0], "n", "cat")
    new = nv["params"]["__adapters__"]["n"]
    assert new["lora_a"]["kernel"].shape == (3, 5, 4) and new["lora_b"]["kernel"].shape == (1, 4, 4)
    np.testing.assert_allclose(new["lora_a"]["kernel"][..., 2:], -2.0 * 4.0)  # w * scaling * A of c1
