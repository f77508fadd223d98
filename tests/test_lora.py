"""LoRA with PEFT's options: layer kinds (Einsum, Conv1D's transposed kernel, grouped Conv), DoRA,
bias options, PiSSA/OLoRA residual inits, and its configs by name."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jadapters as ja
from jadapters.adapters.lora import residual_to_lora
from jadapters.configs import parse_method


def moved(variables, seed=0, scale=0.3):
    """Every adapter leaf moved off its init (zero B included), with numpy's generator."""
    adapters, rest = ja.split_adapters(variables)
    rng = np.random.default_rng(seed)
    return ja.merge_trees(rest, jax.tree_util.tree_map(
        lambda leaf: leaf + jnp.asarray(scale * rng.standard_normal(leaf.shape), leaf.dtype), adapters))


class Conv1D(nn.Module):
    """GPT-2's Conv1D as Hugging Face writes it: the kernel stored (out, in)."""

    features: int

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.normal(0.5), (self.features, x.shape[-1]))
        return x @ kernel.T + self.param("bias", nn.initializers.normal(0.5), (self.features,))


class Layers(nn.Module):
    """One layer of every kind LoRA sizes itself to."""

    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(11, 8, name="emb")(ids)                                   # (b, t, 8)
        q = nn.DenseGeneral((2, 4), name="heads")(x)                           # (b, t, 2, 4)
        x = nn.DenseGeneral(8, axis=(-1, -2), name="merge")(q)                 # axes in a non-sorted order
        e = nn.Einsum((8, 3, 2), "btd,dkh->bhtk", name="einsum")(x)            # output axes permuted
        x = jnp.transpose(e, (0, 2, 1, 3)).reshape(x.shape[:2] + (6,))
        x = Conv1D(6, name="square")(x)                                        # square: layout by class name
        x = Conv1D(5, name="conv1d")(x)
        image = jnp.repeat(x[:, :, None, :], 4, axis=2)                        # (b, t, 4, 5)
        return nn.Conv(4, (2, 2), name="conv")(image)


IDS = jnp.array([[1, 2, 3], [4, 5, 6]])
LAYERS = ["emb", "heads", "merge", "einsum", "square", "conv1d", "conv"]


@pytest.fixture(scope="module")
def layers():
    model = Layers()
    return model, model.init(jax.random.key(0), IDS)


def adapted_on(model, params, adapter, targets=LAYERS, strategy=None, seed=1):
    adapted = ja.with_adapters(model, {"all": targets}).add_adapter("all:x", adapter, strategy=strategy)
    return adapted, moved(ja.init_adapters(adapted, params, jax.random.key(seed), IDS))


@pytest.mark.parametrize("adapter", [
    ja.LoRA(rank=2),
    ja.LoRA(rank=3, alpha=2.0, use_rslora=True),
    ja.LoRA(rank=2, use_dora=True),
    ja.LoRA(rank=2, lora_bias=True),
], ids=["lora", "rslora", "dora", "lora_bias"])
def test_every_layer_kind_merges_to_its_own_forward(layers, adapter):
    """Merged == adapted (float32, 1e-5) on Embed, multi-head DenseGeneral both ways (with non-sorted
    axes), an Einsum whose output axes are permuted, Conv1D's (out, in) kernels (square too) and a
    Conv: the forward's flattening and the kernel layout the merge writes agree on every kind."""
    model, params = layers
    targets = [t for t in LAYERS if not (adapter.lora_bias and t == "emb")]
    adapted, variables = adapted_on(model, params, adapter, targets)
    out = adapted.apply(variables, IDS)
    assert float(jnp.abs(out - model.apply(params, IDS)).max()) > 1e-2
    merged_model, merged = ja.merge_adapters(adapted, variables, IDS)
    assert merged_model is adapted.model
    # Outputs reach |70| through seven layers: float32's rounding at that scale (1e-6 of it) is the tolerance.
    np.testing.assert_allclose(merged_model.apply(merged, IDS), out, atol=1e-6 * float(jnp.abs(out).max()), rtol=0)


def test_the_conv1d_kernel_layout_is_read_as_out_in(layers):
    model, params = layers
    adapted, variables = adapted_on(model, params, ja.LoRA(rank=2), ["square", "conv1d"])
    info = {}

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, Conv1D) and context.method_name == "__call__":
            out = next_fun(*args, **kwargs)
            ctx = ja.AdapterContext("x", context.module.name, False, args, kwargs, module=context.module)
            info[context.module.name] = ja.layers.describe_layer(ctx, args[0], out)
            return out
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        model.apply(params, IDS)
    assert info["square"].kernel_transposed and info["conv1d"].kernel_transposed
    assert not adapted_on(model, params, ja.LoRA(rank=2), ["heads"])[0].get_adapter("x").adapter.use_dora


