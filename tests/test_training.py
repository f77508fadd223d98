"""Adapter-only training: partition, optimizer labels, the train step and the loop."""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jadapters
from jadapters import AdapterError, LinearAdapter, ResidualAdd, init_adapters, with_adapters
from jadapters.training import (
    adapter_optimizer,
    combine,
    fit,
    make_train_step,
    optimizer_labels,
    partition,
)
from jadapters.tree import adapter_name_at

DIM, BATCH = 8, 16


class Block(nn.Module):
    dim: int

    @nn.compact
    def __call__(self, x):
        return nn.LayerNorm(name="ln")(nn.Dense(self.dim, name="fc")(x))


class Net(nn.Module):
    """Residual blocks ``layers_{i}`` then a head; ``remat`` checkpoints every block."""

    dim: int = DIM
    num_layers: int = 2
    remat: bool = False

    @nn.compact
    def __call__(self, x):
        block = nn.remat(Block) if self.remat else Block
        for i in range(self.num_layers):
            x = x + block(self.dim, name=f"layers_{i}")(x)
        return nn.Dense(3, name="head")(x)


class BNNet(nn.Module):
    """Dense -> BatchNorm -> Dense; ``train`` switches the BatchNorm to batch statistics."""

    dim: int = DIM

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dense(self.dim, name="fc")(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.5, name="bn")(x)
        return nn.Dense(3, name="head")(x)


class BatchNormAdapter(nn.Module):
    """BatchNorm -> zero-initialised Dense: an adapter with statistics of its own."""

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        h = nn.BatchNorm(use_running_average=deterministic, momentum=0.5, name="bn")(x)
        return nn.Dense(x.shape[-1], kernel_init=nn.initializers.zeros, name="proj")(h)


def mse(outputs, batch):
    return jnp.mean((outputs - batch[1]) ** 2)


def make_batch(seed=0, dim=DIM):
    kx, ky = jax.random.split(jax.random.key(seed))
    return jax.random.normal(kx, (BATCH, dim)), jax.random.normal(ky, (BATCH, 3))


def two_adapter_model(base=None, **adapter_kwargs):
    """``base`` with adapter 'a' (enabled) and 'b' (disabled) on every block."""
    base = base or Net()
    model = with_adapters(base, {"blocks": "layers_*"})
    model = model.add_adapter("a", LinearAdapter(dim=4, **adapter_kwargs))
    return model.add_adapter("b", LinearAdapter(dim=4), enabled=False)


def init_all(model, base, seed=0, **kwargs):
    x, _ = make_batch(seed)
    base_variables = base.init(jax.random.key(seed), x, **kwargs)
    return base_variables, init_adapters(model, base_variables, jax.random.key(seed + 1), x, **kwargs)


def leaves_with_paths(tree):
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {tuple(str(k.key) for k in path): leaf for path, leaf in flat}


