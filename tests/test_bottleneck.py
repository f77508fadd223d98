"""Bottleneck adapters and Compacter: the network, the PHM layer, the shared rule, placement inside residual blocks."""

from __future__ import annotations

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import jadapters
from jadapters import Bottleneck, Preset
from jadapters.adapters.bottleneck import PHMLayer
from jadapters.blocks import ResidualBlock
from jadapters.adapters.bottleneck import CONSTANTS, PHMRule
from jadapters.blocks import InResidualBlock
from jadapters.configs import parse_method
from jadapters.presets import ATTENTION_BLOCK, FFN_BLOCK

D = 8


def randomized(variables, seed=0, scale=0.3):
    """Every adapter leaf moved off its init, so that zero-initialised weights hide nothing."""
    rng = np.random.default_rng(seed)
    adapters, rest = jadapters.split_adapters(variables)
    moved = jax.tree_util.tree_map(lambda a: a + scale * rng.standard_normal(a.shape).astype(a.dtype), adapters)
    return jadapters.merge_trees(rest, moved)


def moved(variables, seed=0, scale=0.3):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda a: a + scale * rng.standard_normal(a.shape).astype(a.dtype), variables)


def dense(p, v):
    return v @ np.asarray(p["kernel"]) + np.asarray(p["bias"])


# ----------------------------------------------------------------------------- the network


def test_bottleneck_width_and_initialisations():
    x = jnp.ones((2, 3, 256))

    @jax.jit
    def inits(key):
        make = lambda init: Bottleneck(reduction_factor=4, init_weights=init, use_gating=True)
        out = {init: make(init).init(key, x)["params"] for init in ("bert", "mam_adapter", "houlsby")}
        out["2.5"] = Bottleneck(reduction_factor=2.5).init(key, x)["params"]
        out["32"] = Bottleneck(reduction_factor=32).init(key, jnp.ones((1, 16)))["params"]
        return out

    params = inits(jax.random.key(0))
    assert params["2.5"]["adapter_down"]["kernel"].shape == (256, 102)  # int(256 // 2.5)
    assert params["32"]["adapter_down"]["kernel"].shape == (16, 1)  # at least 1
    bert = params["bert"]
    for layer in ("adapter_down", "adapter_up", "gate"):
        assert abs(float(jnp.std(bert[layer]["kernel"])) - 0.02) < 0.002 and not bert[layer]["bias"].any()
    mam = params["mam_adapter"]
    bound = 1 / 256**0.5  # Kaiming-uniform with a = sqrt(5): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert 0.95 * bound < float(jnp.abs(mam["adapter_down"]["kernel"]).max()) <= bound
    assert not mam["adapter_up"]["kernel"].any() and not mam["adapter_up"]["bias"].any()
    houlsby = params["houlsby"]
    for layer in ("adapter_down", "adapter_up"):  # a normal of std 0.01 truncated at 2 std: std 0.0088
        kernel = houlsby[layer]["kernel"]
        assert float(jnp.abs(kernel).max()) <= 0.02 and abs(float(jnp.std(kernel)) - 0.0088) < 0.001
    assert houlsby["gate"]["bias"].any()  # AdapterHub leaves the gate at PyTorch's default init there


OPTIONS = [
    dict(),
    dict(ln_before=True, scaling="learned", non_linearity="swish"),
    dict(ln_after=True, adapter_residual_before_ln=True, scaling="channel", use_gating=True, non_linearity="gelu_new"),
    dict(ln_after=True, use_gating=True, scaling=0.5, non_linearity="tanh"),
]


