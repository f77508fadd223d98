"""Prefix tuning: parity with PEFT and AdapterHub, attention layers of every kind (separate or fused
projections, Hugging Face's GPT-2 against its own cache, a user's own layer), folding the
reparametrisation, configs by name, and clear errors."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jadapters as ja
from jadapters.adapters.prefix import fold_prefix_tuning
from jadapters import sites
from jadapters.configs import parse_method
from jadapters.presets import HF_VIT

transformers = pytest.importorskip("transformers")
import reference  # noqa: E402
from architectures import families as own  # noqa: E402
from architectures import hf  # noqa: E402
from architectures.zoo import OWN_FAMILIES  # noqa: E402

LAYERS, HIDDEN = 2, 32


# Mapping the libraries' saved weights onto jadapters' params: one subtree per attention layer.


def at_bert_layers(per_layer):
    """``{'params': ...}`` holding ``per_layer[l]`` as adapter 'a' of each BERT attention layer."""
    return {"params": {"encoder": {"layer": {
        str(l): {"attention": {"self": {"__adapters__": {"a": sub}}}} for l, sub in enumerate(per_layer)
    }}}}


def split_keys_values(flat):
    """PEFT's and AdapterHub's layout: (P, 2L * hidden) viewed (P, 2L, hidden), 2l = keys, 2l+1 = values of layer l."""
    kv = flat.reshape(flat.shape[0], 2 * LAYERS, HIDDEN)
    return [{"keys": kv[:, 2 * l], "values": kv[:, 2 * l + 1]} for l in range(LAYERS)]


def peft_prefix(case):
    return split_keys_values(reference.weights(reference.case_dir(case) / "adapter/adapter_model.safetensors")["prompt_embeddings"])


def adapterhub_prefix(case):
    """AdapterHub's one pool for all layers, read by ``load_adapterhub``: each layer's params."""
    module, base = reference.tiny_bert()
    folder = reference.case_dir(case) / "adapter_safetensors"
    _, loaded = ja.load_adapterhub(folder, module, base, *reference.bert_inputs())
    layers = ja.split_adapters(loaded)[0]["params"]["encoder"]["layer"]
    return [layers[str(l)]["attention"]["self"]["__adapters__"]["a"] for l in range(LAYERS)]


CASES = {
    "peft/prefix_tuning": ("prefix_tuning[num_virtual_tokens=4]", lambda: peft_prefix("peft/prefix_tuning")),
    # PEFT saves the MLP's output, so the reparametrised adapter loads as a flat one.
    "peft/prefix_tuning_projection": ("prefix_tuning[num_virtual_tokens=4]", lambda: peft_prefix("peft/prefix_tuning_projection")),
    "adapters/prefix_tuning_flat": ("prefix_tuning_flat[prefix_length=4]",
                                    lambda: adapterhub_prefix("adapters/prefix_tuning_flat")),
    "adapters/prefix_tuning": ("prefix_tuning[style='adapterhub',prefix_length=4,bottleneck_size=16]",
                               lambda: adapterhub_prefix("adapters/prefix_tuning")),
}


@pytest.fixture(scope="module")
def bert():
    module, base = reference.tiny_bert()
    return module, base, reference.bert_inputs()


def adapted_bert(bert, method):
    module, base, _ = bert
    return ja.with_adapters(module, "hf_bert").add_adapter("a", method)


@pytest.mark.parametrize("case", sorted(CASES))
def test_parity_with_the_libraries(bert, case):
    method, weights = CASES[case]
    adapted = adapted_bert(bert, method)
    variables = ja.merge_trees(bert[1], at_bert_layers(weights()))
    out = adapted.apply(variables, *bert[2]).last_hidden_state
    expected = reference.expected(case)["last_hidden_state"]
    assert out.shape == expected.shape == (3, 7, 32)
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=0)


def test_peft_style_shifts_positions_and_adapterhub_style_does_not(bert):
    """The same prefix under the other style is far off: PEFT's real tokens sit at positions P..P+T-1."""
    variables = ja.merge_trees(bert[1], at_bert_layers(peft_prefix("peft/prefix_tuning")))
    adapted = adapted_bert(bert, "prefix_tuning[num_virtual_tokens=4,style='adapterhub',flat=True]")
    out = adapted.apply(variables, *bert[2]).last_hidden_state
    assert np.abs(out - reference.expected("peft/prefix_tuning")["last_hidden_state"]).max() > 0.5
    assert [s.targets for s in adapted.adapters] == [("attention/self",)]
    peft = adapted_bert(bert, "prefix_tuning[num_virtual_tokens=4]").adapters[0]
    assert peft.targets == ("attention/self", "")  # the model's call too, to shift its position ids


