"""Strategies: NeMo's residual add (stochastic depth, L2 auxiliary loss), return-result,
user-defined strategies, and LoRA-style strategies that read the module's input."""

import dataclasses

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

import jadapters as ja
from models import LinearBN, perturb_adapters as perturbed

X = jax.random.normal(jax.random.key(0), (2, 50))


def adapted_fixture(strategy=None, training=False, dim=10):
    """NeMo's fixture with one LinearAdapter on the whole module; returns (model, variables, base_out)."""
    base = LinearBN()
    base_vars = base.init(jax.random.key(0), X)
    model = ja.with_adapters(base, {"module": ""}).add_adapter("adapter_0", ja.LinearAdapter(dim=dim), strategy=strategy)
    variables = ja.init_adapters(model, base_vars, jax.random.key(1), X)
    return model.clone(training=training), variables, base.apply(base_vars, X)


def test_residual_add_defaults_and_identity_at_init():
    assert ja.ResidualAdd().stochastic_depth == 0.0
    model, variables, base_out = adapted_fixture()
    chex.assert_trees_all_equal(model.apply(variables, X), base_out)


def test_eval_output_is_input_plus_adapter_output():
    model, variables, base_out = adapted_fixture()
    variables = perturbed(variables)
    adapter_params = variables["params"]["__adapters__"]["adapter_0"]
    adapter_out = ja.LinearAdapter(dim=10).apply({"params": adapter_params}, base_out)
    chex.assert_trees_all_close(model.apply(variables, X), base_out + adapter_out, rtol=1e-6)
    assert not jnp.allclose(adapter_out, 0.0)


def test_stochastic_depth_zero_in_training_equals_eval():
    model, variables, _ = adapted_fixture(ja.ResidualAdd(stochastic_depth=0.0), training=True)
    variables = perturbed(variables)
    eval_out = model.clone(training=False).apply(variables, X)
    chex.assert_trees_all_equal(model.apply(variables, X, rngs={"dropout": jax.random.key(3)}), eval_out)


def test_stochastic_depth_one_in_training_gives_the_base_output():
    model, variables, base_out = adapted_fixture(ja.ResidualAdd(stochastic_depth=1.0), training=True)
    variables = perturbed(variables)
    chex.assert_trees_all_equal(model.apply(variables, X, rngs={"dropout": jax.random.key(3)}), base_out)
    assert not jnp.allclose(model.clone(training=False).apply(variables, X), base_out)


def test_stochastic_depth_draws_once_per_batch_by_default_and_rescales():
    model, variables, base_out = adapted_fixture(ja.ResidualAdd(stochastic_depth=0.5), training=True)
    variables = perturbed(variables)
    with_adapter = model.clone(training=False).apply(variables, X)
    outcomes = set()
    for seed in range(12):
        out = model.apply(variables, X, rngs={"dropout": jax.random.key(seed)})
        if jnp.array_equal(out, base_out):
            outcomes.add("dropped")
        else:  # kept: the adapter's output is scaled by 1 / (1 - p) = 2 for every sample
            chex.assert_trees_all_close(out - base_out, 2 * (with_adapter - base_out), rtol=1e-5, atol=1e-6)
            outcomes.add("kept")
    assert outcomes == {"dropped", "kept"}


def test_stochastic_depth_per_sample_draws_one_value_per_row():
    x = jax.random.normal(jax.random.key(0), (64, 50))
    base = LinearBN()
    base_vars = base.init(jax.random.key(0), x)
    model = ja.with_adapters(base, {"m": ""}).add_adapter(
        "a", ja.LinearAdapter(dim=4), strategy=ja.ResidualAdd(stochastic_depth=0.5, per_sample=True)
    )
    variables = perturbed(ja.init_adapters(model, base_vars, jax.random.key(1), x))
    out = model.clone(training=True).apply(variables, x, rngs={"dropout": jax.random.key(5)})
    dropped_rows = jnp.all(out == base.apply(base_vars, x), axis=-1)
    assert 0 < int(dropped_rows.sum()) < 64


