"""with_adapters: placement, naming, enabling, identity, jit, scan/remat, setup-style, errors."""

import functools
import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jadapters as ja
from models import DropoutBNModel, EncoderDecoder, LinearBN, ScannedStack, SimpleModel, perturb_adapters

X = jax.random.normal(jax.random.key(0), (2, 50))
BLOCKS = {"encoder": "encoder/layers_*", "decoder": "decoder/layers_*"}


def adapter_paths(variables):
    return {name: sorted(paths) for name, paths in ja.tree.adapter_locations(variables).items()}


# ---- module level (NeMo's fixture: Linear -> BatchNorm) -----------------------------------

@pytest.fixture(scope="module")
def fixture_base():
    base = LinearBN()
    return base, base.init(jax.random.key(0), X)


@pytest.mark.parametrize("norm_position", ["pre", "post"])
@pytest.mark.parametrize("count", [1, 2])
def test_fresh_adapters_keep_the_base_output_bitwise(fixture_base, norm_position, count):
    base, base_vars = fixture_base
    model = ja.with_adapters(base, {"module": ""})
    for i in range(count):
        model = model.add_adapter(f"adapter_{i}", ja.LinearAdapter(dim=100, norm_position=norm_position))
    variables = ja.init_adapters(model, base_vars, jax.random.key(1), X)
    chex.assert_trees_all_equal(model.apply(variables, X), base.apply(base_vars, X))


def test_parameter_count_grows_with_each_adapter(fixture_base):
    base, base_vars = fixture_base
    model = ja.with_adapters(base, {"module": ""})
    counts = [ja.count_parameters(base_vars["params"])]
    for i in range(2):
        model = model.add_adapter(f"adapter_{i}", ja.LinearAdapter(dim=10))
        counts.append(ja.count_parameters(ja.init_adapters(model, base_vars, jax.random.key(1), X)["params"]))
    assert counts[0] == 2650  # NeMo's figure: Linear(50, 50) + BatchNorm(50) scale and bias
    per_adapter = 50 * 10 + 10 * 50 + 2 * 50
    assert counts == [2650, 2650 + per_adapter, 2650 + 2 * per_adapter]
    adapters, base_only = ja.split_adapters(ja.init_adapters(model, base_vars, jax.random.key(1), X))
    assert ja.count_parameters(base_only["params"]) == 2650
    assert ja.count_parameters(adapters) == 2 * per_adapter


def test_disabling_one_of_two(fixture_base):
    base, base_vars = fixture_base
    model = ja.with_adapters(base, {"module": ""})
    model = model.add_adapter("adapter_0", ja.LinearAdapter(10)).add_adapter("adapter_1", ja.LinearAdapter(10))
    variables = ja.init_adapters(model, base_vars, jax.random.key(1), X)
    off0 = model.set_enabled_adapters("adapter_0", enabled=False)
    assert off0.get_enabled_adapters() == ["adapter_1"]
    assert model.get_enabled_adapters() == ["adapter_0", "adapter_1"]  # the original is untouched
    chex.assert_trees_all_equal(off0.apply(variables, X), base.apply(base_vars, X))
    assert off0.is_adapter_available() and not ja.with_adapters(base).is_adapter_available()
    assert off0.set_enabled_adapters(enabled=False).is_adapter_available()


