"""Bad inputs to the training helpers: clear errors naming the argument, raised before anything changes."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jadapters
from jadapters import AdapterError, LinearAdapter, fit, init_adapters, make_train_step, with_adapters

X, Y = jnp.ones((2, 4)), jnp.zeros((2, 4))
MSE = lambda out, batch: jnp.mean((out - batch[1]) ** 2)


@pytest.fixture(scope="module")
def setup():
    params = nn.Dense(4).init(jax.random.key(0), X)
    model = with_adapters(nn.Dense(4), {"dense": ""}).add_adapter("a", LinearAdapter(2))
    return model, init_adapters(model, params, jax.random.key(1), X)


def test_make_train_step_names_a_bad_optimizer_loss_or_model(setup):
    model, _ = setup
    with pytest.raises(AdapterError, match=r"tx must be an optax.GradientTransformation such as optax.adam\(1e-3\), got 'adam'"):
        make_train_step(model, MSE, "adam")
    with pytest.raises(AdapterError, match="loss_fn must be a function"):
        make_train_step(model, "mse", optax.adam(1e-2))
    with pytest.raises(AdapterError, match="expects the AdaptedModule returned by with_adapters, got Dense"):
        make_train_step(nn.Dense(4), MSE, optax.adam(1e-2))


@pytest.mark.parametrize(
    "loss, message",
    [
        (lambda out, batch: (out - batch[1]) ** 2, r"its loss is an array of shape \(2, 4\) \(reduce it"),
        (lambda out, batch: (MSE(out, batch), 1.0, {}), r"it returned a tuple of 3 \(ArrayImpl|it returned a tuple of 3"),
        (lambda out, batch: (MSE(out, batch), [1.0]), "it returned a tuple of 2"),
        (lambda out, batch: (out.sum(axis=0), {}), r"its loss is an array of shape \(4,\)"),
    ],
)
def test_a_loss_that_is_not_a_scalar_is_named(setup, loss, message):
    model, variables = setup
    step = make_train_step(model, loss, optax.adam(1e-2))
    state = step.init(variables, jax.random.key(2))
    before = jax.tree_util.tree_map(np.asarray, state.trainable)
    with pytest.raises(AdapterError, match="loss_fn must return a scalar loss, or \\(scalar loss, dict of metrics\\)"):
        step(state, (X, Y))
    with pytest.raises(AdapterError, match=message):
        step(state, (X, Y))
    jax.tree_util.tree_map(np.testing.assert_array_equal, state.trainable, before)


def test_a_dict_batch_without_inputs_is_named(setup):
    model, variables = setup
    step = make_train_step(model, lambda out, batch: jnp.mean((out - batch["y"]) ** 2), optax.adam(1e-2))
    state = step.init(variables, jax.random.key(2))
    with pytest.raises(AdapterError, match=r"a dict batch needs an 'inputs' entry .* has \['x', 'y'\]"):
        step(state, {"x": X, "y": Y})
    assert jadapters.training.default_inputs({"inputs": 1}) == (1,)
    with pytest.raises(AdapterError, match="a batch is a dict with 'inputs' or a sequence"):
        jadapters.training.default_inputs(3)


@pytest.mark.parametrize("num_steps", [-1, 2.5, "10", True])
def test_fit_names_a_bad_step_count(setup, num_steps):
    model, variables = setup
    step = make_train_step(model, MSE, optax.adam(1e-2))
    state = step.init(variables, jax.random.key(2))
    with pytest.raises(AdapterError, match=rf"num_steps must be an int >= 0 or None \(every batch\), got {num_steps!r}"):
        fit(step, state, [(X, Y)] * 3, num_steps=num_steps, progress=False)
    assert fit(step, state, [(X, Y)] * 3, num_steps=0, progress=False)[1] == []


def test_checkpoint_manager_helpers_name_bad_arguments(tmp_path, setup):
    with pytest.raises(AdapterError, match="save_interval_steps must be an int >= 1, got 0"):
        jadapters.adapter_checkpoint_manager(tmp_path / "runs", save_interval_steps=0)
    assert not (tmp_path / "runs").exists()
    with jadapters.adapter_checkpoint_manager(tmp_path / "runs", async_save=False) as manager:
        with pytest.raises(AdapterError, match="give step= for a state that is not a TrainState"):
            jadapters.save_training_state(manager, {"w": jnp.ones(2)})
        with pytest.raises(AdapterError, match="step must be >= 0, got -3"):
            jadapters.save_training_state(manager, {"w": jnp.ones(2)}, step=-3)
        with pytest.raises(AdapterError, match="step must be an integer, got 'x'"):
            jadapters.save_training_state(manager, {"w": jnp.ones(2)}, step="x")
        assert manager.all_steps() == []