def test_folding_the_reparametrisation_keeps_the_output_and_drops_the_mlp(bert):
    adapted = adapted_bert(bert, CASES["adapters/prefix_tuning"][0])
    variables = ja.merge_trees(bert[1], at_bert_layers(adapterhub_prefix("adapters/prefix_tuning")))
    folded, folded_vars = fold_prefix_tuning(adapted, variables)
    subtree = folded_vars["params"]["encoder"]["layer"]["1"]["attention"]["self"]["__adapters__"]["a"]
    assert sorted(subtree) == ["keys", "values"] and subtree["keys"].shape == (4, 32)
    spec = folded.get_adapter("a")
    assert not spec.adapter.projection and spec.config.projection is False and spec.config.length == 4
    out = folded.apply(folded_vars, *bert[2]).last_hidden_state
    np.testing.assert_allclose(out, reference.expected("adapters/prefix_tuning")["last_hidden_state"], atol=1e-5, rtol=0)
    assert fold_prefix_tuning(folded, folded_vars)[1] == folded_vars  # nothing left to fold
    with pytest.raises(ja.AdapterError, match=r"fold_prefix_tuning: no adapter\(s\) \['b'\]; the adapters are \['a'\]"):
        fold_prefix_tuning(adapted, variables, names="b")


def test_inside_nn_scan_prefixes_are_stacked_per_layer_and_fold_per_layer():
    model = own.GPT()
    ids = own.token_batch(jax.random.key(0))[0]
    base = model.init(jax.random.key(0), ids)
    preset = next(f for f in OWN_FAMILIES if f.name == "gpt").preset
    adapted = ja.with_adapters(model, preset).add_adapter(
        "p", ja.PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=5))
    variables = ja.init_adapters(adapted, base, jax.random.key(1), ids)
    stacked = variables["params"]["layers"]["attention"]["__adapters__"]["p"]
    assert stacked["embedding"].shape == (2, 3, 16) and stacked["up"]["kernel"].shape == (2, 5, 32)
    assert not np.allclose(stacked["embedding"][0], stacked["embedding"][1])  # one prefix per layer
    folded, folded_vars = fold_prefix_tuning(adapted, variables)
    assert folded_vars["params"]["layers"]["attention"]["__adapters__"]["p"]["keys"].shape == (2, 3, 16)
    np.testing.assert_allclose(folded.apply(folded_vars, ids), adapted.apply(variables, ids), atol=1e-5, rtol=1e-5)


def test_gpt2_fused_qkv_matches_its_own_cache_holding_the_prefix():
    """Hugging Face's GPT-2 with the prefix as a cache of P tokens, computed by its own decoding code:
    keys and values written into the cache, positions P..P+T-1, the mask over cache and tokens."""
    module, base = hf.HF_GPT2.built()
    ids, mask, positions = hf._gpt2_inputs(0)
    (batch, length), count = ids.shape, 3
    adapted = ja.with_adapters(module, "hf_gpt2").add_adapter("p", ja.PrefixTuningConfig(num_virtual_tokens=count))
    variables = ja.init_adapters(adapted, base, jax.random.key(1), ids, mask, positions)
    out = adapted.apply(variables, ids, mask, positions).logits

    prefix = variables["params"]["transformer"]["h"]["0"]["attn"]["__adapters__"]["p"]
    full = jnp.ones((batch, count + length), jnp.int32)
    cache = module.init(jax.random.key(0), full, full, full, init_cache=True)["cache"]
    attn = cache["transformer"]["h"]["0"]["attn"]
    heads = attn["cached_key"].shape[2]
    for name, value in (("cached_key", prefix["keys"]), ("cached_value", prefix["values"])):
        attn[name] = attn[name].at[:, :count].set(value.reshape(count, heads, -1))
    attn["cache_index"] = jnp.asarray(count, jnp.int32)
    with_cache = jnp.concatenate([jnp.ones((batch, count), mask.dtype), mask], axis=1)
    expected, _ = module.apply({**base, "cache": cache}, ids, with_cache, positions + count, mutable=["cache"])
    assert out.shape == expected.logits.shape == (batch, length, own.VOCAB)
    np.testing.assert_allclose(out, expected.logits, atol=1e-5, rtol=1e-5)


def attention_with_prefix(q, k, v, keys, values, heads, mask=None):
    """Scaled dot-product attention of q over [prefix keys; k] with values [prefix values; v]."""
    b, t, _ = q.shape
    k = jnp.concatenate([jnp.broadcast_to(keys, (b,) + keys.shape), k], axis=1)
    v = jnp.concatenate([jnp.broadcast_to(values, (b,) + values.shape), v], axis=1)
    split = lambda x: x.reshape(x.shape[0], x.shape[1], heads, -1)
    q, k, v = split(q), split(k), split(v)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(q.shape[-1])
    if mask is not None:
        scores = jnp.where(mask, scores, -1e9)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v).reshape(b, t, -1)


