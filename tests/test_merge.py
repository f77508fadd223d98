"""merge_adapters / unmerge_adapters / unload_adapters: PEFT's merge_and_unload, unmerge_adapter and unload."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jadapters as ja


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.gelu(nn.Dense(12, name="fc_in")(x))
        return nn.Dense(6, name="fc_out")(h)


PRESET = ja.Preset.make("mlp", {"ffn_intermediate": "fc_in", "ffn_output": "fc_out"})
X = jax.random.normal(jax.random.key(0), (4, 6))


def moved(variables, seed=0, scale=0.3):
    adapters, rest = ja.split_adapters(variables)
    rng = np.random.default_rng(seed)
    return ja.merge_trees(rest, jax.tree_util.tree_map(
        lambda leaf: leaf + jnp.asarray(scale * rng.standard_normal(leaf.shape), leaf.dtype), adapters))


@pytest.fixture(scope="module")
def base():
    model = MLP()
    return model, model.init(jax.random.key(1), X)


def adapted_with(base, *adapters):
    model, params = base
    adapted = ja.with_adapters(model, PRESET)
    for name, adapter in adapters:
        adapted = adapted.add_adapter(name, adapter)
    return adapted, moved(ja.init_adapters(adapted, params, jax.random.key(2), X))


LINEAR = [
    ("lora", ja.LoraConfig(r=2, target_modules=["ffn_intermediate", "ffn_output"])),
    ("ia3", ja.IA3Config(target_modules=["ffn_intermediate", "ffn_output"], feedforward_modules=["ffn_output"])),
    ("vera", ja.VeraConfig(r=3, target_modules=["ffn_intermediate"])),
]


def test_merge_then_unmerge_gives_back_the_weights_and_the_adapted_function(base):
    model, params = base
    adapted, variables = adapted_with(base, *LINEAR)
    expected = adapted.apply(variables, X)
    merged_model, merged = ja.merge_adapters(adapted, variables, X)
    assert merged_model is model and ja.split_adapters(merged)[0] == {}
    np.testing.assert_allclose(merged_model.apply(merged, X), expected, atol=1e-5)
    assert float(jnp.abs(merged["params"]["fc_in"]["kernel"] - params["params"]["fc_in"]["kernel"]).max()) > 1e-2

    adapters, _ = ja.split_adapters(variables)
    restored = ja.unmerge_adapters(adapted, ja.merge_trees(merged, adapters), X)
    for layer in ("fc_in", "fc_out"):
        for leaf in ("kernel", "bias"):
            original = params["params"][layer][leaf]
            delta = merged["params"][layer][leaf] - original
            # float32 rounding of W + d - d (and of W * l / l): a few ulps of |W| + |d|.
            bound = 4 * np.finfo(np.float32).eps * (jnp.abs(original) + jnp.abs(delta))
            assert bool((jnp.abs(restored["params"][layer][leaf] - original) <= bound + 1e-30).all()), (layer, leaf)
    np.testing.assert_allclose(adapted.apply(restored, X), expected, atol=1e-5)


def test_merging_changes_nothing_the_caller_holds(base):
    adapted, variables = adapted_with(base, LINEAR[0])
    before = jax.tree_util.tree_map(np.asarray, variables)
    ja.merge_adapters(adapted, variables, X)
    jax.tree_util.tree_map(np.testing.assert_array_equal, variables, before)


def test_merging_some_keeps_the_others_and_refuses_to_reorder_a_layer(base):
    adapted, variables = adapted_with(base, LINEAR[0], LINEAR[1])
    # IA3 scales the LoRA's output too on fc_in: folding one without the other changes the function.
    with pytest.raises(ja.AdapterError, match=r"adapter 'lora' at 'fc_in': merging it while \['ia3'\] stay"):
        ja.merge_adapters(adapted, variables, X, name="lora")
    two, two_vars = adapted_with(base, LINEAR[0], ("lora2", ja.LoraConfig(r=3, target_modules=["ffn_output"])))
    kept_model, merged = ja.merge_adapters(two, two_vars, X, name="lora")
    assert kept_model.adapter_names() == ["lora2"]
    np.testing.assert_allclose(kept_model.apply(merged, X), two.apply(two_vars, X), atol=1e-5)


def test_safe_merge_refuses_non_finite_weights_naming_the_adapter(base):
    adapted, variables = adapted_with(base, LINEAR[0])
    adapters, rest = ja.split_adapters(variables)
    broken = jax.tree_util.tree_map_with_path(
        lambda path, leaf: leaf.at[0].set(jnp.nan) if "lora_b" in jax.tree_util.keystr(path) else leaf, adapters)
    broken = ja.merge_trees(rest, broken)
    with pytest.raises(ja.AdapterError, match=r"adapter 'lora' at 'fc_(in|out)': merging it gives non-finite weights"):
        ja.merge_adapters(adapted, broken, X, safe_merge=True)
    _, merged = ja.merge_adapters(adapted, broken, X)  # PEFT's default: merged as asked
    assert not bool(jnp.isfinite(merged["params"]["fc_in"]["kernel"]).all())


def test_what_cannot_merge_says_why(base):
    model, params = base
    bottleneck = ja.with_adapters(model, {"fc_out": "fc_out"}).add_adapter(
        "fc_out:bn", ja.LinearAdapter(dim=4, activation="relu"))
    variables = ja.init_adapters(bottleneck, params, jax.random.key(2), X)
    with pytest.raises(ja.AdapterError, match=r"adapter 'bn' \(LinearAdapter\) cannot merge"):
        ja.merge_adapters(bottleneck, variables, X)
    dora, dora_vars = adapted_with(base, ("dora", ja.LoraConfig(r=2, use_dora=True, target_modules=["ffn_output"])))
    _, merged = ja.merge_adapters(dora, dora_vars, X)
    np.testing.assert_allclose(ja.merge_adapters(dora, dora_vars, X)[0].apply(merged, X), dora.apply(dora_vars, X),
                               atol=1e-5)
    with pytest.raises(ja.AdapterError, match="DoRA's merge cannot be undone"):
        ja.unmerge_adapters(dora, ja.merge_trees(merged, ja.split_adapters(dora_vars)[0]), X)
    with pytest.raises(ja.AdapterError, match="no enabled adapter to merge"):
        ja.merge_adapters(dora.set_enabled_adapters(enabled=False), dora_vars, X)


def test_unload_drops_adapters_without_merging(base):
    model, params = base
    adapted, variables = adapted_with(base, LINEAR[0], LINEAR[2])
    unloaded, rest = ja.unload_adapters(adapted, variables)
    assert unloaded is model
    np.testing.assert_array_equal(unloaded.apply(rest, X), model.apply(params, X))
    kept, kept_vars = ja.unload_adapters(adapted, variables, name="vera")
    assert kept.adapter_names() == ["lora"]
    without_vera = adapted.set_enabled_adapters("vera", enabled=False)
    np.testing.assert_array_equal(kept.apply(kept_vars, X), without_vera.apply(variables, X))