def bitwise_equal(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def perturbed(variables, scale=0.3, seed=7):
    """Random values in every adapter leaf, so that all adapter gradients are non-zero."""
    adapters, rest = jadapters.split_adapters({"params": variables["params"]})
    leaves, treedef = jax.tree_util.tree_flatten(adapters)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noisy = [leaf + scale * jax.random.normal(k, leaf.shape) for leaf, k in zip(leaves, keys)]
    return combine(jax.tree_util.tree_unflatten(treedef, noisy), {**variables, **rest})


def tree_bytes(tree):
    return sum(np.asarray(leaf).nbytes for leaf in jax.tree_util.tree_leaves(tree))


# partition / combine


def test_partition_selects_enabled_adapter_params_and_shares_leaves():
    model = two_adapter_model()
    _, variables = init_all(model, Net())
    trainable, frozen = partition(model, variables)
    owners = {adapter_name_at(p) for p in leaves_with_paths(trainable)}
    assert owners == {"a"}
    assert {adapter_name_at(p) for p in leaves_with_paths(frozen)} == {None, "b"}
    everything = leaves_with_paths(variables)
    rejoined = leaves_with_paths(combine(trainable, frozen))
    assert rejoined.keys() == everything.keys()
    assert all(rejoined[p] is everything[p] for p in everything)

    trainable_all, frozen_all = partition(model, variables, which="all")
    assert {adapter_name_at(p) for p in leaves_with_paths(trainable_all)} == {"a", "b"}
    assert {adapter_name_at(p) for p in leaves_with_paths(frozen_all)} == {None}


def test_partition_keeps_every_collection_frozen():
    model = with_adapters(BNNet(), {"fc": "fc"}).add_adapter("a", LinearAdapter(dim=4))
    _, variables = init_all(model, BNNet())
    trainable, frozen = partition(model, variables)
    assert list(trainable) == ["params"]
    assert frozen["batch_stats"] is variables["batch_stats"]


def test_partition_errors():
    model = two_adapter_model()
    base_variables, variables = init_all(model, Net())
    with pytest.raises(AdapterError, match="no enabled adapters"):
        partition(model.set_enabled_adapters(enabled=False), variables)
    with pytest.raises(AdapterError, match="init_adapters"):
        partition(model, base_variables)
    with pytest.raises(AdapterError, match="which"):
        partition(model, variables, which="some")
    with pytest.raises(AdapterError, match="init_adapters"):
        adapter_optimizer(optax.adam(1e-3), model, base_variables["params"])


# optimizer labels


def test_optimizer_labels_mark_only_enabled_adapters():
    model = two_adapter_model()
    _, variables = init_all(model, Net())
    labels = leaves_with_paths(optimizer_labels(model, variables["params"]))
    assert labels and all(
        label == ("adapter" if adapter_name_at(p) == "a" else "frozen") for p, label in labels.items()
    )
    labels_all = leaves_with_paths(optimizer_labels(model, variables["params"], which="all"))
    assert {p for p, label in labels_all.items() if label == "adapter"} == {
        p for p in labels_all if adapter_name_at(p) in ("a", "b")
    }


def test_adapter_optimizer_state_holds_only_enabled_adapter_moments():
    model = two_adapter_model()
    _, variables = init_all(model, Net())
    params = variables["params"]
    opt_state = adapter_optimizer(optax.adam(1e-3), model, params).init(params)

    enabled_bytes = sum(
        np.asarray(leaf).nbytes for p, leaf in leaves_with_paths(params).items() if adapter_name_at(p) == "a"
    )
    counters = [leaf for _, leaf in optax.tree_utils.tree_get_all_with_path(opt_state, "count")]
    assert len(counters) == 1
    assert tree_bytes(opt_state) == 2 * enabled_bytes + tree_bytes(counters)
    assert tree_bytes(opt_state) < tree_bytes(optax.adam(1e-3).init(params))


def test_adapter_optimizer_one_params_tree_trains_only_enabled_adapter():
    model = two_adapter_model()
    base = Net()
    _, variables = init_all(model, base)
    params = variables["params"]
    tx = adapter_optimizer(optax.adam(1e-2), model, params)
    opt_state = tx.init(params)
    x, y = make_batch()

    @jax.jit
    def step(params, opt_state):
        grads = jax.grad(lambda p: mse(model.apply({"params": p}, x), (x, y)))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    new = params
    for _ in range(3):
        new, opt_state = step(new, opt_state)
    before, after = leaves_with_paths(params), leaves_with_paths(new)
    for p in before:
        assert bitwise_equal(before[p], after[p]) == (adapter_name_at(p) != "a"), p


# the train step


def test_adam_steps_change_exactly_the_enabled_adapter_leaves():
    model = two_adapter_model()
    _, variables = init_all(model, Net())
    step = make_train_step(model, mse, optax.adam(1e-2))
    state = step.init(variables, jax.random.key(0))
    for i in range(3):
        state, metrics = step(state, make_batch(i))
    assert int(state.step) == 3

    before, after = leaves_with_paths(variables), leaves_with_paths(state.variables)
    assert before.keys() == after.keys()
    for p in before:
        if adapter_name_at(p) == "a":
            assert not bitwise_equal(before[p], after[p]), p
        else:  # base and disabled adapter: the very same arrays, never copied
            assert after[p] is before[p], p
    assert np.isfinite(float(metrics["loss"]))


def test_train_step_optimizer_state_is_twice_the_trainable_bytes():
    model = two_adapter_model()
    _, variables = init_all(model, Net())
    step = make_train_step(model, mse, optax.adam(1e-2))
    state = step.init(variables, jax.random.key(0))
    state, _ = step(state, make_batch())
    counters = [leaf for _, leaf in optax.tree_utils.tree_get_all_with_path(state.opt_state, "count")]
    assert tree_bytes(state.opt_state) == 2 * tree_bytes(state.trainable) + tree_bytes(counters)
    assert tree_bytes(state.trainable) == sum(
        np.asarray(leaf).nbytes for p, leaf in leaves_with_paths(variables).items() if adapter_name_at(p) == "a"
    )


def test_loss_decreases_and_user_metrics_pass_through():
    model = two_adapter_model()
    _, variables = init_all(model, Net())

    def loss_fn(outputs, batch):
        loss = mse(outputs, batch)
        return loss, {"mae": jnp.mean(jnp.abs(outputs - batch[1]))}

    step = make_train_step(model, loss_fn, optax.adam(3e-2))
    state = step.init(variables, jax.random.key(0))
    batch = make_batch()
    losses = []
    for _ in range(10):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0]
    assert set(metrics) == {"loss", "task_loss", "aux_loss", "mae"}


