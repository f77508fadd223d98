"""Prompt tuning: parity with PEFT and AdapterHub, prompts after a first token, masks of both layouts,
configs by name, and clear errors for sites that do not fit."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jadapters as ja
from jadapters import sites
from jadapters.configs import parse_method

pytest.importorskip("transformers")
import reference  # noqa: E402


@pytest.fixture(scope="module")
def bert():
    module, base = reference.tiny_bert()
    return module, base, reference.bert_inputs()


def with_prompts(bert, method, prompts):
    """The fixture BERT with prompt adapter 'a' holding ``prompts`` (P, hidden): it sits at the model's root."""
    module, base, _ = bert
    adapted = ja.with_adapters(module, "hf_bert").add_adapter("a", method)
    return adapted, ja.merge_trees(base, {"params": {"__adapters__": {"a": {"embedding": prompts}}}})


def saved_prompts(case):
    if case.startswith("peft/"):
        return reference.weights(reference.case_dir(case) / "adapter/adapter_model.safetensors")["prompt_embeddings"]
    weights = reference.weights(reference.case_dir(case) / "adapter/adapter.safetensors")
    return weights["prompt_tuning.prompt_tunings.a.prompt_embedding.weight"]


@pytest.mark.parametrize("case, method", [
    ("peft/prompt_tuning", "prompt_tuning[num_virtual_tokens=5]"),
    ("adapters/prompt_tuning", "prompt_tuning[prompt_length=5,style=adapterhub]"),
])
def test_parity_with_the_libraries(bert, case, method):
    adapted, variables = with_prompts(bert, method, saved_prompts(case))
    out = adapted.apply(variables, *bert[2]).last_hidden_state
    expected = reference.expected(case)["last_hidden_state"]
    assert out.shape == expected.shape == (3, 12, 32)  # the prompt positions come first
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=0)


def test_prompts_after_the_first_token_match_a_direct_computation(bert):
    """AdapterHub's ``prefix_after_bos``: [first token, prompts, the rest], the mask likewise."""
    module, base, (ids, mask, types, positions) = bert
    prompts = saved_prompts("adapters/prompt_tuning")
    adapted, variables = with_prompts(bert, "prompt_tuning[prompt_length=5,style=adapterhub,combine=prefix_after_bos]",
                                      prompts)
    out = adapted.apply(variables, ids, mask, types, positions).last_hidden_state

    embedded = module.apply(base, ids, types, positions, mask, method=lambda m, *a: m.embeddings(*a))
    batch = ids.shape[0]
    x = jnp.concatenate([embedded[:, :1], jnp.broadcast_to(prompts, (batch,) + prompts.shape), embedded[:, 1:]], 1)
    extended = jnp.concatenate([mask[:, :1], jnp.ones((batch, 5), mask.dtype), mask[:, 1:]], 1)
    expected = module.apply(base, x, extended, method=lambda m, h, k: m.encoder(h, k, None).last_hidden_state)
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=0)


class Tagger(nn.Module):
    """A model whose call takes a Flax attention mask (batch, 1, queries, keys)."""

    @nn.compact
    def __call__(self, ids, mask):
        x = nn.Embed(11, 8, name="embed")(ids)
        return nn.MultiHeadDotProductAttention(2, name="attn")(x, x, mask=mask)


def test_a_flax_attention_mask_gets_rows_and_columns_for_the_prompts():
    """Every query attends to the prompts; the prompts attend to each other and to what the first token
    attends to (here: the real tokens)."""
    model = Tagger()
    ids = jnp.array([[3, 4, 5, 0], [6, 7, 0, 0]])
    mask = nn.make_attention_mask(ids > 0, ids > 0)
    base = model.init(jax.random.key(0), ids, mask)
    site = sites.EmbeddingSite(word_embeddings="embed", mask=sites.MaskArgument("mask", 1, kind="attention"))
    adapted = ja.with_adapters(model, ja.Preset.make("tagger", {}, sites={"embeddings": site}))
    adapted = adapted.add_adapter("a", "prompt_tuning[num_virtual_tokens=2]")
    variables = ja.init_adapters(adapted, base, jax.random.key(1), ids, mask)
    out = adapted.apply(variables, ids, mask)

    prompts = variables["params"]["__adapters__"]["a"]["embedding"]
    embedded = jnp.take(base["params"]["embed"]["embedding"], ids, axis=0)
    x = jnp.concatenate([jnp.broadcast_to(prompts, (2, 2, 8)), embedded], axis=1)
    valid = np.asarray(ids > 0)
    expected_mask = np.ones((2, 1, 6, 6), bool)
    expected_mask[:, 0, :2, 2:] = valid[:, None, :]
    expected_mask[:, :, 2:, 2:] = np.asarray(mask)
    attention = nn.MultiHeadDotProductAttention(2)
    expected = attention.apply({"params": base["params"]["attn"]}, x, x, mask=jnp.asarray(expected_mask))
    assert out.shape == (2, 6, 8)
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)


