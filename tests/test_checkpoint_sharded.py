"""Checkpoints of arrays sharded over 8 CPU devices: restore onto given shardings, or onto one device.

The device count is fixed when jax starts, so the checks run this file as a
script in a fresh interpreter with ``--xla_force_host_platform_device_count=8``
set before jax is imported. Nothing here imports jax at module level.
"""

from __future__ import annotations

import json

from multidevice import run_with_cpu_devices

NUM_DEVICES = 8


def test_sharded_save_and_restore():
    result = run_with_cpu_devices(__file__, NUM_DEVICES)
    assert result == {
        "devices": NUM_DEVICES,
        "saved_sharded_leaves": result["saved_sharded_leaves"],
        "checks": result["checks"],
    }
    assert result["saved_sharded_leaves"] > 0
    assert result["checks"] == [
        "adapters onto given shardings",
        "adapters onto a shardings tree",
        "adapters replicated over the base's mesh by default",
        "adapters onto one device",
        "full model onto given shardings",
        "full model onto one device",
        "training state onto the template's shardings",
    ]


def main() -> None:
    import tempfile

    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

    import jadapters
    from jadapters import LinearAdapter, init_adapters, load_adapters, load_model, save_adapters, save_model

    assert jax.device_count() == NUM_DEVICES, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ("model",))
    replicated = NamedSharding(mesh, PartitionSpec())

    def column_sharding(path: str, shape: tuple, dtype) -> NamedSharding:
        """Shards the last axis over the mesh where it divides, replicates otherwise."""
        if len(shape) == 2 and shape[-1] % NUM_DEVICES == 0:
            return NamedSharding(mesh, PartitionSpec(None, "model"))
        return replicated

    def shard_tree(tree):
        def place(path, leaf):
            keys = "/".join(str(getattr(k, "key", k)) for k in path)
            return jax.device_put(leaf, column_sharding(keys, leaf.shape, leaf.dtype))

        return jax.tree_util.tree_map_with_path(place, tree)

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            return x + nn.Dense(32, name="fc")(nn.LayerNorm(name="ln")(x))

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            for i in range(3):
                x = Block(name=f"block_{i}")(x)
            return nn.Dense(8, name="head")(x)

    x = jax.random.normal(jax.random.key(0), (4, 32))
    base = shard_tree(Net().init(jax.random.key(1), x))
    model = jadapters.with_adapters(Net(), {"blocks": "block_*"}).add_adapter("a", LinearAdapter(16))
    variables = init_adapters(model, base, jax.random.key(2), x)
    adapters, rest = jadapters.split_adapters(variables)
    rng = np.random.default_rng(0)
    adapters = shard_tree(jax.tree_util.tree_map(lambda a: a + 0.1 * rng.standard_normal(a.shape).astype(a.dtype), adapters))
    variables = jadapters.merge_trees(adapters, rest)
    saved_sharded = [a for a in jax.tree_util.tree_leaves(adapters) if not a.sharding.is_fully_replicated]
    expected = model.apply(variables, x)
    root = tempfile.mkdtemp()
    checks = []

    def same_values(tree_a, tree_b):
        for a, b in zip(jax.tree_util.tree_leaves(tree_a), jax.tree_util.tree_leaves(tree_b), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    path = save_adapters(f"{root}/adapters", model, variables)
    fresh = jadapters.with_adapters(Net(), {"blocks": "block_*"})

    restored_model, restored = load_adapters(path, fresh, base, shardings=column_sharding)
    got = jadapters.split_adapters(restored)[0]
    for (p, leaf) in jax.tree_util.tree_leaves_with_path(got):
        keys = "/".join(str(getattr(k, "key", k)) for k in p)
        assert leaf.sharding == column_sharding(keys, leaf.shape, leaf.dtype), (keys, leaf.sharding)
    same_values(got, adapters)
    np.testing.assert_allclose(restored_model.apply(restored, x), expected, rtol=1e-5, atol=1e-4)
    checks.append("adapters onto given shardings")

    tree = jax.tree_util.tree_map(lambda a: replicated, adapters)
    _, restored = load_adapters(path, fresh, base, shardings=tree)
    assert all(a.sharding == replicated for a in jax.tree_util.tree_leaves(jadapters.split_adapters(restored)[0]))
    checks.append("adapters onto a shardings tree")

    _, restored = load_adapters(path, fresh, base)
    for leaf in jax.tree_util.tree_leaves(jadapters.split_adapters(restored)[0]):
        assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == NUM_DEVICES
    checks.append("adapters replicated over the base's mesh by default")

    one = SingleDeviceSharding(jax.devices()[0])
    single_base = jax.device_put(jax.tree_util.tree_map(np.asarray, base), one)
    restored_model, restored = load_adapters(path, fresh, single_base, shardings=one)
    got = jadapters.split_adapters(restored)[0]
    assert all(a.sharding == one for a in jax.tree_util.tree_leaves(got))
    same_values(got, adapters)
    np.testing.assert_allclose(restored_model.apply(restored, x), expected, rtol=1e-5, atol=1e-4)
    checks.append("adapters onto one device")

    full = save_model(f"{root}/full", model, variables)
    restored_model, restored = load_model(full, Net(), shardings=column_sharding)
    for p, leaf in jax.tree_util.tree_leaves_with_path(restored):
        keys = "/".join(str(getattr(k, "key", k)) for k in p)
        assert leaf.sharding == column_sharding(keys, leaf.shape, leaf.dtype), keys
    same_values(restored, variables)
    checks.append("full model onto given shardings")

    restored_model, restored = load_model(full, Net())
    assert all(a.sharding == one for a in jax.tree_util.tree_leaves(restored))
    same_values(restored, variables)
    np.testing.assert_allclose(restored_model.apply(restored, x), expected, rtol=1e-5, atol=1e-4)
    checks.append("full model onto one device")

    loss = lambda out, batch: jnp.mean((out - batch[1]) ** 2)
    step = jadapters.make_train_step(model, loss, optax.adam(1e-2))
    state = step.init(variables, jax.random.key(3))
    state, _ = step(state, (x, jnp.zeros((4, 8))))
    with jadapters.adapter_checkpoint_manager(f"{root}/runs", async_save=False) as manager:
        assert jadapters.save_training_state(manager, state, model)
        template = step.init(variables, jax.random.key(4))
        resumed = jadapters.restore_training_state(manager, template)
    for new, old in zip(jax.tree_util.tree_leaves((resumed.trainable, resumed.opt_state)),
                        jax.tree_util.tree_leaves((template.trainable, template.opt_state)), strict=True):
        assert new.sharding == old.sharding
    same_values((resumed.trainable, resumed.opt_state), (state.trainable, state.opt_state))
    checks.append("training state onto the template's shardings")

    print(json.dumps({"devices": jax.device_count(), "saved_sharded_leaves": len(saved_sharded), "checks": checks}))


if __name__ == "__main__":
    main()
