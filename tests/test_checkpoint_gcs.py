"""Checkpoints on gs:// paths, against a local GCS emulator that this module starts on 127.0.0.1.

Skipped (with the reason) only when the emulator cannot start here.
"""

from __future__ import annotations

import json
import os

import fsspec.config
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from etils import epath

import jadapters
from jadapters import CheckpointError, LinearAdapter, cli, split_adapters
import kill_trials
from gcs_emulator import Emulator, EmulatorUnavailable
from test_checkpoint import Net, assert_same_tree, build, specs, wrap

@pytest.fixture(scope="module")
def emulator():
    try:
        server = Emulator()
    except EmulatorUnavailable as e:
        pytest.skip(f"no GCS emulator: {e}")
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    fsspec.config.conf.setdefault("gcs", {})["token"] = "anon"  # in case fsspec read its environment already
    yield server
    fsspec.config.conf["gcs"].pop("token", None)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    server.stop()


@pytest.fixture(scope="module")
def x():
    return jax.random.normal(jax.random.key(0), (4, 8))


@pytest.fixture(scope="module")
def base_vars(x):
    return Net().init(jax.random.key(1), x)


def test_adapters_on_gcs_round_trip_replace_and_inspect(emulator, base_vars, x, capsys):
    url = f"gs://{emulator.bucket}/run/adapters"
    model, v1 = build(base_vars, x, ("a", LinearAdapter(2), {}), ("decoder:b", LinearAdapter(3), {}), seed=1)
    path = jadapters.save_adapters(url, model, v1)
    assert str(path) == url
    _, v2 = build(base_vars, x, ("a", LinearAdapter(2), {}), ("decoder:b", LinearAdapter(3), {}), seed=2)
    jadapters.save_adapters(url, model, v2)  # replaces the first
    assert [p.name for p in epath.Path(url).iterdir()] == ["2"]
    loaded_model, loaded = jadapters.load_adapters(url, Net(), base_vars)
    assert specs(loaded_model) == specs(model)
    assert_same_tree(split_adapters(loaded)[0], split_adapters(v2)[0])
    np.testing.assert_array_equal(loaded_model.apply(loaded, x), model.apply(v2, x))
    only_b, _ = jadapters.load_adapters(url, wrap(), base_vars, name="b")
    assert only_b.adapter_names() == ["b"]

    info = jadapters.inspect_checkpoint(url)
    assert info.kind == "adapters" and info.path == f"{url}/2" and info.disk_bytes > 0
    assert cli.main(["inspect", "--json", url]) == 0
    assert json.loads(capsys.readouterr().out)["adapters"][0]["name"] == "a"

    with pytest.raises(CheckpointError, match="already exists"):
        jadapters.save_adapters(url, model, v1, overwrite=False)
    with pytest.raises(CheckpointError, match=f"no checkpoint at gs://{emulator.bucket}/run/missing"):
        jadapters.load_adapters(f"gs://{emulator.bucket}/run/missing", wrap(), base_vars)
    other = epath.Path(f"gs://{emulator.bucket}/run/notes")
    (other / "readme.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="not a jadapters checkpoint; refusing to replace it"):
        jadapters.save_adapters(other, model, v1)
    assert (other / "readme.txt").read_text() == "keep me"


def test_full_model_and_training_state_on_gcs(emulator, base_vars, x):
    root = f"gs://{emulator.bucket}/run"
    model, variables = build(base_vars, x, ("a", LinearAdapter(2), {}))
    jadapters.save_model(f"{root}/model", model, variables)
    restored_model, restored = jadapters.load_model(f"{root}/model", Net())
    assert specs(restored_model) == specs(model)
    assert_same_tree(restored, variables)

    step = jadapters.make_train_step(model, lambda out, b: jnp.mean((out - b[1]) ** 2), optax.adam(1e-2))
    state = step.init(variables, jax.random.key(3))
    batches = [(x, jnp.ones((4, 3)))] * 4
    with jadapters.adapter_checkpoint_manager(f"{root}/train", max_to_keep=2, save_interval_steps=2) as manager:
        state, _ = jadapters.fit(step, state, batches, progress=False,
                                 on_step=lambda s, _: jadapters.save_training_state(manager, s, model))
        manager.wait_until_finished()
        assert list(manager.all_steps()) == [2, 4]
    with jadapters.adapter_checkpoint_manager(f"{root}/train") as manager:
        resumed = jadapters.restore_training_state(manager, step.init(variables, jax.random.key(9)))
    assert int(resumed.step) == 4
    assert_same_tree((resumed.trainable, resumed.opt_state), (state.trainable, state.opt_state))
    assert jadapters.inspect_checkpoint(f"{root}/train").metadata.step == 4


@pytest.mark.slow
def test_kill_9_during_saves_on_gcs_never_corrupts(emulator):
    url = f"gs://{emulator.bucket}/kill/adapters"
    kill_trials.run(url, 50, seed=1, max_delay=0.4, env={**os.environ, **emulator.env})