def test_lora_on_a_per_head_einsum_is_a_clear_error():
    model = nn.Einsum((2, 4, 3), "bnd,ndh->bnh")
    x = jnp.ones((1, 2, 4))
    params = model.init(jax.random.key(0), x)
    adapted = ja.with_adapters(model, {"e": ""}).add_adapter("x", ja.LoRA(rank=2))
    with pytest.raises(ja.AdapterError, match=r"keeps kernel axes \['n'\] in the input and the output"):
        ja.init_adapters(adapted, params, jax.random.key(1), x)


def test_dora_computes_peft_formula_and_its_norm_gets_no_gradient():
    """y = (m / ||W + s A B||) (x (W + s A B)) + b, the norm per output feature over the inputs, bias not
    rescaled; the norm is a constant for the gradient (DoRA paper 4.3, as PEFT)."""
    x = jax.random.normal(jax.random.key(0), (3, 5))
    base = nn.Dense(4)
    params = base.init(jax.random.key(1), x)
    adapted = ja.with_adapters(base, {"d": ""}).add_adapter("x", ja.LoRA(rank=2, alpha=3.0, use_dora=True))
    variables = moved(ja.init_adapters(adapted, params, jax.random.key(2), x))
    p, lora = variables["params"], variables["params"]["__adapters__"]["x"]

    def by_hand(lora, detach):
        merged = p["kernel"] + 1.5 * lora["lora_a"]["kernel"] @ lora["lora_b"]["kernel"]
        norm = jnp.linalg.norm(merged, axis=0)
        norm = jax.lax.stop_gradient(norm) if detach else norm
        return lora["lora_magnitude"] / norm * (x @ merged) + p["bias"]

    np.testing.assert_allclose(adapted.apply(variables, x), by_hand(lora, True), atol=1e-5)

    def loss(fn):
        return lambda lora: jnp.sum(jnp.sin(fn(lora)))

    ours = jax.grad(loss(lambda l: adapted.apply({"params": {**p, "__adapters__": {"x": l}}}, x)))(lora)
    detached = jax.grad(loss(lambda l: by_hand(l, True)))(lora)
    attached = jax.grad(loss(lambda l: by_hand(l, False)))(lora)
    np.testing.assert_allclose(ours["lora_b"]["kernel"], detached["lora_b"]["kernel"], atol=1e-5)
    assert not np.allclose(ours["lora_b"]["kernel"], attached["lora_b"]["kernel"], atol=1e-3)


