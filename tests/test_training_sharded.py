"""The train step with the base sharded FSDP-style over 8 CPU devices equals the 1-device step.

The device count is fixed when jax starts, so the check runs this file as a
script in a fresh interpreter with ``--xla_force_host_platform_device_count=8``.
Nothing here imports jax at module level.
"""

from __future__ import annotations

import json

from multidevice import run_with_cpu_devices

NUM_DEVICES = 8
AXIS = "fsdp"


def test_fsdp_sharded_train_step_matches_single_device():
    result = run_with_cpu_devices(__file__, NUM_DEVICES)
    assert result["devices"] == NUM_DEVICES
    assert result["sharded_base_leaves"] > 0
    assert result["collectives"]
    assert result["max_loss_rel_diff"] < 1e-5
    assert result["max_adapter_diff"] < 1e-5


def fsdp_sharding(leaf, mesh, axis_name):
    """Shards the largest axis of ``leaf`` that divides by the mesh axis; replicates otherwise."""
    from jax.sharding import NamedSharding, PartitionSpec

    size = mesh.shape[axis_name]
    for dim in sorted(range(leaf.ndim), key=lambda d: -leaf.shape[d]):
        if leaf.shape[dim] % size == 0:
            spec = [None] * leaf.ndim
            spec[dim] = axis_name
            return NamedSharding(mesh, PartitionSpec(*spec))
    return NamedSharding(mesh, PartitionSpec())


def main() -> None:
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import NamedSharding, PartitionSpec

    from jadapters import LinearAdapter, ResidualAdd, init_adapters, with_adapters
    from jadapters.training import combine, make_train_step, partition

    assert jax.device_count() == NUM_DEVICES, jax.devices()
    dim, batch_size, steps = 64, 32, 4

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.LayerNorm(name="ln")(nn.Dense(dim, name="fc")(x))

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            for i in range(3):
                x = x + Block(name=f"layers_{i}")(x)
            return nn.Dense(12, name="head")(x)

    base = Net()
    model = with_adapters(base, {"blocks": "layers_*"})
    model = model.add_adapter("a", LinearAdapter(dim=8, dropout=0.1), strategy=ResidualAdd(l2_lambda=0.01))
    model = model.add_adapter("off", LinearAdapter(dim=8), enabled=False)

    keys = jax.random.split(jax.random.key(0), 2 * steps + 2)
    batches = [
        (jax.random.normal(keys[2 * i], (batch_size, dim)), jax.random.normal(keys[2 * i + 1], (batch_size, 12)))
        for i in range(steps)
    ]
    base_variables = base.init(keys[-2], batches[0][0])
    variables = init_adapters(model, base_variables, keys[-1], batches[0][0])

    def loss_fn(outputs, batch):
        return jnp.mean((outputs - batch[1]) ** 2)

    step = make_train_step(model, loss_fn, optax.adam(1e-2))
    rng = jax.random.key(42)

    def run(variables, place_batch):
        state = step.init(variables, rng)
        losses = []
        for batch in batches:
            state, metrics = step(state, place_batch(batch))
            losses.append(float(metrics["loss"]))
        return state, np.array(losses)

    single_state, single_losses = run(variables, lambda b: b)

    # Auto axes: XLA propagates the shardings (make_mesh defaults to Explicit axes).
    mesh = jax.make_mesh((NUM_DEVICES,), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,))
    trainable, frozen = partition(model, variables)
    frozen = jax.tree_util.tree_map(lambda leaf: jax.device_put(leaf, fsdp_sharding(leaf, mesh, AXIS)), frozen)
    trainable = jax.device_put(trainable, NamedSharding(mesh, PartitionSpec()))
    data = NamedSharding(mesh, PartitionSpec(AXIS))
    sharded_variables = combine(trainable, frozen)

    sharded_state, sharded_losses = run(sharded_variables, lambda b: jax.device_put(b, data))

    frozen_leaves = jax.tree_util.tree_leaves(frozen)
    sharded_base = [leaf for leaf in frozen_leaves if not leaf.sharding.is_fully_replicated]
    assert all(len(leaf.sharding.device_set) == NUM_DEVICES for leaf in frozen_leaves)
    # The sharded base is carried as is: the same arrays, never gathered or copied.
    assert all(a is b for a, b in zip(jax.tree_util.tree_leaves(sharded_state.frozen), frozen_leaves))
    hlo = step.update.lower(sharded_state, jax.device_put(batches[0], data)).compile().as_text()
    collectives = sorted(op for op in ("all-gather", "all-reduce", "reduce-scatter") if op in hlo)

    adapter_diff = max(
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(
            jax.tree_util.tree_leaves(single_state.trainable), jax.tree_util.tree_leaves(sharded_state.trainable)
        )
    )
    np.testing.assert_allclose(sharded_losses, single_losses, rtol=1e-5, atol=1e-6)
    assert single_losses[-1] < single_losses[0]
    print(
        json.dumps(
            {
                "devices": jax.device_count(),
                "sharded_base_leaves": len(sharded_base),
                "collectives": collectives,
                "max_loss_rel_diff": float(np.max(np.abs(sharded_losses - single_losses) / np.abs(single_losses))),
                "max_adapter_diff": adapter_diff,
            }
        )
    )


if __name__ == "__main__":
    main()