def test_bottleneck_forward():
    """``[LN] -> down -> act -> up -> * scaling [* mean gate] (+ residual, before or after the adapter's own LN)``."""
    x = jax.random.normal(jax.random.key(1), (3, 5, D))
    residual = jax.random.normal(jax.random.key(2), (3, 5, D))
    adapters = [Bottleneck(reduction_factor=2, **options) for options in OPTIONS]
    initial = jax.jit(lambda key: [a.init(key, x, residual) for a in adapters])(jax.random.key(0))
    all_variables = [moved(v, seed=i) for i, v in enumerate(initial)]
    outputs = jax.jit(lambda vs: [(a.apply(v, x, residual, mutable=["intermediates"]), a.apply(v, x))
                                  for a, v in zip(adapters, vs)])(all_variables)
    for adapter, variables, ((got, state), alone) in zip(adapters, all_variables, outputs):
        p = variables["params"]
        act = {"relu": jax.nn.relu, "swish": jax.nn.silu, "tanh": jnp.tanh,
               "gelu_new": lambda v: jax.nn.gelu(v, approximate=True)}[adapter.non_linearity]
        norm = lambda name, v: nn.LayerNorm(epsilon=1e-5).apply({"params": p[name]}, v)
        h = norm("adapter_norm_before", x) if adapter.ln_before else x
        out = dense(p["adapter_up"], act(dense(p["adapter_down"], h)))
        out = out * (np.asarray(p["scaling"]) if isinstance(adapter.scaling, str) else adapter.scaling)
        if adapter.use_gating:
            out = out * jax.nn.sigmoid(dense(p["gate"], x)).mean(axis=1, keepdims=True)
        if adapter.adapter_residual_before_ln:
            out = out + residual
        if adapter.ln_after:
            out = norm("adapter_norm_after", out)
        if not adapter.adapter_residual_before_ln:
            out = out + residual
        np.testing.assert_allclose(got, out, atol=1e-5, rtol=1e-5, err_msg=str(adapter))
        assert ("gate_score" in state.get("intermediates", {})) == adapter.use_gating
        if not (adapter.ln_after and adapter.adapter_residual_before_ln):  # else the residual goes through the LN
            np.testing.assert_allclose(alone + residual, got, atol=1e-5)


def test_the_gate_is_a_mean_over_every_position_padding_included():
    adapter = Bottleneck(reduction_factor=2, use_gating=True)
    x = jax.random.normal(jax.random.key(1), (2, 4, D))
    variables = moved(jax.jit(adapter.init)(jax.random.key(0), x))
    _, state = jax.jit(lambda v: adapter.apply(v, x, mutable=["intermediates"]))(variables)
    p = variables["params"]["gate"]
    expected = jax.nn.sigmoid(x @ p["kernel"] + p["bias"])[..., 0].mean(axis=1)
    np.testing.assert_allclose(state["intermediates"]["gate_score"][0], expected, rtol=1e-6)


def test_stochastic_depth_drops_whole_samples_in_training_only():
    adapter = Bottleneck(reduction_factor=2, stochastic_depth=0.5, init_weights="houlsby")
    x = jax.random.normal(jax.random.key(1), (64, 3, D))
    variables = moved(jax.jit(adapter.init)(jax.random.key(0), x))
    full, dropped = jax.jit(lambda v: (adapter.apply(v, x), adapter.apply(
        v, x, deterministic=False, rngs={"dropout": jax.random.key(2)})))(variables)
    kept = jnp.abs(dropped).reshape(64, -1).max(axis=1) > 0
    assert 10 < int(kept.sum()) < 54
    np.testing.assert_allclose(dropped[kept], 2 * full[kept], rtol=1e-6)  # rescaled by 1 / (1 - p)


@pytest.mark.parametrize("fields, message", [
    (dict(reduction_factor=0), r"reduction_factor must be a number > 0, got 0"),
    (dict(non_linearity="swishy"), r"unknown activation 'swishy'"),
    (dict(init_weights="xavier"), r"init_weights must be one of \('bert', 'mam_adapter', 'houlsby'\), got 'xavier'"),
    (dict(scaling="vector"), r"scaling must be a number, 'learned' or 'channel', got 'vector'"),
    (dict(stochastic_depth=1.5), r"stochastic_depth must be a number in \[0, 1\], got 1.5"),
    (dict(phm_layer=True, init_weights="mam_adapter"), r"PHM layers \(phm_layer=True\) use phm_c_init"),
    (dict(phm_layer=True, phm_c_init="zeros"), r"phm_c_init must be one of \('normal', 'uniform'\)"),
])
def test_bottleneck_settings_are_checked(fields, message):
    with pytest.raises(ValueError, match=message):
        Bottleneck(**fields)


# ----------------------------------------------------------------------------- PHM


@pytest.mark.parametrize("factorized_w, factorized_rule", [(True, False), (False, True)])
def test_phm_layer_is_a_sum_of_kronecker_products(factorized_w, factorized_rule):
    layer = PHMLayer(12, phm_dim=2, phm_rank=2, factorized_phm_W=factorized_w, shared_phm_rule=False,
                     factorized_phm_rule=factorized_rule)
    x = jax.random.normal(jax.random.key(1), (3, 8))
    variables = moved(jax.jit(layer.init)(jax.random.key(0), x))
    p = {k: np.asarray(v) for k, v in variables["params"].items()}
    w = p["W_left"] @ p["W_right"] if factorized_w else p["W"]
    rule = p["phm_rule_left"] @ p["phm_rule_right"] if factorized_rule else p["phm_rule"]
    assert w.shape == (2, 4, 6) and rule.shape == (2, 2, 2)
    kernel = sum(np.kron(rule[i], w[i]) for i in range(2))
    np.testing.assert_allclose(jax.jit(layer.apply)(variables, x), np.asarray(x) @ kernel + p["b"], rtol=1e-5, atol=1e-6)