def test_vit_attention_with_placeholder_query_rows_matches_the_formula():
    """Hugging Face's ViT reshapes its projections by the input's length: the prefix enters as rows."""
    from transformers.models.vit.modeling_flax_vit import FlaxViTSelfAttention

    config = transformers.ViTConfig(hidden_size=16, num_attention_heads=2)
    layer = FlaxViTSelfAttention(config)
    x = jax.random.normal(jax.random.key(0), (2, 5, 16))
    base = layer.init(jax.random.key(1), x)
    site = dataclasses.replace(dict(HF_VIT.sites)["attention"], targets="")  # the preset's site, on the layer alone
    adapted = ja.with_adapters(layer, ja.Preset.make("vit_attention", {}, sites={"attention": site}))
    adapted = adapted.add_adapter("p", "prefix_tuning[num_virtual_tokens=3]")
    variables = ja.init_adapters(adapted, base, jax.random.key(2), x)
    (out,) = adapted.apply(variables, x)

    p = variables["params"]
    dense = lambda name: x @ p[name]["kernel"] + p[name]["bias"]
    prefix = p["__adapters__"]["p"]
    expected = attention_with_prefix(dense("query"), dense("key"), dense("value"), prefix["keys"], prefix["values"], 2)
    assert out.shape == (2, 5, 16)
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)


class MyAttention(nn.Module):
    """A user's own attention layer, written without any thought of adapters."""

    heads: int = 2

    @nn.compact
    def __call__(self, x, mask):
        q, k, v = (nn.Dense(8, name=n)(x) for n in ("q_proj", "k_proj", "v_proj"))
        split = lambda y: y.reshape(y.shape[0], y.shape[1], self.heads, -1)
        scores = jnp.einsum("bqhd,bkhd->bhqk", split(q), split(k)) / jnp.sqrt(8 / self.heads)
        weights = jax.nn.softmax(jnp.where(mask, scores, -1e9), axis=-1)
        return nn.Dense(8, name="o_proj")(jnp.einsum("bhqk,bkhd->bqhd", weights, split(v)).reshape(x.shape))


class MyModel(nn.Module):
    @nn.compact
    def __call__(self, x, padding):
        mask = nn.make_attention_mask(padding, padding)
        for i in range(2):
            x = x + MyAttention(name=f"attn_{i}")(x, mask)
        return x


def test_a_users_own_attention_layer_opts_in_with_a_site():
    model = MyModel()
    x = jax.random.normal(jax.random.key(0), (2, 4, 8))
    padding = jnp.array([[1, 1, 1, 1], [1, 1, 0, 0]], bool)
    base = model.init(jax.random.key(1), x, padding)

    # The lines a user writes: where the layers are, their key and value projections, their mask.
    site = sites.AttentionSite("attn_*", key="k_proj", value="v_proj", mask=sites.MaskArgument("mask", 1, kind="attention"))
    adapted = ja.with_adapters(model, ja.Preset.make("mine", {}, sites={"attention": site}))
    adapted = adapted.add_adapter("prefix", "prefix_tuning[num_virtual_tokens=3]")

    variables = ja.init_adapters(adapted, base, jax.random.key(2), x, padding)
    assert ja.tree.adapter_locations(variables)["prefix"] == ["attn_0", "attn_1"]
    out = adapted.apply(variables, x, padding)

    h, p = x, variables["params"]
    keep = jnp.concatenate([jnp.ones((2, 1, 4, 3), bool), nn.make_attention_mask(padding, padding)], axis=-1)
    for i in range(2):
        layer = p[f"attn_{i}"]
        dense = lambda name, y: y @ layer[name]["kernel"] + layer[name]["bias"]
        prefix = layer["__adapters__"]["prefix"]
        attended = attention_with_prefix(dense("q_proj", h), dense("k_proj", h), dense("v_proj", h), prefix["keys"],
                                         prefix["values"], 2, mask=keep)
        h = h + dense("o_proj", attended)
    np.testing.assert_allclose(out, h, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(adapted.set_enabled_adapters(enabled=False).apply(variables, x, padding),
                                  model.apply(base, x, padding))


def test_cross_attention_gets_prefixes_unless_told_not_to():
    t5 = next(f for f in OWN_FAMILIES if f.name == "t5")
    adapted = ja.with_adapters(own.T5(), t5.preset)
    both = adapted.add_adapter("a", "prefix_tuning").get_adapter("a")
    assert both.targets == ("self_attention", "cross_attention")  # no position embeddings: nothing to shift
    assert adapted.add_adapter("a", "prefix_tuning[cross_prefix=False]").get_adapter("a").targets == ("self_attention",)


def test_dropout_on_the_prefix_in_training_only():
    layer = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)
    x = jnp.ones((1, 3, 8))
    base = layer.init(jax.random.key(0), x)
    adapted = ja.with_adapters(layer, ja.Preset.make("attn", {}, sites={"attention": sites.AttentionSite("")}))
    adapted = adapted.add_adapter("p", "prefix_tuning[num_virtual_tokens=4,dropout=0.5]")
    variables = ja.init_adapters(adapted, base, jax.random.key(1), x)
    train = adapted.clone(training=True)
    run = lambda seed: train.apply(variables, x, rngs={"dropout": jax.random.key(seed)})
    assert not np.allclose(run(0), run(1))
    np.testing.assert_array_equal(adapted.apply(variables, x), adapted.apply(variables, x))
    with pytest.raises(ja.AdapterError, match=r"needs a PRNG stream"):
        train.apply(variables, x)