def test_stochastic_depth_without_a_dropout_key_is_a_clear_error():
    model, variables, _ = adapted_fixture(ja.ResidualAdd(stochastic_depth=0.5), training=True)
    with pytest.raises(ja.AdapterError, match=r"adapter 'adapter_0' at '' needs the 'dropout' PRNG stream"):
        model.apply(variables, X)


@pytest.mark.parametrize("p", [-0.1, 1.5, "0.5"])
def test_stochastic_depth_out_of_range_is_rejected_when_built(p):
    with pytest.raises(ValueError, match=rf"stochastic_depth must be a number in \[0, 1\], got {p!r}"):
        ja.ResidualAdd(stochastic_depth=p)


@pytest.mark.parametrize("lam", [float("nan"), float("inf"), -0.5, True])
def test_l2_lambda_must_be_finite_and_non_negative(lam):
    with pytest.raises(ValueError, match=rf"l2_lambda must be a finite number >= 0, got {lam!r}"):
        ja.ResidualAdd(l2_lambda=lam)


def test_l2_loss_is_zero_at_init_and_follows_nemo_formula():
    model, variables, base_out = adapted_fixture(ja.ResidualAdd(l2_lambda=0.01), training=True)
    _, state = model.apply(variables, X, mutable=["adapter_losses"])
    (loss,) = state["adapter_losses"]["__adapters__"]["adapter_0"]["l2_loss"]
    assert float(loss) == 0.0
    variables = perturbed(variables)
    _, state = model.apply(variables, X, mutable=["adapter_losses"])
    adapter_out = model.clone(training=False).apply(variables, X) - base_out
    expected = 0.01 * jnp.mean(jnp.sum(jnp.square(adapter_out), axis=-1))
    chex.assert_trees_all_close(ja.sum_adapter_losses(state), expected, rtol=1e-4)
    assert float(ja.sum_adapter_losses(state)) > 0


def test_l2_loss_only_in_training():
    model, variables, _ = adapted_fixture(ja.ResidualAdd(l2_lambda=0.01), training=False)
    _, state = model.apply(perturbed(variables), X, mutable=["adapter_losses"])
    assert "adapter_losses" not in state or not jax.tree_util.tree_leaves(state["adapter_losses"])


@dataclasses.dataclass(frozen=True)
class Multiply(ja.Strategy):  # the tutorial's strategy, in five lines
    scale: float = 1.0

    def __call__(self, adapter, value, ctx):
        return self.scale * value * adapter(value)


def test_custom_multiplication_strategy_gives_no_positive_output_at_init():
    model, variables, _ = adapted_fixture(Multiply())
    out = model.apply(variables, X)
    assert not bool(jnp.any(out > 0))
    variables = perturbed(variables)
    base_out = LinearBN().apply({k: v for k, v in ja.split_adapters(variables)[1].items()}, X)
    adapter_out = ja.LinearAdapter(dim=10).apply({"params": variables["params"]["__adapters__"]["adapter_0"]}, base_out)
    chex.assert_trees_all_close(model.clone(adapters=(dataclasses.replace(model.adapters[0], strategy=Multiply(2.0)),)).apply(variables, X), 2.0 * base_out * adapter_out, rtol=1e-5)


def test_return_result_replaces_the_value():
    model, variables, base_out = adapted_fixture(ja.ReturnResult())
    chex.assert_trees_all_equal(model.apply(variables, X), jnp.zeros_like(base_out))


class TinyLoRA(nn.Module):
    """A user's LoRA: x -> B(A x), B zero at init."""

    rank: int
    features: int

    @nn.compact
    def __call__(self, x):
        a = nn.Dense(self.rank, use_bias=False, name="a")(x)
        return nn.Dense(self.features, use_bias=False, kernel_init=nn.initializers.zeros, name="b")(a)


@dataclasses.dataclass(frozen=True)
class AddFromInput(ja.Strategy):
    """Reads the intercepted module's input, adds to its output."""

    def __call__(self, adapter, value, ctx):
        return value + adapter(ctx.args[0])