def test_frozen_base_batchnorm_then_disabled_adapters_give_base_outputs():
    base = BNNet()
    model = with_adapters(base, {"fc": "fc"}).add_adapter("a", LinearAdapter(dim=4))
    base_variables, variables = init_all(model, base)
    x, _ = make_batch()
    # Give the base non-trivial running statistics, as a pretrained model has.
    _, stats = base.apply(base_variables, x * 3 + 1, train=True, mutable=["batch_stats"])
    base_variables = {**base_variables, **stats}
    variables = {**variables, **stats}

    step = make_train_step(model, mse, optax.adam(1e-2), model_kwargs={"train": True})
    state = step.init(variables, jax.random.key(0))
    for i in range(3):
        state, _ = step(state, make_batch(i))

    assert state.frozen["batch_stats"] is base_variables["batch_stats"]
    for p, leaf in leaves_with_paths(base_variables).items():
        assert bitwise_equal(leaves_with_paths(state.variables)[p], leaf), p
    trained = model.apply(state.variables, x, train=False)
    assert not np.allclose(trained, base.apply(base_variables, x, train=False))

    disabled = model.set_enabled_adapters(enabled=False)
    out = disabled.apply(state.variables, x, train=False)
    assert bitwise_equal(out, base.apply(base_variables, x, train=False))


def test_batchnorm_inside_an_adapter_updates_its_statistics():
    base = BNNet()
    model = with_adapters(base, {"fc": "fc"}).add_adapter("bn_adapter", BatchNormAdapter())
    base_variables, variables = init_all(model, base)
    adapter_stats = variables["batch_stats"]["fc"]["__adapters__"]["bn_adapter"]["bn"]
    assert "__adapters__" not in base_variables["batch_stats"].get("fc", {})

    step = make_train_step(model, mse, optax.adam(1e-2), model_kwargs={"train": True})
    state = step.init(variables, jax.random.key(0))
    for i in range(2):
        state, _ = step(state, make_batch(i))

    new_stats = state.frozen["batch_stats"]["fc"]["__adapters__"]["bn_adapter"]["bn"]
    assert not bitwise_equal(new_stats["mean"], adapter_stats["mean"])
    assert not bitwise_equal(new_stats["var"], adapter_stats["var"])
    base_stats = base_variables["batch_stats"]["bn"]
    assert all(state.frozen["batch_stats"]["bn"][k] is base_stats[k] for k in base_stats)
    assert jax.tree_util.tree_structure(state.frozen) == jax.tree_util.tree_structure(step.init(variables, 0).frozen)


def test_remat_model_gives_the_same_gradients():
    x, y = make_batch()
    results = {}
    for remat in (False, True):
        base = Net(remat=remat)
        model = with_adapters(base, {"blocks": "layers_*"}).add_adapter("a", LinearAdapter(dim=4))
        _, variables = init_all(model, base)
        # SGD with learning rate 1: the update is minus the gradient.
        step = make_train_step(model, mse, optax.sgd(1.0))
        state = step.init(perturbed(variables), jax.random.key(0))
        jaxpr = str(jax.make_jaxpr(step.update)(state, (x, y)))
        assert ("remat" in jaxpr) == remat
        new_state, _ = step(state, (x, y))
        results[remat] = jax.tree_util.tree_map(lambda new, old: old - new, new_state.trainable, state.trainable)
    chex.assert_trees_all_close(results[True], results[False], rtol=1e-5, atol=1e-7)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree_util.tree_leaves(results[True]))


def test_l2_aux_loss_is_zero_at_init_and_positive_after_training():
    model = with_adapters(Net(), {"blocks": "layers_*"}).add_adapter(
        "a", LinearAdapter(dim=4), strategy=ResidualAdd(l2_lambda=0.1)
    )
    _, variables = init_all(model, Net())
    step = make_train_step(model, mse, optax.adam(3e-2))
    state = step.init(variables, jax.random.key(0))
    state, first = step(state, make_batch())
    assert float(first["aux_loss"]) == 0.0
    assert float(first["loss"]) == float(first["task_loss"])
    for i in range(5):
        state, metrics = step(state, make_batch(i))
    assert float(metrics["aux_loss"]) > 0.0
    np.testing.assert_allclose(metrics["loss"], metrics["task_loss"] + metrics["aux_loss"], rtol=1e-6)