def test_init_adapters_creates_only_the_adapter_subtree(fixture_base):
    base, base_vars = fixture_base
    calls = []

    def counting_init(key, shape, dtype=jnp.float32):
        # fires only when the initialiser really executes (Flax's apply-time
        # shape check runs it under eval_shape, which computes nothing)
        jax.debug.callback(lambda: calls.append(shape))
        return jnp.zeros(shape, dtype)

    class Watched(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(50, kernel_init=counting_init, name="fc")(x)

    watched_vars = Watched().init(jax.random.key(0), X)
    assert calls == [(50, 50)]
    calls.clear()
    model = ja.with_adapters(Watched(), {"m": "fc"}).add_adapter("a", ja.LinearAdapter(4))
    variables = ja.init_adapters(model, watched_vars, jax.random.key(1), X)
    assert calls == []  # the base initialiser never ran
    assert variables["params"]["fc"]["kernel"] is watched_vars["params"]["fc"]["kernel"]  # shared, not copied
    assert set(variables["params"]["fc"]) == {"kernel", "bias", "__adapters__"}
    assert "__adapters__" not in watched_vars["params"]["fc"]  # the caller's tree is unchanged


def test_init_adapters_keeps_adapters_already_present(fixture_base):
    base, base_vars = fixture_base
    model = ja.with_adapters(base, {"module": ""}).add_adapter("a", ja.LinearAdapter(4))
    trained = perturb_adapters(ja.init_adapters(model, base_vars, jax.random.key(1), X), jax.random.key(2))
    model = model.add_adapter("b", ja.LinearAdapter(4))
    both = ja.init_adapters(model, trained, jax.random.key(3), X)
    chex.assert_trees_all_equal(both["params"]["__adapters__"]["a"], trained["params"]["__adapters__"]["a"])
    assert "b" in both["params"]["__adapters__"]


def test_full_init_of_an_adapted_model(fixture_base):
    base, _ = fixture_base
    model = ja.with_adapters(base, {"module": "fc"}).add_adapter("a", ja.LinearAdapter(4))
    variables = model.init(jax.random.key(0), X)
    assert set(variables) == {"params", "batch_stats"}
    assert set(variables["params"]["fc"]["__adapters__"]["a"]) == {"norm", "down", "up"}


# ---- model level (encoder + decoder) ----------------------------------------------------

@pytest.fixture(scope="module")
def encdec():
    base = EncoderDecoder()
    return base, base.init(jax.random.key(0), X)


def test_module_adapter_goes_only_to_its_module(encdec):
    base, base_vars = encdec
    model = ja.with_adapters(base, {"encoder": "encoder", "decoder": "decoder"})
    model = model.add_adapter("decoder:dec_a", ja.LinearAdapter(4)).add_adapter("encoder:enc_a", ja.LinearAdapter(4))
    variables = ja.init_adapters(model, base_vars, jax.random.key(1), X)
    assert adapter_paths(variables) == {"dec_a": ["decoder"], "enc_a": ["encoder"]}
    assert model.get_enabled_adapters() == ["dec_a", "enc_a"]  # insertion order, bare names


def test_global_adapters_follow_the_global_config(encdec):
    base, base_vars = encdec
    declared = {"encoder": "encoder", "decoder": "decoder"}
    encoder_only = ja.with_adapters(base, declared, global_modules=["encoder"]).add_adapter("g", ja.LinearAdapter(4))
    both = ja.with_adapters(base, declared).add_adapter("g", ja.LinearAdapter(4))
    also_via_empty = ja.with_adapters(base, declared, global_modules=["decoder"]).add_adapter(":g", ja.LinearAdapter(4))
    assert adapter_paths(ja.init_adapters(encoder_only, base_vars, jax.random.key(1), X)) == {"g": ["encoder"]}
    assert adapter_paths(ja.init_adapters(both, base_vars, jax.random.key(1), X)) == {"g": ["decoder", "encoder"]}
    assert adapter_paths(ja.init_adapters(also_via_empty, base_vars, jax.random.key(1), X)) == {"g": ["decoder"]}


def test_global_add_with_no_global_modules_adds_no_weights(encdec):
    base, base_vars = encdec
    model = ja.with_adapters(base, {"encoder": "encoder", "decoder": "decoder"}, global_modules=[])
    model = model.add_adapter("g", ja.LinearAdapter(4))
    variables = ja.init_adapters(model, base_vars, jax.random.key(1), X)
    assert ja.count_parameters(variables) == ja.count_parameters(base_vars)
    assert model.adapter_names() == ["g"]


def test_plus_joined_module_names(encdec):
    base, base_vars = encdec
    model = ja.with_adapters(base, {"encoder": "encoder", "decoder": "decoder"}, global_modules=[])
    model = model.add_adapter("encoder+decoder:both", ja.LinearAdapter(4))
    assert adapter_paths(ja.init_adapters(model, base_vars, jax.random.key(1), X)) == {"both": ["decoder", "encoder"]}
    assert model.get_adapter("both").qualified_name == "encoder+decoder:both"


@pytest.mark.parametrize("second", ["encoder:adapter_0", "decoder:adapter_0", "adapter_0"])
def test_duplicate_names_are_rejected_model_wide(encdec, second):
    base, _ = encdec
    model = ja.with_adapters(base, {"encoder": "encoder", "decoder": "decoder"}).add_adapter("adapter_0", ja.LinearAdapter(4))
    with pytest.raises(ja.AdapterError, match=r"adapter 'adapter_0' already exists \(added as 'adapter_0', at \['encoder', 'decoder'\]\)"):
        model.add_adapter(second, ja.LinearAdapter(8))
    assert model.adapter_names() == ["adapter_0"] and model.get_adapter("adapter_0").adapter.dim == 4


def test_module_adapter_then_same_name_in_another_module_is_rejected(encdec):
    base, _ = encdec
    model = ja.with_adapters(base, {"encoder": "encoder", "decoder": "decoder"}).add_adapter("encoder:x", ja.LinearAdapter(4))
    with pytest.raises(ja.AdapterError, match=r"adapter 'x' already exists \(added as 'encoder:x', at \['encoder'\]\)"):
        model.add_adapter("decoder:x", ja.LinearAdapter(4))


def test_unknown_module_name_lists_the_valid_ones(encdec):
    base, _ = encdec
    model = ja.with_adapters(base, {"encoder": "encoder", "decoder": "decoder"})
    with pytest.raises(ja.AdapterError, match=r"adapter 'joiner:a': unknown module name 'joiner'; valid module names: \['', 'encoder', 'decoder'\]"):
        model.add_adapter("joiner:a", ja.LinearAdapter(4))


def test_unknown_adapter_name_is_a_clear_key_error(encdec):
    base, _ = encdec
    model = ja.with_adapters(base, {"encoder": "encoder"}).add_adapter("a", ja.LinearAdapter(4))
    for call in (lambda: model.set_enabled_adapters("b"), lambda: model.get_adapter("b"), lambda: model.remove_adapter("b")):
        with pytest.raises(KeyError) as info:
            call()
        assert str(info.value) == "no adapter named 'b'; the model has ['a']"
        assert isinstance(info.value, ja.UnknownAdapterError) and isinstance(info.value, ValueError)


def test_accepted_types_admit_subclasses_only(encdec):
    base, _ = encdec

    class MyLinearAdapter(ja.LinearAdapter):
        pass

    model = ja.with_adapters(base, {"encoder": "encoder", "decoder": "decoder"}, accepted_types={"encoder": MyLinearAdapter})
    model.add_adapter("encoder:ok", MyLinearAdapter(4))
    model.add_adapter("decoder:any", ja.LoRA(rank=2))
    with pytest.raises(ja.AdapterError, match=r"adapter 'no': module 'encoder' accepts only \['MyLinearAdapter'\] \(or subclasses\), got LinearAdapter"):
        model.add_adapter("encoder:no", ja.LinearAdapter(4))
    with pytest.raises(ja.AdapterError, match="module 'encoder' accepts only"):
        model.add_adapter("global_one", ja.LinearAdapter(4))  # global adapters go to the encoder too


def test_bad_adapter_values_are_rejected(encdec):
    base, _ = encdec
    model = ja.with_adapters(base, {"encoder": "encoder"})
    with pytest.raises(ja.AdapterError, match=r"adapter 'a' at \['encoder'\]: expected a flax.linen.Module instance"):
        model.add_adapter("a", ja.LinearAdapter)
    with pytest.raises(ja.AdapterError, match="invalid adapter name 'a/b'"):
        model.add_adapter("a/b", ja.LinearAdapter(4))
    with pytest.raises(ja.AdapterError, match="give either a module name"):
        model.add_adapter("encoder:a", ja.LinearAdapter(4), targets="decoder")
    with pytest.raises(ja.AdapterError, match="strategy must be a jadapters.Strategy"):
        model.add_adapter("a", ja.LinearAdapter(4), strategy=lambda *a: a)


def test_with_adapters_validates_its_declarations(encdec):
    base, _ = encdec
    with pytest.raises(ja.AdapterError, match="global module 'joiner' is not a declared module name"):
        ja.with_adapters(base, {"encoder": "encoder"}, global_modules=["joiner"])
    with pytest.raises(ja.AdapterError, match="module name 'a:b' must be a non-empty string"):
        ja.with_adapters(base, {"a:b": "encoder"})
    with pytest.raises(ja.AdapterError, match="expects a flax.linen.Module"):
        ja.with_adapters("not a model")


def test_targets_that_match_nothing_fail_at_init_naming_the_adapter(encdec):
    base, base_vars = encdec
    model = ja.with_adapters(base).add_adapter("lost", ja.LinearAdapter(4), targets="encoder/nope")
    with pytest.raises(ja.AdapterError, match=r"adapter 'lost': its targets \['encoder/nope'\] matched no module that was called; module paths called: \['', 'decoder', 'decoder/bn'"):
        ja.init_adapters(model, base_vars, jax.random.key(1), X)


def test_output_shape_mismatch_names_adapter_and_path(encdec):
    base, base_vars = encdec

    class Squash(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3)(x)

    model = ja.with_adapters(base).add_adapter("squash", Squash(), targets="decoder/fc")
    with pytest.raises(ja.AdapterError, match=r"adapter 'squash' at 'decoder/fc': its output has shape \(2, 3\), but the hooked value has \(2, 50\)"):
        ja.init_adapters(model, base_vars, jax.random.key(1), X)


def test_missing_adapter_params_name_the_adapter(encdec):
    base, base_vars = encdec
    model = ja.with_adapters(base, {"encoder": "encoder"}).add_adapter("a", ja.LinearAdapter(4))
    with pytest.raises(ja.AdapterError, match=r"adapter 'a' at 'encoder' has no params .* jadapters.init_adapters first"):
        model.apply(base_vars, X)


def test_removed_adapter_no_longer_runs(encdec):
    base, base_vars = encdec
    model = ja.with_adapters(base, {"encoder": "encoder"}).add_adapter("a", ja.LinearAdapter(4))
    variables = perturb_adapters(ja.init_adapters(model, base_vars, jax.random.key(1), X), jax.random.key(2))
    kept, dropped = ja.split_adapters(variables, ["a"])
    smaller = model.remove_adapter("encoder:a")
    assert smaller.adapter_names() == [] and model.adapter_names() == ["a"]
    chex.assert_trees_all_equal(smaller.apply(dropped, X), base.apply(base_vars, X))


# ---- targeting ----------------------------------------------------------------------------

@pytest.mark.parametrize(
    "targets, expected",
    [
        ("encoder/layers_1", ["encoder/layers_1"]),
        ("encoder/layers_*", [f"encoder/layers_{i}" for i in range(4)]),
        ("**/fc", [f"decoder/layers_{i}/fc" for i in range(2)] + [f"encoder/layers_{i}/fc" for i in range(4)]),
        (re.compile(r"decoder/layers_\d"), ["decoder/layers_0", "decoder/layers_1"]),
        ("re:(en|de)coder/layers_0", ["decoder/layers_0", "encoder/layers_0"]),
        (["encoder/layers_[02]", "projection"], ["encoder/layers_0", "encoder/layers_2", "projection"]),
    ],
)
def test_targets_by_path_glob_and_regex(targets, expected):
    base = SimpleModel()
    x = jnp.ones((2, 16))
    model = ja.with_adapters(base).add_adapter("a", ja.LinearAdapter(4), targets=targets)
    variables = ja.init_adapters(model, base.init(jax.random.key(0), x), jax.random.key(1), x)
    assert adapter_paths(variables) == {"a": sorted(expected)}


def test_chained_adapters_run_in_insertion_order():
    class Const(nn.Module):
        op: str

        def __call__(self, x):
            return x * 2 if self.op == "double" else x + 1

    x = jnp.ones((1, 2))
    base = nn.Dense(2, kernel_init=nn.initializers.zeros, bias_init=nn.initializers.ones)
    params = base.init(jax.random.key(0), x)
    one = ja.with_adapters(base, {"m": ""})
    double_then_inc = one.add_adapter("d", Const("double"), strategy=ja.ReturnResult()).add_adapter("i", Const("inc"), strategy=ja.ReturnResult())
    inc_then_double = one.add_adapter("i", Const("inc"), strategy=ja.ReturnResult()).add_adapter("d", Const("double"), strategy=ja.ReturnResult())
    assert float(double_then_inc.apply(params, x)[0, 0]) == 3.0
    assert float(inc_then_double.apply(params, x)[0, 0]) == 4.0


# ---- zero cost and static mask -------------------------------------------------------------

def test_all_disabled_forward_has_the_base_jaxpr_and_output():
    base = SimpleModel()
    x = jax.random.normal(jax.random.key(0), (4, 16))
    base_vars = base.init(jax.random.key(0), x)
    model = ja.with_adapters(base, BLOCKS).add_adapter("a", ja.LinearAdapter(4)).add_adapter("decoder:b", ja.LinearAdapter(4))
    variables = perturb_adapters(ja.init_adapters(model, base_vars, jax.random.key(1), x), jax.random.key(2))
    off = model.set_enabled_adapters(enabled=False)
    base_jaxpr = jax.make_jaxpr(base.apply)(base_vars, x)
    assert str(jax.make_jaxpr(off.apply)(base_vars, x)) == str(base_jaxpr)
    with_adapter_params = jax.make_jaxpr(off.apply)(variables, x)
    assert str(with_adapter_params.jaxpr.eqns) == str(base_jaxpr.jaxpr.eqns)  # adapter params are unused inputs
    chex.assert_trees_all_equal(jax.jit(off.apply)(variables, x), jax.jit(base.apply)(base_vars, x))
    assert not jnp.array_equal(model.apply(variables, x), base.apply(base_vars, x))


def test_a_jitted_function_never_serves_a_trace_for_another_mask():
    base = SimpleModel()
    x = jax.random.normal(jax.random.key(0), (4, 16))
    base_vars = base.init(jax.random.key(0), x)
    on = ja.with_adapters(base, BLOCKS).add_adapter("a", ja.LinearAdapter(4))
    variables = perturb_adapters(ja.init_adapters(on, base_vars, jax.random.key(1), x), jax.random.key(2))
    off = on.set_enabled_adapters(enabled=False)
    assert hash(on) != hash(off) and on != off
    assert on == off.set_enabled_adapters("a")  # same mask, same static key

    @functools.partial(jax.jit, static_argnums=0)
    def forward(model, variables, x):
        return model.apply(variables, x)

    expected_on, expected_off = jax.jit(on.apply)(variables, x), jax.jit(base.apply)(base_vars, x)
    assert not jnp.allclose(expected_on, expected_off)
    for _ in range(2):
        chex.assert_trees_all_equal(forward(on, variables, x), expected_on)
        chex.assert_trees_all_equal(forward(off, variables, x), expected_off)
    assert forward._cache_size() == 2
    chex.assert_trees_all_equal(forward(off.set_enabled_adapters("a"), variables, x), forward(on, variables, x))
    assert forward._cache_size() == 2  # an equal module reuses its trace


# ---- model styles ----------------------------------------------------------------------------

def test_setup_style_modules_get_adapters_like_compact_ones():
    x = jax.random.normal(jax.random.key(0), (2, 16))
    compact, setup_style = SimpleModel(), SimpleModel(setup_style=True)
    results = []
    for base in (compact, setup_style):
        base_vars = base.init(jax.random.key(0), x)
        model = ja.with_adapters(base, BLOCKS).add_adapter("a", ja.LinearAdapter(4)).add_adapter("l", ja.LoRA(rank=2), targets="**/fc")
        variables = ja.init_adapters(model, base_vars, jax.random.key(1), x)
        chex.assert_trees_all_equal(model.apply(variables, x), base.apply(base_vars, x))
        variables = perturb_adapters(variables, jax.random.key(3))
        results.append((adapter_paths(variables), model.apply(variables, x)))
    assert results[0][0] == results[1][0]
    assert len(results[0][0]["l"]) == 6
    chex.assert_trees_all_close(results[0][1], results[1][1], rtol=1e-5)


def test_scan_and_remat_layers_get_stacked_adapter_params():
    base = ScannedStack(dim=8, num_layers=3)
    x = jax.random.normal(jax.random.key(0), (2, 8))
    base_vars = base.init(jax.random.key(0), x)
    model = ja.with_adapters(base, {"blocks": "layers/mlp"}).add_adapter("a", ja.LinearAdapter(4))
    variables = ja.init_adapters(model, base_vars, jax.random.key(1), x)
    stacked = variables["params"]["layers"]["mlp"]["__adapters__"]["a"]
    assert stacked["down"]["kernel"].shape == (3, 8, 4) and stacked["up"]["kernel"].shape == (3, 4, 8)
    chex.assert_trees_all_equal(model.apply(variables, x), base.apply(base_vars, x))
    variables = perturb_adapters(variables, jax.random.key(2))
    # the scanned forward equals applying each layer's adapter slice by hand
    h = x
    for i in range(3):
        layer = jax.tree_util.tree_map(lambda a: a[i], variables["params"]["layers"]["mlp"])
        adapters, block = ja.split_adapters({"params": layer})
        out = base_block_apply(block, h)
        out = out + ja.LinearAdapter(4).apply({"params": adapters["params"]["__adapters__"]["a"]}, out)
        h = h + out
    chex.assert_trees_all_close(model.apply(variables, x), h, rtol=1e-5, atol=1e-6)


def base_block_apply(block_vars, h):
    from models import MLP

    return MLP(8).apply(block_vars, h)


def test_models_with_dropout_and_batchnorm():
    base = DropoutBNModel()
    x = jax.random.normal(jax.random.key(0), (4, 8))
    base_vars = base.init(jax.random.key(0), x)
    model = ja.with_adapters(base, {"bn": "bn"}).add_adapter("a", ja.LinearAdapter(4, dropout=0.3))
    variables = ja.init_adapters(model, base_vars, jax.random.key(1), x)
    chex.assert_trees_all_equal(model.apply(variables, x), base.apply(base_vars, x))
    rngs = {"dropout": jax.random.key(4)}
    out, state = model.clone(training=True).apply(variables, x, train=True, rngs=rngs, mutable=["batch_stats"])
    base_out, base_state = base.apply(base_vars, x, train=True, rngs=rngs, mutable=["batch_stats"])
    chex.assert_trees_all_equal(out, base_out)  # adapter still zero: same dropout masks, same stats
    chex.assert_trees_all_equal(state["batch_stats"], base_state["batch_stats"])


@settings(max_examples=6, deadline=None)
@given(batch=st.integers(1, 5), dim=st.integers(2, 12), adapter_dim=st.integers(1, 8), layers=st.integers(1, 3),
       norm_position=st.sampled_from(["pre", "post"]))
def test_identity_at_init_for_random_shapes(batch, dim, adapter_dim, layers, norm_position):
    base = ScannedStack(dim=dim, num_layers=layers)
    x = jax.random.normal(jax.random.key(batch), (batch, dim))
    base_vars = base.init(jax.random.key(0), x)
    model = ja.with_adapters(base).add_adapter("a", ja.LinearAdapter(adapter_dim, norm_position=norm_position), targets="layers/**")
    variables = ja.init_adapters(model, base_vars, jax.random.key(1), x)
    # The adapters add exact zeros; the scan body is compiled, so XLA may fuse it differently (ulps).
    chex.assert_trees_all_close(model.apply(variables, x), base.apply(base_vars, x), rtol=1e-6, atol=1e-6)


def test_adapter_summary_table_and_dict():
    base = SimpleModel()
    x = jnp.ones((2, 16))
    base_vars = base.init(jax.random.key(0), x)
    model = ja.with_adapters(base, BLOCKS, global_modules=["encoder"]).add_adapter("a", ja.LinearAdapter(4))
    model = model.add_adapter("decoder:b", ja.LinearAdapter(2), enabled=False)
    variables = ja.init_adapters(model, base_vars, jax.random.key(1), x)
    summary = ja.adapter_summary(model, variables)
    base_count = ja.count_parameters(base_vars)
    a_count = 4 * (16 * 4 + 4 * 16 + 2 * 16)
    assert summary.as_dict() == {
        "adapters": [
            {"name": "a", "type": "LinearAdapter", "targets": [f"encoder/layers_{i}" for i in range(4)],
             "params": a_count, "% of base": 100 * a_count / base_count, "enabled": True},
            {"name": "b", "type": "LinearAdapter", "targets": ["decoder/layers_0", "decoder/layers_1"],
             "params": 2 * (16 * 2 + 2 * 16 + 2 * 16), "% of base": 100 * 192 / base_count, "enabled": False},
        ],
        "base_params": base_count,
        "trainable_params": a_count,
        "all_params": base_count + a_count + 192,
    }
    table = str(summary).splitlines()
    assert table[0].split(" | ")[0].strip() == "name" and "% of base" in table[0]
    assert table[2].startswith("a ") and "LinearAdapter" in table[2] and "True" in table[2]
    assert table[-2].startswith("base model") and f"{base_count:,}" in table[-2]
    total = base_count + a_count + 192
    assert table[-1] == (
        f"trainable params: {a_count:,} || all params: {total:,} || trainable%: {100 * a_count / total:.4f}"
    )
    assert ja.adapter_summary(model).rows[0]["targets"] == ["encoder/layers_*"]
    assert ja.adapter_summary(model).trainable_line().startswith("trainable params: - ||")


def test_adapter_summary_lines_stay_short_for_deep_models():
    class Deep(nn.Module):
        @nn.compact
        def __call__(self, x):
            for i in range(48):
                x = nn.Dense(4, name=f"a_rather_long_block_name_number_{i}_with_a_rather_long_suffix")(x)
            return x

    x = jnp.ones((1, 4))
    model = ja.with_adapters(Deep(), {"all": "a_rather_*"}).add_adapter(
        "an_adapter_with_a_name_that_goes_on_and_on_for_quite_a_while_indeed", ja.LoRA(rank=2)
    )
    variables = ja.init_adapters(model, Deep().init(jax.random.key(0), x), jax.random.key(1), x)
    lines = str(ja.adapter_summary(model, variables)).splitlines()
    assert max(map(len, lines)) <= 200
    assert "48 modules" in lines[2]


class OuterWithSetup(nn.Module):
    def setup(self):
        self.stem = nn.Dense(16)
        self.body = ja.with_adapters(SimpleModel(), BLOCKS, global_modules=["decoder"]).add_adapter("a", ja.LinearAdapter(4))
        self.other = SimpleModel()

    def __call__(self, x):
        h = self.stem(x)
        return self.body(h) + self.other(h)


class OuterWithField(nn.Module):
    body: nn.Module

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(16, name="stem")(x)
        return self.body(h) + SimpleModel(name="other")(h)


@pytest.mark.parametrize("outer", ["setup", "field"])
def test_an_adapted_submodule_inside_a_larger_model(outer):
    body = ja.with_adapters(SimpleModel(), BLOCKS, global_modules=["decoder"]).add_adapter("a", ja.LinearAdapter(4))
    model = OuterWithSetup() if outer == "setup" else OuterWithField(body)
    x = jnp.ones((2, 16))
    variables = model.init(jax.random.key(0), x)
    assert adapter_paths(variables) == {"a": ["body/decoder/layers_0", "body/decoder/layers_1"]}
    assert sorted(variables["params"]) == ["body", "other", "stem"]
    assert "__adapters__" not in str(jax.tree_util.tree_structure(variables["params"]["other"]))