@pytest.mark.parametrize("strategy", [AddFromInput(), ja.ParallelAdd()])
def test_lora_style_strategy_reads_the_input_and_adds_to_the_output(strategy):
    x = jax.random.normal(jax.random.key(0), (4, 6))
    base = nn.Dense(3)
    params = base.init(jax.random.key(0), x)
    model = ja.with_adapters(base, {"dense": ""}).add_adapter("lora", TinyLoRA(rank=2, features=3), strategy=strategy)
    variables = ja.init_adapters(model, params, jax.random.key(1), x)
    chex.assert_trees_all_equal(model.apply(variables, x), base.apply(params, x))
    variables = perturbed(variables)
    p = variables["params"]
    lora = p["__adapters__"]["lora"]
    expected = x @ p["kernel"] + p["bias"] + (x @ lora["a"]["kernel"]) @ lora["b"]["kernel"]
    chex.assert_trees_all_close(model.apply(variables, x), expected, rtol=1e-5)


def test_mha_strategy_adds_attention_over_the_value_and_reads_the_mask():
    class Block(nn.Module):
        @nn.compact
        def __call__(self, x, mask=None):
            return nn.Dense(8, name="proj")(x)

    x = jax.random.normal(jax.random.key(0), (2, 5, 8))
    mask = jnp.ones((2, 5, 5), bool).at[1, :, 3:].set(False)
    base_vars = Block().init(jax.random.key(0), x)
    model = ja.with_adapters(Block(), {"block": ""}).add_adapter(
        "mha", ja.MultiHeadAttentionAdapter(n_head=2, n_feat=8), strategy=ja.MHAResidualAdd(mask_argument="mask")
    )
    variables = ja.init_adapters(model, base_vars, jax.random.key(1), x, mask=mask)
    base_out = Block().apply(base_vars, x)
    chex.assert_trees_all_equal(model.apply(variables, x, mask=mask), base_out)
    variables = perturbed(variables)
    mha_params = {"params": variables["params"]["__adapters__"]["mha"]}
    expected = base_out + ja.MultiHeadAttentionAdapter(n_head=2, n_feat=8).apply(mha_params, base_out, base_out, base_out, mask)
    chex.assert_trees_all_close(model.apply(variables, x, mask=mask), expected, rtol=1e-5)
    with pytest.raises(ja.AdapterError, match="adapter 'mha' at '': the intercepted call has no argument 'mask'"):
        model.apply(variables, x)


@dataclasses.dataclass(frozen=True)
class ScaleChild(ja.Strategy):
    """Reaches inside the module it wraps: scales one submodule's output (or, with ``grow``, lengthens it)."""

    child: str = "dense"
    grow: bool = False

    def around(self, adapter, call, ctx):
        def hook(call_, *args, **kwargs):
            out = call_(*args, **kwargs)
            return jnp.concatenate([out, out], axis=-1) if self.grow else 2.0 * out

        with ctx.intercept_children({self.child: hook}):
            return call(*ctx.args, **ctx.kwargs)


class Outer(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(4, name="dense")(x).sum(axis=-1)


def test_a_strategy_reaches_into_submodules_and_must_keep_their_shapes():
    x = jnp.ones((2, 3))
    base = Outer().init(jax.random.key(0), x)
    adapted = ja.with_adapters(Outer(), {"outer": ""})

    def run(strategy):
        model = adapted.add_adapter("a", ja.LinearAdapter(2), strategy=strategy)
        return model.apply(ja.init_adapters(model, base, jax.random.key(1), x), x)

    chex.assert_trees_all_close(run(ScaleChild()), 2.0 * Outer().apply(base, x))
    with pytest.raises(ja.AdapterError, match=r"adapter 'a' at '': its hook on the submodule 'dense' has \(shape, "
                                              r"dtype\) \(\(2, 8\), 'float32'\), but the hooked value has \(\(2, 4\)"):
        run(ScaleChild(grow=True))