def test_phm_initialisation_and_errors():
    x = jnp.ones((1, 16))
    params = PHMLayer(16, hypercomplex_nonlinearity="glorot-uniform").init(jax.random.key(0), x, jnp.ones((4, 4, 4)))
    left = params["params"]["W_left"]  # (4, 4, 1): glorot over each (4, 1) matrix: bound sqrt(6 / 5)
    assert left.shape == (4, 4, 1) and float(jnp.abs(left).max()) <= (6 / 5) ** 0.5 and not params["params"]["b"].any()
    rule = PHMRule(phm_dim=4, phm_init_range=1e-4).init(jax.random.key(0))["params"]["phm_rule"]
    assert float(jnp.abs(rule).max()) < 1e-3
    with pytest.raises(ValueError, match="the input width 10 is not divisible by phm_dim 4"):
        PHMLayer(16).init(jax.random.key(0), jnp.ones((1, 10)), jnp.ones((4, 4, 4)))
    with pytest.raises(ValueError, match="needs the shared rule: pass rule="):
        PHMLayer(16).init(jax.random.key(0), x)


# ----------------------------------------------------------------------------- placement in residual blocks


class PostLN(nn.Module):
    """BERT's BertOutput: ``LayerNorm(dropout(dense(h)) + x)``, x the second argument."""

    @nn.compact
    def __call__(self, h, x):
        h = nn.Dropout(0.1, deterministic=True, name="dropout")(nn.Dense(D, name="dense")(h))
        return nn.LayerNorm(name="LayerNorm")(h + x)


class PreLN(nn.Module):
    """GPT-2's feed-forward sub-block: ``x + mlp(ln(x))``."""

    @nn.compact
    def __call__(self, x):
        return x + nn.Dense(D, name="mlp")(nn.LayerNorm(name="ln")(x))


