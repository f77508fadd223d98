"""Checkpoints from a 2-process ``jax.distributed`` run on localhost (CPU, 2 devices per process).

The test starts two processes running this file as a script. Adapter kernels
are sharded over a mesh that spans both processes; both processes save, then
load onto the same mesh and onto another one, each checking the shards it
holds. The test process (one process, one device) then loads the checkpoint
whole. Sharded arrays must be stored as orbax arrays of their own (each
process writes its shards; none gathers another's).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

NUM_PROCESSES, DEVICES_PER_PROCESS, WIDTH = 2, 2, 16


def expected_adapters():
    """The adapter values both processes save, as numpy arrays by '/'-joined path."""
    import numpy as np

    rng = np.random.default_rng(0)
    out = {}
    for i in range(2):
        prefix = f"params/block_{i}/fc/__adapters__/a"
        out[f"{prefix}/down/kernel"] = rng.standard_normal((WIDTH, 8)).astype(np.float32)
        out[f"{prefix}/up/kernel"] = rng.standard_normal((8, WIDTH)).astype(np.float32)
        out[f"{prefix}/norm/scale"] = rng.standard_normal((WIDTH,)).astype(np.float32)
        out[f"{prefix}/norm/bias"] = rng.standard_normal((WIDTH,)).astype(np.float32)
    return out


def model_and_base():
    import flax.linen as nn
    import jax
    import numpy as np

    import jadapters

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            return x + nn.Dense(WIDTH, name="fc")(x)

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            for i in range(2):
                x = Block(name=f"block_{i}")(x)
            return x

    x = np.ones((1, WIDTH), np.float32)
    base = jax.tree_util.tree_map(np.asarray, Net().init(jax.random.key(0), x))
    adapted = jadapters.with_adapters(Net(), {"fc": "block_*/fc"}).add_adapter("fc:a", jadapters.LinearAdapter(8))
    return Net, adapted, base


@pytest.mark.slow
def test_save_and_restore_across_two_processes(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={DEVICES_PER_PROCESS}",
    }
    procs = [
        subprocess.Popen([sys.executable, __file__, f"127.0.0.1:{port}", str(i), str(tmp_path / "ckpt")],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(NUM_PROCESSES)
    ]
    outputs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=240)
            assert proc.returncode == 0, out[-2000:] + err[-6000:]
            outputs.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for i, result in enumerate(outputs):
        assert result["process"] == i and result["devices"] == NUM_PROCESSES * DEVICES_PER_PROCESS
        assert result["checks"] == ["saved", "same mesh", "another mesh", "full model on the mesh"], result
    assert outputs[0]["own_arrays"] == 4  # the sharded kernels: stored per array, not packed

    # One process, one device: the whole arrays, and the model's predictions.
    import numpy as np

    import jadapters

    Net, _, base = model_and_base()
    restored, variables = jadapters.load_adapters(tmp_path / "ckpt", Net(), base)
    flat = _flat(jadapters.split_adapters(variables)[0])
    want = expected_adapters()
    assert sorted(flat) == sorted(want)
    for key, value in want.items():
        np.testing.assert_array_equal(np.asarray(flat[key]), value)
    assert restored.get_enabled_adapters() == ["a"]
    assert restored.apply(variables, np.ones((1, WIDTH), np.float32)).shape == (1, WIDTH)


def _flat(tree):
    from flax import traverse_util

    return {"/".join(k): v for k, v in traverse_util.flatten_dict(tree).items()}


def main(coordinator: str, process_id: int, path: str) -> None:
    import jax

    jax.distributed.initialize(coordinator, NUM_PROCESSES, process_id)
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    import jadapters

    devices = np.array(jax.devices())
    mesh = Mesh(devices, ("model",))
    other = Mesh(devices[::-1].reshape(2, 2), ("x", "y"))

    def columns(path, shape, dtype):
        return NamedSharding(mesh, P(None, "model") if len(shape) == 2 else P())

    def rows(path, shape, dtype):
        return NamedSharding(other, P(("x", "y"), None) if len(shape) == 2 else P())

    def place(values, sharding_for):
        out = {}
        for key, value in values.items():
            sharding = sharding_for(key, value.shape, value.dtype)
            out[key] = jax.make_array_from_callback(value.shape, sharding, lambda index, v=value: v[index])
        return out

    def check(variables, sharding_for):
        got = _flat(jadapters.split_adapters(variables)[0])
        assert sorted(got) == sorted(want), sorted(got)
        for key, value in want.items():
            array = got[key]
            assert array.sharding == sharding_for(key, value.shape, value.dtype), (key, array.sharding)
            for shard in array.addressable_shards:
                np.testing.assert_array_equal(np.asarray(shard.data), value[shard.index])

    from flax import traverse_util

    Net, adapted, base = model_and_base()
    want = expected_adapters()
    replicated = NamedSharding(mesh, P())
    base_on_mesh = jax.tree_util.tree_map(
        lambda v: jax.make_array_from_callback(v.shape, replicated, lambda index: v[index]), base)
    adapters = traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in place(want, columns).items()})
    variables = jadapters.merge_trees(base_on_mesh, adapters)
    checks = []

    saved = jadapters.save_adapters(path, adapted, variables)
    info = jadapters.inspect_checkpoint(saved)
    own = sum(e.offset is None for e in info.metadata.arrays)
    checks.append("saved")

    _, restored = jadapters.load_adapters(saved, Net(), base_on_mesh, shardings=columns)
    check(restored, columns)
    checks.append("same mesh")

    _, restored = jadapters.load_adapters(saved, Net(), base_on_mesh, shardings=rows)
    check(restored, rows)
    checks.append("another mesh")

    full = jadapters.save_model(path + "-full", adapted, variables)
    _, restored = jadapters.load_model(full, Net(), shardings=columns)
    check(restored, columns)
    checks.append("full model on the mesh")

    print(json.dumps({"process": jax.process_index(), "devices": jax.device_count(), "checks": checks,
                      "own_arrays": own}))
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