def test_configs_by_name_with_both_libraries_vocabularies():
    peft = ja.PrefixTuningConfig()
    assert (peft.length, peft.projection, peft.adapter().hidden) == (20, False, None)
    hub = ja.PrefixTuningConfig(style="adapterhub")
    assert (hub.length, hub.projection, hub.adapter().hidden) == (30, True, 512)
    parsed = parse_method("prefix_tuning[prefix_length=4,bottleneck_size=16,style=adapterhub]")
    assert (parsed.length, parsed.projection, parsed.adapter().hidden) == (4, True, 16)
    flat = parse_method("prefix_tuning_flat[prefix_length=6]")
    assert (flat.style, flat.length, flat.projection) == ("adapterhub", 6, False)
    assert ja.PrefixTuningConfig(num_virtual_tokens=8, prefix_length=8).length == 8
    with pytest.raises(ValueError, match=r"num_virtual_tokens=8 and prefix_length=4 disagree; give one of them"):
        ja.PrefixTuningConfig(num_virtual_tokens=8, prefix_length=4)
    with pytest.raises(ValueError, match=r"prefix_projection=True and not flat=False disagree"):
        ja.PrefixTuningConfig(prefix_projection=True, flat=True)
    with pytest.raises(ValueError, match=r"prefix_tuning: style must be one of \['peft', 'adapterhub'\], got 'hf'"):
        ja.PrefixTuningConfig(style="hf")
    with pytest.raises(ValueError, match=r"length must be a positive int, got 0"):
        ja.PrefixTuningConfig(num_virtual_tokens=0)
    with pytest.raises(ValueError, match=r"unknown activation 'swiglu_x'"):
        ja.PrefixTuningConfig(non_linearity="swiglu_x")


def test_sites_are_checked_when_declared():
    with pytest.raises(ValueError, match=r"a fused qkv projection needs pad_queries=True"):
        sites.AttentionSite("attn", qkv="c_attn")
    with pytest.raises(ValueError, match=r"names its key and value projections, or a fused qkv"):
        sites.AttentionSite("attn", key=None)
    with pytest.raises(ValueError, match=r"mask kind must be one of \('padding', 'attention'\), got 'causal'"):
        sites.MaskArgument("mask", kind="causal")
    with pytest.raises(ValueError, match=r"embeddings_argument needs the module it belongs to"):
        sites.EmbeddingSite(word_embeddings="wte", embeddings_argument=0)


def test_a_model_without_an_attention_site_or_with_a_wrong_one_is_a_clear_error():
    layer = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)
    with pytest.raises(ja.AdapterError, match=r"adapter 'p': method 'prefix_tuning' needs the site 'attention', which "
                                              r"this model's preset \(none\) does not describe"):
        ja.with_adapters(layer, {"attn": ""}).add_adapter("p", "prefix_tuning")
    x = jnp.ones((1, 3, 8))
    base = layer.init(jax.random.key(0), x)
    site = sites.AttentionSite("", key="k_proj", value="v_proj")
    adapted = ja.with_adapters(layer, ja.Preset.make("attn", {}, sites={"attention": site})).add_adapter("p", "prefix_tuning")
    with pytest.raises(ja.AdapterError, match=r"adapter 'p' at '': the site AttentionSite\(.*\) names the submodule\(s\) "
                                              r"\['k_proj', 'v_proj'\], which this call never ran"):
        ja.init_adapters(adapted, base, jax.random.key(1), x)