def test_dora_with_dropout_in_training_rescales_the_layer_on_the_dropped_input():
    """PEFT's training path: base(x) + (m/n - 1) W drop(x) + (m/n) s B A drop(x)."""
    x = jax.random.normal(jax.random.key(0), (6, 5))
    base = nn.Dense(4)
    params = base.init(jax.random.key(1), x)
    adapted = ja.with_adapters(base, {"d": ""}).add_adapter("x", ja.LoRA(rank=2, use_dora=True, dropout=0.5))
    variables = moved(ja.init_adapters(adapted, params, jax.random.key(2), x))
    dropped = []

    def capture(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if isinstance(context.module, nn.Dropout):
            dropped.append(out)
        return out

    with nn.intercept_methods(capture):
        y = adapted.clone(training=True).apply(variables, x, rngs={"dropout": jax.random.key(3)})
    (xd,) = dropped
    assert not np.allclose(xd, x)
    p, lora = variables["params"], variables["params"]["__adapters__"]["x"]
    update = 1.0 * lora["lora_a"]["kernel"] @ lora["lora_b"]["kernel"] * 4.0  # alpha 8 / rank 2
    scale = lora["lora_magnitude"] / jnp.linalg.norm(p["kernel"] + update, axis=0)
    expected = x @ p["kernel"] + p["bias"] + (scale - 1) * (xd @ p["kernel"]) + scale * (xd @ update)
    np.testing.assert_allclose(y, expected, atol=1e-5)


def test_bias_lora_only_trains_the_layers_own_bias_and_lora_bias_sits_inside_the_scaled_branch():
    x = jax.random.normal(jax.random.key(0), (3, 5))
    base = nn.Dense(4)
    params = base.init(jax.random.key(1), x)
    params = {"params": {**params["params"], "bias": jnp.arange(4.0)}}
    for adapter in (ja.LoRA(rank=2, bias="lora_only"), ja.LoRA(rank=2, lora_bias=True)):
        adapted = ja.with_adapters(base, {"d": ""}).add_adapter("x", adapter)
        initial = ja.init_adapters(adapted, params, jax.random.key(2), x)
        lora = initial["params"]["__adapters__"]["x"]
        if adapter.bias == "lora_only":
            np.testing.assert_array_equal(lora["bias"], jnp.arange(4.0))  # starts as the base bias
        else:
            np.testing.assert_array_equal(lora["lora_b"]["bias"], jnp.zeros(4))
        variables = moved(initial)
        lora, p = variables["params"]["__adapters__"]["x"], variables["params"]
        update = x @ lora["lora_a"]["kernel"] @ lora["lora_b"]["kernel"]
        if adapter.bias == "lora_only":
            expected = x @ p["kernel"] + lora["bias"] + 4.0 * update  # the adapter's bias replaces the base's
        else:
            expected = x @ p["kernel"] + p["bias"] + 4.0 * (update + lora["lora_b"]["bias"])
        np.testing.assert_allclose(adapted.apply(variables, x), expected, atol=1e-5)
        _, merged = ja.merge_adapters(adapted, variables, x)
        np.testing.assert_allclose(base.apply(merged, x), expected, atol=1e-5)


def test_bias_lora_only_is_trained_and_the_base_bias_is_not():
    import optax

    x = jax.random.normal(jax.random.key(0), (3, 5))
    base = nn.Dense(4)
    params = base.init(jax.random.key(1), x)
    adapted = ja.with_adapters(base, {"d": ""}).add_adapter("x", ja.LoRA(rank=2, bias="lora_only"))
    variables = ja.init_adapters(adapted, params, jax.random.key(2), x)
    step = ja.make_train_step(adapted, lambda y, batch: jnp.mean((y - 1.0) ** 2), optax.sgd(0.1),
                              inputs=lambda batch: (batch,))
    state, _ = step(step.init(variables, jax.random.key(3)), x)
    after = state.variables["params"]
    np.testing.assert_array_equal(after["bias"], params["params"]["bias"])
    assert not np.allclose(after["__adapters__"]["x"]["bias"], params["params"]["bias"])


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_residual_inits_replace_only_the_targeted_weights_and_start_as_the_base(init):
    class Two(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(5, name="other")(nn.Dense(6, name="fc")(x))

    model, x = Two(), jax.random.normal(jax.random.key(0), (3, 7))
    params = model.init(jax.random.key(1), x)
    kept = np.asarray(params["params"]["fc"]["kernel"]).copy()
    adapted = ja.with_adapters(model, {"fc": "fc"}).add_adapter("fc:x", ja.LoraConfig(r=2, init_lora_weights=init))
    variables = ja.init_adapters(adapted, params, jax.random.key(2), x)
    np.testing.assert_array_equal(params["params"]["fc"]["kernel"], kept)  # the caller's arrays are untouched
    assert variables["params"]["other"]["kernel"] is params["params"]["other"]["kernel"]
    lora = variables["params"]["fc"]["__adapters__"]["x"]
    residual = variables["params"]["fc"]["kernel"]
    scaling = 8 / 2  # PEFT's lora_alpha=8 over r=2
    np.testing.assert_allclose(residual + scaling * lora["lora_a"]["kernel"] @ lora["lora_b"]["kernel"], kept,
                               atol=1e-5)
    assert float(jnp.abs(residual - kept).max()) > 0.1
    np.testing.assert_allclose(adapted.apply(variables, x), model.apply(params, x), atol=1e-5)
    # Adapters already present are kept, and the residual is not taken twice.
    again = ja.init_adapters(adapted, variables, jax.random.key(3), x)
    np.testing.assert_array_equal(again["params"]["fc"]["kernel"], residual)
    # Trained, then converted: a plain LoRA of rank 4 on the original weights, same model.
    trained = moved(variables)
    plain, converted = residual_to_lora(adapted, trained, variables, params)
    assert plain.get_adapter("x").adapter.rank == 4 and plain.get_adapter("x").adapter.init_weights == "default"
    np.testing.assert_array_equal(converted["params"]["fc"]["kernel"], kept)
    np.testing.assert_allclose(plain.apply(converted, x), adapted.apply(trained, x), atol=1e-5)


def test_residual_inits_inside_nn_scan_take_each_layers_own_residual():
    import sys, os

    sys.path.insert(0, os.path.dirname(__file__))
    from architectures.zoo import GPT

    model, params = GPT.built()
    ids = GPT.inputs(0)[0]
    adapted = ja.with_adapters(model, GPT.preset).add_adapter("x", ja.LoraConfig(r=2, init_lora_weights="pissa",
                                                                                  target_modules=("ffn_output",)))
    variables = ja.init_adapters(adapted, params, jax.random.key(1), ids)
    kernel = variables["params"]["layers"]["fc_out"]["kernel"]
    lora = variables["params"]["layers"]["fc_out"]["__adapters__"]["x"]
    original = params["params"]["layers"]["fc_out"]["kernel"]
    assert kernel.shape == original.shape == (2, 24, 16)
    for layer in range(2):
        a, b = lora["lora_a"]["kernel"][layer], lora["lora_b"]["kernel"][layer]
        np.testing.assert_allclose(kernel[layer] + (8 / 2) * a @ b, original[layer], atol=1e-5)
    np.testing.assert_allclose(adapted.apply(variables, ids), model.apply(params, ids), atol=1e-5)


def test_lora_on_a_grouped_conv_is_peft_s_and_cannot_merge():
    conv = nn.Conv(4, (3,), feature_group_count=2)
    x = jax.random.normal(jax.random.key(0), (2, 5, 4))
    params = conv.init(jax.random.key(1), x)
    adapted = ja.with_adapters(conv, {"c": ""}).add_adapter("x", ja.LoRA(rank=2))
    variables = moved(ja.init_adapters(adapted, params, jax.random.key(2), x))
    lora = variables["params"]["__adapters__"]["x"]
    assert lora["lora_a"]["kernel"].shape == (3, 4, 2) and lora["lora_b"]["kernel"].shape == (1, 1, 4)
    assert float(jnp.abs(adapted.apply(variables, x) - conv.apply(params, x)).max()) > 1e-3
    with pytest.raises(ja.AdapterError, match="adapter 'x' at '': LoRA on the grouped Conv .* cannot be folded"):
        ja.merge_adapters(adapted, variables, x)
    odd = ja.with_adapters(conv, {"c": ""}).add_adapter("x", ja.LoRA(rank=3))
    with pytest.raises(ja.AdapterError, match=r"the rank \(3\) and the output channels \(4\) must be multiples of 2"):
        ja.init_adapters(odd, params, jax.random.key(2), x)


def test_lora_configs_by_name_and_their_errors():
    assert parse_method("dora[r=4]") == ja.LoraConfig(r=4, use_dora=True)
    with pytest.raises(ValueError, match="lora_bias=True needs the default"):  # checked when the config is made
        parse_method("lora[r=4,bias='lora_only',lora_bias=True,init_lora_weights='OLoRA']")
    assert parse_method("lora[init_lora_weights='pissa']").adapter().rewrites_base
    assert ja.LoraConfig(rank_pattern={"layer.1.value": 6}).adapter().rank_and_alpha("enc/layer/1/value") == (6, 8.0)
    with pytest.raises(ValueError, match="bias='all' trains every bias of the model in PEFT"):
        parse_method("lora[bias='all']")
    with pytest.raises(ValueError, match="init_lora_weights must be True, False, 'gaussian', 'pissa' or 'olora'"):
        ja.LoraConfig(init_lora_weights="loftq")
    with pytest.raises(ValueError, match="lora_bias=True is not supported with DoRA"):
        ja.LoraConfig(use_dora=True, lora_bias=True)
    with pytest.raises(ValueError, match=r"bias must be one of \('none', 'lora_only'\)"):
        ja.LoRA(bias="some")


def test_embedding_lora_refuses_biases_and_residual_inits():
    embed = nn.Embed(7, 4)
    params = embed.init(jax.random.key(0), IDS)
    for adapter, message in [(ja.LoRA(rank=2, lora_bias=True), "an embedding has no bias"),
                             (ja.LoRA(rank=2, init_weights="pissa"), "init 'pissa' supports linear layers only")]:
        adapted = ja.with_adapters(embed, {"e": ""}).add_adapter("x", adapter)
        with pytest.raises(ja.AdapterError, match=message):
            ja.init_adapters(adapted, params, jax.random.key(1), IDS)


def test_a_vera_checkpoint_holds_the_seed_and_the_vectors_not_the_projections(tmp_path):
    """The frozen projections are regenerated from projection_prng_key: saved, only d and b per layer."""
    x = jax.random.normal(jax.random.key(0), (3, 5))
    base = nn.Dense(4)
    params = base.init(jax.random.key(1), x)
    adapted = ja.with_adapters(base, {"d": ""}).add_adapter("v", ja.VeraConfig(r=3, target_modules="d",
                                                                               projection_prng_key=7))
    variables = moved(ja.init_adapters(adapted, params, jax.random.key(2), x))
    adapter_leaves = jax.tree_util.tree_leaves(ja.split_adapters(variables)[0])
    assert sorted(leaf.shape for leaf in adapter_leaves) == [(3,), (4,)]  # lambda_d (r,), lambda_b (out,)
    ja.save_adapters(tmp_path / "vera", adapted, variables)
    loaded, loaded_vars = ja.load_adapters(tmp_path / "vera", ja.with_adapters(base, {"d": ""}), params)
    assert loaded.get_adapter("v").config.projection_prng_key == 7
    np.testing.assert_array_equal(loaded.apply(loaded_vars, x), adapted.apply(variables, x))
    other = ja.with_adapters(base, {"d": ""}).add_adapter("v", ja.VeraConfig(r=3, target_modules="d"))
    assert float(jnp.abs(other.apply(variables, x) - adapted.apply(variables, x)).max()) > 1e-3  # another seed