class Toy(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = PostLN(name="post")(jnp.tanh(x), x)
        return PreLN(name="pre")(x)


TOY = Preset.make("toy", {}, sites={
    FFN_BLOCK: ResidualBlock(["post", "pre"], "dropout", layer_norm="LayerNorm"),
})
TOY_SITES = {
    "post": ResidualBlock("post", "dropout", layer_norm="LayerNorm", residual=1),
    "pre": ResidualBlock("pre", "mlp", residual="ln"),
}


def adapterhub_reference(h, x, adapter, layer_norm, before, after, residual_before_ln, parallel):
    """AdapterHub 1.3's pre_forward, adapter and post_forward, as its README states them (LN None: pre-LN)."""
    if parallel:
        out = adapter(x) + h
    else:
        residual = h if residual_before_ln is True else None
        inp = h
        if before:
            inp = h + x
            residual = inp if residual_before_ln == "post_add" else residual
            inp = layer_norm(inp) if layer_norm else inp
        residual = inp if residual_before_ln is False else residual
        out = adapter(inp) + residual
    if after:
        return layer_norm(out + x) if layer_norm else out + x
    return out


@pytest.mark.parametrize("where", ["post", "pre"])
def test_every_combination_of_adapterhubs_options_in_a_post_ln_and_a_pre_ln_block(where):
    model, x = Toy(), jax.random.normal(jax.random.key(0), (2, 3, D))
    base = moved(model.init(jax.random.key(1), x), seed=5, scale=0.2)
    preset = Preset.make("toy", {}, sites={FFN_BLOCK: TOY_SITES[where]})
    combinations = [
        options for options in itertools.product([True, False], [True, False], [True, False, "post_add"], [False, True])
        if not (options[2] == "post_add" and not options[0])  # post_add needs original_ln_before
        and not (options[3] and (options[0] or options[2] is not True))  # these do nothing when parallel
    ]
    models = [
        jadapters.with_adapters(model, preset).add_adapter("a", jadapters.BnConfig(
            reduction_factor=2, original_ln_before=before, original_ln_after=after, residual_before_ln=rbl,
            is_parallel=parallel))
        for before, after, rbl, parallel in combinations
    ]
    variables = randomized(jadapters.init_adapters(models[0], base, jax.random.key(2), x))  # the same for all
    outputs = jax.jit(lambda v: [m.apply(v, x) for m in models])(variables)

    v = variables["params"]
    a = v[where]["__adapters__"]["a"]
    adapter = lambda t: dense(a["adapter_up"], jax.nn.relu(dense(a["adapter_down"], t)))
    post_ln = lambda t: nn.LayerNorm().apply({"params": v["post"]["LayerNorm"]}, t)
    pre_block = lambda t: PreLN().apply({"params": base["params"]["pre"]}, t)
    after_post = PostLN().apply({"params": base["params"]["post"]}, jnp.tanh(x), x)
    for options, got in zip(combinations, outputs):
        if where == "post":
            h = dense(v["post"]["dense"], jnp.tanh(x))
            expected = pre_block(adapterhub_reference(h, x, adapter, post_ln, *options))
        else:
            h = dense(v["pre"]["mlp"], nn.LayerNorm().apply({"params": v["pre"]["ln"]}, after_post))
            expected = adapterhub_reference(h, after_post, adapter, None, *options)
        np.testing.assert_allclose(got, expected, atol=2e-5, rtol=1e-5, err_msg=str(options))
    assert len(combinations) == 12


class ScanBlock(nn.Module):
    """A pre-LN block with two sub-blocks, GPT-2's layout, without attention."""

    @nn.compact
    def __call__(self, x, _):
        x = x + nn.Dense(D, name="attn")(nn.LayerNorm(name="ln_1")(x))
        return x + nn.Dense(D, name="mlp")(nn.LayerNorm(name="ln_2")(x)), None


class Scanned(nn.Module):
    @nn.compact
    def __call__(self, x):
        layers = nn.scan(nn.remat(ScanBlock), variable_axes={"params": 0}, split_rngs={"params": True}, length=2)
        return layers(name="layers")(x, None)[0]


SCANNED = Preset.make("scanned", {}, sites={
    ATTENTION_BLOCK: ResidualBlock("layers", "attn", residual="ln_1"),
    FFN_BLOCK: ResidualBlock("layers", "mlp", residual="ln_2"),
})


def test_compacter_in_a_scan_one_rule_for_every_layer_and_position_separate_weights_per_site():
    model, x = Scanned(), jax.random.normal(jax.random.key(0), (2, 3, D))
    base = model.init(jax.random.key(1), x)
    adapted = jadapters.with_adapters(model, SCANNED).add_adapter("a", "compacter[reduction_factor=2]")
    variables = randomized(jadapters.init_adapters(adapted, base, jax.random.key(2), x), scale=0.1)
    shapes = {"/".join(p): leaf.shape for p, leaf in traverse_util.flatten_dict(variables["params"]).items()
              if "__adapters__" in p}
    # One module holds both sub-blocks: one adapter, a set of weights per site, stacked over the 2 layers.
    assert shapes["layers/__adapters__/a/attention_block/adapter_down/W_left"] == (2, 4, 2, 1)
    assert shapes["layers/__adapters__/a/ffn_block/adapter_up/W_right"] == (2, 4, 1, 2)
    # One rule, outside the scan: not stacked, not a placement.
    assert [p for p in shapes if "phm_rule" in p] == ["__adapters__/a/__shared__/phm_rule"]
    assert shapes["__adapters__/a/__shared__/phm_rule"] == (4, 4, 4)
    assert jadapters.tree.adapter_locations(variables) == {"a": ["layers"]}

    def loss_of_rule(rule, layer_1_scale):
        """The loss with the rule replaced and layer 1's PHM weights scaled."""
        flat = traverse_util.flatten_dict(variables)
        flat[("params", "__adapters__", "a", "__shared__", "phm_rule")] = rule
        for path in flat:
            if path[:4] == ("params", "layers", "__adapters__", "a"):
                flat[path] = flat[path].at[1].multiply(layer_1_scale)
        return jnp.mean(adapted.apply(traverse_util.unflatten_dict(flat), x) ** 2)

    rule = variables["params"]["__adapters__"]["a"]["__shared__"]["phm_rule"]
    both, first_only = jax.jit(jax.vmap(jax.grad(loss_of_rule), (None, 0)))(rule, jnp.array([1.0, 0.0]))
    # Every layer's gradient reaches the one rule: silencing layer 1 changes it.
    assert float(jnp.abs(both).max()) > 0 and float(jnp.abs(both - first_only).max()) > 1e-7


def test_a_rule_that_does_not_learn_is_a_constant_that_training_leaves_out():
    model, x = Toy(), jax.random.normal(jax.random.key(0), (2, 3, D))
    base = model.init(jax.random.key(1), x)
    preset = Preset.make("toy", {}, sites={FFN_BLOCK: TOY_SITES["post"]})
    adapted = jadapters.with_adapters(model, preset).add_adapter("a", "compacter++[reduction_factor=2,learn_phm=False]")
    variables = jadapters.init_adapters(adapted, base, jax.random.key(2), x)
    assert set(variables[CONSTANTS]["__adapters__"]["a"]["__shared__"]) == {"phm_rule"}
    trainable, frozen = jadapters.partition(adapted, variables)
    assert "__shared__" not in str(jax.tree_util.tree_structure(trainable)) and CONSTANTS in frozen
    assert set(trainable["params"]["post"]["__adapters__"]["a"]["adapter_down"]) == {"W_left", "W_right", "b"}


def test_shared_variables_missing_from_apply_is_an_error():
    model, x = Toy(), jnp.ones((1, 2, D))
    base = model.init(jax.random.key(1), x)
    adapted = jadapters.with_adapters(model, Preset.make("toy", {}, sites={FFN_BLOCK: TOY_SITES["post"]}))
    adapted = adapted.add_adapter("a", "compacter++[reduction_factor=2]")
    variables = jadapters.init_adapters(adapted, base, jax.random.key(2), x)
    del variables["params"]["__adapters__"]
    with pytest.raises(jadapters.AdapterError, match=r"adapter 'a': its shared variables are not in the variables"):
        adapted.apply(variables, x)


def test_gates_are_not_recorded_while_variables_are_created():
    model, x = Toy(), jnp.ones((1, 2, D))
    adapted = jadapters.with_adapters(model, Preset.make("toy", {}, sites={FFN_BLOCK: TOY_SITES["post"]}))
    adapted = adapted.add_adapter("a", "seq_bn[reduction_factor=2,use_gating=True]")
    variables = jadapters.init_adapters(adapted, model.init(jax.random.key(1), x), jax.random.key(2), x)
    assert set(variables) == {"params"}


# ----------------------------------------------------------------------------- layers left out, errors


def test_leave_out_excludes_exactly_those_layer_numbers():
    site = ResidualBlock(r"re:(.*/)?layer/{layer}/output", "dropout", layer_norm="LayerNorm")
    (target,) = site.targets(leave_out=(1, 3))
    matches = lambda i: jadapters.naming.path_matches(f"encoder/layer/{i}/output", target)
    assert [i for i in range(14) if matches(i)] == [0, 2, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]
    assert site.matches("encoder/layer/1/output") and not site.matches("encoder/layer/1/attention/output")


def test_clear_errors():
    model, x = Scanned(), jnp.ones((1, 2, D))
    base = model.init(jax.random.key(0), x)
    adapted = jadapters.with_adapters(model, SCANNED)
    with pytest.raises(jadapters.AdapterError, match=r"adapter 'a': method 'seq_bn' needs the site 'cross_attention_block', "
                                                      r"which this model's preset \(scanned\) does not describe"):
        adapted.add_adapter("a", "seq_bn[cross_adapter=True]")
    with pytest.raises(jadapters.AdapterError, match=r"method 'seq_bn' on the preset 'scanned': leave_out needs the "
                                                      r"layer number in every block path.*inside nn.scan"):
        adapted.add_adapter("a", "seq_bn[leave_out=[1]]")
    with pytest.raises(jadapters.AdapterError, match=r"leave_out applies where the method places itself"):
        adapted.add_adapter("a", "seq_bn[leave_out=[1]]", targets="layers")
    wrong = adapted.add_adapter("a", "seq_bn", targets="layers/mlp")
    with pytest.raises(jadapters.AdapterError, match=r"adapter 'a' at 'layers/mlp': this module is none of the "
                                                      r"residual blocks the adapter works in \(ffn_block: \['layers'\]\)"):
        jadapters.init_adapters(wrong, base, jax.random.key(0), x)
    never = Preset.make("scanned", {}, sites={FFN_BLOCK: ResidualBlock("layers", "no_such_child", residual="ln_2")})
    never = jadapters.with_adapters(model, never).add_adapter("a", "seq_bn")
    with pytest.raises(jadapters.AdapterError, match=r"\(site 'ffn_block'\): the block never called its child "
                                                      r"'no_such_child', so the adapter did not run"):
        jadapters.init_adapters(never, base, jax.random.key(0), x)
    late = Preset.make("scanned", {}, sites={FFN_BLOCK: ResidualBlock("layers", "attn", residual="ln_2")})
    late = jadapters.with_adapters(model, late).add_adapter("a", "seq_bn")
    with pytest.raises(jadapters.AdapterError, match=r"the child 'ln_2' that gives the residual did not run before 'attn'"):
        jadapters.init_adapters(late, base, jax.random.key(0), x)
    shared = Preset.make("scanned", {}, sites={ATTENTION_BLOCK: ResidualBlock("layers", "attn", residual="ln_1"),
                                               FFN_BLOCK: ResidualBlock("layers", "attn", residual="ln_2")})
    shared = jadapters.with_adapters(model, shared).add_adapter("a", "double_seq_bn")
    with pytest.raises(jadapters.AdapterError, match=r"two sites of this module use its child 'attn'"):
        jadapters.init_adapters(shared, base, jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"\{layer\} may appear only in regex targets"):
        ResidualBlock("layer_{layer}", "dropout")
    with pytest.raises(ValueError, match=r"residual_before_ln must be True, False or 'post_add', got 'pre'"):
        InResidualBlock(((FFN_BLOCK, TOY_SITES["pre"]),), residual_before_ln="pre")


# ----------------------------------------------------------------------------- configs by name


def test_configs_by_name_with_adapterhubs_presets_and_aliases():
    assert parse_method("pfeiffer") == parse_method("seq_bn") == jadapters.SeqBnConfig()
    assert parse_method("houlsby") == jadapters.DoubleSeqBnConfig()
    assert parse_method("compacter").reduction_factor == 32 and parse_method("compacter").phm_layer
    assert parse_method("compacter++") == jadapters.CompacterPlusPlusConfig()
    config = parse_method("double_seq_bn[reduction_factor=8,leave_out=[3,1],non_linearity=gelu]")
    assert (config.reduction_factor, config.leave_out, config.non_linearity) == (8, (1, 3), "gelu")
    assert config.site_names == (ATTENTION_BLOCK, FFN_BLOCK)
    assert jadapters.BnConfig(mh_adapter=True, cross_adapter=True).site_names == (
        ATTENTION_BLOCK, "cross_attention_block", FFN_BLOCK)
    assert parse_method("seq_bn[non_linearity='ReLU']").adapter().non_linearity == "relu"


@pytest.mark.parametrize("override, message", [
    ("seq_bn[reduction=8]", r"method 'seq_bn' has no option\(s\) \['reduction'\]"),
    ("seq_bn[inv_adapter='nice']", r"invertible adapters \(inv_adapter='nice'\) are not supported"),
    ("compacter[shared_W_phm=True]", r"shared_W_phm=True .* is not supported"),
    ("seq_bn[reduction_factor={'default': 16}]", r"reduction_factor as a per-layer mapping is not supported"),
    ("seq_bn[output_adapter=False]", r"the adapter goes nowhere"),
    ("seq_bn[leave_out=[-1]]", r"leave_out must be a list of layer numbers"),
    ("seq_bn[residual_before_ln='pre_add']", r"residual_before_ln must be True, False or 'post_add'"),
    ("double_seq_bn[residual_before_ln='post_add']", r"post_add.*set original_ln_before=True"),
])
def test_config_errors(override, message):
    with pytest.raises(ValueError, match=message):
        parse_method(override)


def test_a_bfloat16_base_with_adapters_in_its_layernorm():
    model, x = Toy(), jax.random.normal(jax.random.key(0), (2, 3, D)).astype(jnp.bfloat16)
    base = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), model.init(jax.random.key(1), x))
    preset = Preset.make("toy", {}, sites={FFN_BLOCK: TOY_SITES["post"]})
    adapted = jadapters.with_adapters(model, preset).add_adapter("a", "seq_bn[reduction_factor=2]")
    variables = randomized(jadapters.init_adapters(adapted, base, jax.random.key(2), x))
    out, reference = jax.jit(lambda v: (adapted.apply(v, x), model.apply(base, x)))(variables)
    assert out.dtype == jnp.bfloat16 and bool(jnp.isfinite(out.astype(jnp.float32)).all())
    assert float(jnp.abs(out.astype(jnp.float32) - reference.astype(jnp.float32)).max()) > 1e-2