def test_dropout_and_stochastic_depth_keys_follow_state_rng_and_step():
    base = Net()
    model = with_adapters(base, {"blocks": "layers_*"})
    model = model.add_adapter("drop", LinearAdapter(dim=4, dropout=0.5), targets="layers_0")
    model = model.add_adapter(
        "depth", LinearAdapter(dim=4), strategy=ResidualAdd(stochastic_depth=0.5, per_sample=True), targets="layers_1"
    )
    _, variables = init_all(model, base)
    variables = perturbed(variables)
    batch = make_batch()
    step = make_train_step(model, mse, optax.sgd(0.1))
    state = step.init(variables, jax.random.key(0))

    def loss_at(state):
        return float(step(state, batch)[1]["loss"])

    assert loss_at(state) == loss_at(state)  # same key, same step: same masks
    assert loss_at(state) != loss_at(state.replace(step=jnp.ones((), jnp.int32)))
    assert loss_at(state) != loss_at(state.replace(rng=jax.random.key(1)))

    # The control: without randomness in the model, the step number changes nothing.
    quiet = make_train_step(model.set_enabled_adapters(["drop", "depth"], enabled=False).add_adapter(
        "plain", LinearAdapter(dim=4)), mse, optax.sgd(0.1))
    plain = init_adapters(quiet.adapted, variables, jax.random.key(3), batch[0])
    quiet_state = quiet.init(perturbed(plain), jax.random.key(0))
    assert float(quiet(quiet_state, batch)[1]["loss"]) == float(
        quiet(quiet_state.replace(step=jnp.ones((), jnp.int32)), batch)[1]["loss"]
    )


def test_missing_dropout_stream_is_reported():
    model = with_adapters(Net(), {"blocks": "layers_*"}).add_adapter(
        "depth", LinearAdapter(dim=4), strategy=ResidualAdd(stochastic_depth=0.5)
    )
    _, variables = init_all(model, Net())
    step = make_train_step(model, mse, optax.sgd(0.1), rng_streams=())
    with pytest.raises(AdapterError, match="dropout"):
        step(step.init(variables, jax.random.key(0)), make_batch())


def test_dict_batches_and_custom_inputs():
    model = two_adapter_model()
    _, variables = init_all(model, Net())
    x, y = make_batch()
    dict_step = make_train_step(model, lambda out, b: jnp.mean((out - b["labels"]) ** 2), optax.sgd(0.1))
    tuple_step = make_train_step(model, mse, optax.sgd(0.1), inputs=lambda b: (b[0],))
    from_dict = dict_step(dict_step.init(variables, jax.random.key(0)), {"inputs": x, "labels": y})[1]
    from_tuple = tuple_step(tuple_step.init(variables, jax.random.key(0)), (x, y))[1]
    assert float(from_dict["loss"]) == float(from_tuple["loss"])


# the loop


def test_fit_runs_steps_calls_on_step_and_returns_losses(capsys):
    model = two_adapter_model()
    _, variables = init_all(model, Net())
    step = make_train_step(model, mse, optax.adam(3e-2))
    seen = []
    batches = [make_batch()] * 8
    state, losses = fit(
        step,
        step.init(variables, jax.random.key(0)),
        batches,
        num_steps=6,
        progress=True,
        on_step=lambda state, metrics: seen.append((int(state.step), float(metrics["loss"]))),
    )
    assert int(state.step) == 6 and len(losses) == 6
    assert seen == list(zip(range(1, 7), losses))
    assert losses[-1] < losses[0]
    assert "6/6" in capsys.readouterr().err

    state, more = fit(step, state, iter(batches[:3]), progress=False)
    assert int(state.step) == 9 and len(more) == 3


@pytest.mark.parametrize("freeze_batchnorm", [True, False])
def test_base_batchnorm_mode_during_adapter_training(freeze_batchnorm):
    """NeMo's freeze_batchnorm (the default): the base BatchNorm normalises with its running
    statistics even though the model is called with train=True; the option gives batch statistics."""
    base = BNNet()
    model = with_adapters(base, {"fc": "fc"}).add_adapter("a", LinearAdapter(dim=4))
    base_variables, variables = init_all(model, base)
    x, y = make_batch()
    _, stats = base.apply(base_variables, x * 3 + 1, train=True, mutable=["batch_stats"])
    variables = perturbed({**variables, **stats})

    step = make_train_step(
        model, mse, optax.sgd(0.0), model_kwargs={"train": True}, freeze_batchnorm=freeze_batchnorm
    )
    _, metrics = step(step.init(variables, jax.random.key(0)), (x, y))

    running = mse(model.apply(variables, x, train=False), (x, y))
    batch, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
    expected, other = (running, mse(batch, (x, y))) if freeze_batchnorm else (mse(batch, (x, y)), running)
    np.testing.assert_allclose(metrics["task_loss"], expected, rtol=1e-6)
    assert abs(float(metrics["task_loss"]) - float(other)) > 1e-3