class Stack(nn.Module):
    embed: nn.Module

    @nn.compact
    def __call__(self, ids):
        return nn.Dense(4)(self.embed(ids))


class TwoStacks(nn.Module):
    """An encoder-decoder whose stacks share one token embedding, as T5's do."""

    def setup(self):
        self.shared = nn.Embed(11, 4)
        self.encoder, self.decoder = Stack(self.shared), Stack(self.shared)

    def __call__(self, src, tgt):
        return self.decoder(tgt) + self.encoder(src).mean(axis=1, keepdims=True)


def test_prompts_enter_once_and_within_the_module_named():
    model = TwoStacks()
    src, tgt = jnp.ones((2, 3), jnp.int32), jnp.ones((2, 5), jnp.int32)
    base = model.init(jax.random.key(0), src, tgt)

    def adapted_with(site):
        preset = ja.Preset.make("two", {}, sites={"embeddings": site})
        return ja.with_adapters(model, preset).add_adapter("a", "prompt_tuning[num_virtual_tokens=2]")

    with pytest.raises(ja.AdapterError, match=r"adapter 'a' at '': 'shared' ran twice in one call, so the prompts "
                                              r"would enter twice; name the module whose call holds the right one"):
        ja.init_adapters(adapted_with(sites.EmbeddingSite(word_embeddings="shared")), base, jax.random.key(1), src, tgt)
    adapted = adapted_with(sites.EmbeddingSite(word_embeddings="shared", within="encoder"))
    variables = ja.init_adapters(adapted, base, jax.random.key(1), src, tgt)
    out = adapted.apply(variables, src, tgt)
    assert out.shape == (2, 5, 4)  # the decoder's sequence keeps its length
    assert not np.allclose(out, model.apply(base, src, tgt))
    with pytest.raises(ja.AdapterError, match=r"names the submodule\(s\) \['decoder_stack', 'shared'\], which this call never ran"):
        ja.init_adapters(adapted_with(sites.EmbeddingSite(word_embeddings="shared", within="decoder_stack")), base,
                         jax.random.key(1), src, tgt)


def test_each_style_needs_its_place_in_the_site():
    own_bert = ja.Preset.make("bert", {}, sites={"embeddings": sites.EmbeddingSite(embeddings="embeddings_norm")})
    adapted = ja.with_adapters(nn.Dense(2), own_bert)
    with pytest.raises(ja.AdapterError, match=r"adapter 'a': position 'input' needs the embedding site's "
                                              r"word_embeddings, which it does not name"):
        adapted.add_adapter("a", "prompt_tuning")
    assert adapted.add_adapter("a", "prompt_tuning[style=adapterhub]").get_adapter("a").targets == ("",)
    with pytest.raises(ja.AdapterError, match=r"method 'prompt_tuning' needs the site 'embeddings'"):
        ja.with_adapters(nn.Dense(2), {"d": ""}).add_adapter("a", "prompt_tuning")


def test_configs_by_name_with_both_libraries_vocabularies():
    peft = ja.PromptTuningConfig().adapter()
    assert (peft.length, peft.init_weights) == (20, "normal")
    hub = parse_method("prompt_tuning[style=adapterhub]").adapter()
    assert (hub.length, hub.init_weights) == (10, "uniform")
    mixed = parse_method("prompt_tuning[prompt_length=4,prompt_init=RANDOM,style=adapterhub]").adapter()
    assert (mixed.length, mixed.init_weights) == (4, "normal")
    params = ja.PromptTuning(length=64, init_weights="uniform").init(jax.random.key(0), 16)["params"]["embedding"]
    assert params.shape == (64, 16) and 0.45 < float(jnp.abs(params).max()) <= 0.5
    with pytest.raises(ValueError, match=r"num_virtual_tokens=3 and prompt_length=4 disagree"):
        ja.PromptTuningConfig(num_virtual_tokens=3, prompt_length=4)
    with pytest.raises(ValueError, match=r"prompt_tuning_init must be 'RANDOM' or 'random_uniform' \(other inits "
                                         r"need a tokenizer\), got 'TEXT'"):
        ja.PromptTuningConfig(prompt_tuning_init="TEXT")
    with pytest.raises(ValueError, match=r"combine must be one of \['prefix', 'prefix_after_bos'\], got 'suffix'"):
        ja.PromptTuningConfig(combine="suffix")
