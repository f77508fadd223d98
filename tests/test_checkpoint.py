"""Adapter-only checkpoints: round trips, selection, errors, untrusted classes, full model, training state."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jadapters
import kill_trials
from jadapters import (
    AdapterError,
    CheckpointError,
    LinearAdapter,
    LoRA,
    Strategy,
    UnknownAdapterError,
    init_adapters,
    inspect_checkpoint,
    load_adapters,
    load_model,
    save_adapters,
    save_model,
    split_adapters,
    with_adapters,
)
from jadapters.checkpoint import io
from jadapters.checkpoint.format import Metadata
from jadapters.tree import ADAPTERS_KEY

DIM = 8
REPO = Path(__file__).resolve().parents[1]


class Block(nn.Module):
    dim: int

    @nn.compact
    def __call__(self, x):
        return x + nn.Dense(self.dim, name="fc")(nn.LayerNorm(name="ln")(x))


class Net(nn.Module):
    """An encoder and a decoder of residual blocks, then a head."""

    dim: int = DIM
    layers: int = 2

    @nn.compact
    def __call__(self, x):
        for i in range(self.layers):
            x = Block(self.dim, name=f"enc_{i}")(x)
        for i in range(self.layers):
            x = Block(self.dim, name=f"dec_{i}")(x)
        return nn.Dense(3, name="head")(x)


PLACES = {"encoder": "enc_*", "decoder": "dec_*"}


@dataclasses.dataclass(frozen=True)
class Scale(Strategy):
    """A user-written strategy, rebuilt from its class path."""

    factor: float = 1.0
    axes: tuple = (0,)

    def __call__(self, adapter, value, ctx):
        return value + self.factor * adapter(value)


def wrap(model: nn.Module = None) -> jadapters.AdaptedModule:
    return with_adapters(model or Net(), PLACES, global_modules=["encoder"])


@pytest.fixture(scope="module")
def x():
    return jax.random.normal(jax.random.key(0), (4, DIM))


@pytest.fixture(scope="module")
def base_vars(x):
    return Net().init(jax.random.key(1), x)


def perturbed(variables, seed=0):
    """Moves the adapters off their zero init so that their values matter."""
    adapters, rest = split_adapters(variables)
    rng = np.random.default_rng(seed)
    adapters = jax.tree_util.tree_map(lambda a: jnp.asarray(a + 0.1 * rng.standard_normal(a.shape).astype(a.dtype)), adapters)
    return jadapters.merge_trees(adapters, rest)


def build(base_vars, x, *adapters, seed=0):
    """``adapters``: (name, adapter, kwargs) triples; returns (model, variables) with trained-looking adapters."""
    model = wrap()
    for name, adapter, kwargs in adapters:
        model = model.add_adapter(name, adapter, **kwargs)
    return model, perturbed(init_adapters(model, base_vars, jax.random.key(seed + 7), x), seed)


def assert_same_tree(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        assert u.dtype == v.dtype and u.shape == v.shape
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def specs(model):
    return [(s.name, s.modules, s.targets, s.adapter, s.strategy, s.enabled) for s in model.adapters]


# ----------------------------------------------------------------------------- round trips


def test_round_trip_rebuilds_adapters_and_predictions(tmp_path, base_vars, x):
    model, variables = build(
        base_vars, x,
        ("glob", LinearAdapter(4), {}),
        ("decoder:dec", LinearAdapter(3, norm_position="post", activation="relu"), {"enabled": False}),
        ("encoder+decoder:lora", LoRA(rank=2, alpha=4.0), {}),
        ("custom", LinearAdapter(2), {"targets": "re:dec_1", "strategy": Scale(0.5, (1, 2))}),
    )
    path = save_adapters(tmp_path / "ckpt", model, variables)
    assert str(path) == str(tmp_path / "ckpt")

    loaded_model, loaded = load_adapters(path, wrap(), base_vars, allowed_classes=[Scale])
    assert specs(loaded_model) == specs(model)
    assert loaded_model.get_enabled_adapters() == ["glob", "lora", "custom"]
    assert loaded_model.get_adapter("dec").qualified_name == "decoder:dec"
    assert_same_tree(loaded, variables)
    np.testing.assert_array_equal(loaded_model.apply(loaded, x), model.apply(variables, x))

    # Onto a plain Flax module: wrapped with the saved placement.
    plain_model, plain = load_adapters(path, Net(), base_vars, allowed_classes=[Scale])
    assert plain_model.placement == model.placement and specs(plain_model) == specs(model)
    np.testing.assert_array_equal(plain_model.apply(plain, x), model.apply(variables, x))


def test_load_is_functional(tmp_path, base_vars, x):
    model, variables = build(base_vars, x, ("a", LinearAdapter(2), {}))
    save_adapters(tmp_path / "a", model, variables)
    target = wrap()
    before = jax.tree_util.tree_map(lambda a: a, base_vars)
    new_model, new_vars = load_adapters(tmp_path / "a", target, base_vars)
    assert target.adapters == () and new_model is not target
    assert_same_tree(base_vars, before)  # the caller's tree is untouched
    assert new_vars["params"]["enc_0"]["fc"]["kernel"] is base_vars["params"]["enc_0"]["fc"]["kernel"]  # shared, not copied


def test_save_one_or_a_list_and_load_a_subset_by_bare_or_module_name(tmp_path, base_vars, x):
    model, variables = build(
        base_vars, x, ("a", LinearAdapter(2), {}), ("decoder:b", LinearAdapter(2), {}), ("c", LinearAdapter(2), {})
    )
    save_adapters(tmp_path / "b", model, variables, name="decoder:b")
    assert [r["name"] for r in inspect_checkpoint(tmp_path / "b").adapters] == ["b"]
    save_adapters(tmp_path / "ac", model, variables, name=["c", "a"])
    assert [r["name"] for r in inspect_checkpoint(tmp_path / "ac").adapters] == ["a", "c"]

    save_adapters(tmp_path / "all", model, variables)
    only_b, vars_b = load_adapters(tmp_path / "all", wrap(), base_vars, name="b")
    assert only_b.adapter_names() == ["b"]
    assert sorted(jadapters.tree.adapter_locations(vars_b)) == ["b"]
    by_module, _ = load_adapters(tmp_path / "all", wrap(), base_vars, name=["decoder:b", "a"])
    assert by_module.adapter_names() == ["a", "b"]

    # Two files one after the other.
    step1, vars1 = load_adapters(tmp_path / "b", wrap(), base_vars)
    step2, vars2 = load_adapters(tmp_path / "ac", step1, vars1)
    assert step2.adapter_names() == ["b", "a", "c"]
    np.testing.assert_array_equal(step2.apply(vars2, x), model.apply(variables, x))


def test_a_file_holding_a_subset_loads_with_name_none(tmp_path, base_vars, x):
    """NeMo bug: a file with some of the model's adapters failed to load with name=None."""
    model, variables = build(base_vars, x, ("a", LinearAdapter(2), {}), ("b", LinearAdapter(3), {}))
    save_adapters(tmp_path / "subset", model, variables, name="b")
    loaded_model, loaded = load_adapters(tmp_path / "subset", wrap(), base_vars, name=None)
    assert loaded_model.adapter_names() == ["b"]
    assert_same_tree(split_adapters(loaded)[0], split_adapters(variables, ["b"])[0])


def test_names_that_are_prefixes_of_others_never_mix(tmp_path, base_vars, x):
    """NeMo bug: 'an4' matched 'an4_v2' as a substring, leaking tensors between adapters."""
    model, variables = build(
        base_vars, x, ("a", LinearAdapter(2), {}), ("a_v2", LinearAdapter(2), {}), ("v2_a", LinearAdapter(2), {})
    )
    save_adapters(tmp_path / "a", model, variables, name="a")
    info = inspect_checkpoint(tmp_path / "a")
    paths = [e.path for e in info.metadata.arrays]
    assert paths and all(p[p.index("__adapters__") + 1] == "a" for p in paths)
    loaded_model, loaded = load_adapters(tmp_path / "a", wrap(), base_vars)
    assert loaded_model.adapter_names() == ["a"]
    assert_same_tree(split_adapters(loaded)[0], split_adapters(variables, ["a"])[0])

    save_adapters(tmp_path / "all", model, variables)
    for name in ("a", "a_v2", "v2_a"):
        _, got = load_adapters(tmp_path / "all", wrap(), base_vars, name=name)
        assert_same_tree(split_adapters(got)[0], split_adapters(variables, [name])[0])


def test_bfloat16_and_float32_adapters_share_a_checkpoint(tmp_path, base_vars, x):
    model, variables = build(base_vars, x, ("a", LinearAdapter(2), {}), ("b", LinearAdapter(2), {}))
    adapters, rest = split_adapters(variables)
    adapters = jax.tree_util.tree_map_with_path(
        lambda p, a: a.astype(jnp.bfloat16) if "b" in [getattr(k, "key", None) for k in p] else a, adapters
    )
    variables = jadapters.merge_trees(adapters, rest)
    save_adapters(tmp_path / "mixed", model, variables)
    assert sorted(b.dtype for b in inspect_checkpoint(tmp_path / "mixed").metadata.buffers) == ["bfloat16", "float32"]
    _, loaded = load_adapters(tmp_path / "mixed", wrap(), base_vars)
    assert_same_tree(split_adapters(loaded)[0], adapters)


def test_overwrite_replaces_a_checkpoint_and_refuses_other_directories(tmp_path, base_vars, x):
    model, v1 = build(base_vars, x, ("a", LinearAdapter(2), {}), seed=1)
    _, v2 = build(base_vars, x, ("a", LinearAdapter(2), {}), seed=2)
    save_adapters(tmp_path / "a", model, v1)
    save_adapters(tmp_path / "a", model, v2)
    _, loaded = load_adapters(tmp_path / "a", wrap(), base_vars)
    assert_same_tree(split_adapters(loaded)[0], split_adapters(v2)[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["2"]  # the previous save is gone once this one committed
    with pytest.raises(CheckpointError, match="already exists"):
        save_adapters(tmp_path / "a", model, v1, overwrite=False)

    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="not a jadapters checkpoint"):
        save_adapters(precious, model, v1)
    assert (precious / "notes.txt").read_text() == "keep me"
    (tmp_path / "empty").mkdir()
    save_adapters(tmp_path / "empty", model, v1)  # an empty directory may be used


# ----------------------------------------------------------------------------- errors


def test_loading_an_existing_name_fails_before_anything_changes(tmp_path, base_vars, x):
    model, variables = build(base_vars, x, ("a", LinearAdapter(2), {}))
    save_adapters(tmp_path / "a", model, variables)
    with pytest.raises(AdapterError, match="'a' already exists"):
        load_adapters(tmp_path / "a", model, variables)
    other = wrap().add_adapter("a", LinearAdapter(5))
    with pytest.raises(AdapterError, match="already exists"):
        load_adapters(tmp_path / "a", other, base_vars)
    with pytest.raises(AdapterError, match="already hold params of an adapter named 'a'"):
        load_adapters(tmp_path / "a", wrap(), variables)


def test_unknown_name_lists_what_the_file_holds(tmp_path, base_vars, x):
    model, variables = build(base_vars, x, ("a", LinearAdapter(2), {}), ("decoder:b", LinearAdapter(2), {}))
    save_adapters(tmp_path / "ab", model, variables)
    with pytest.raises(UnknownAdapterError, match=r"no adapter named 'zzz'.*\['a', 'decoder:b'\]") as info:
        load_adapters(tmp_path / "ab", wrap(), base_vars, name=["a", "zzz"])
    assert isinstance(info.value, KeyError)
    with pytest.raises(UnknownAdapterError, match="encoder:b"):
        load_adapters(tmp_path / "ab", wrap(), base_vars, name="encoder:b")


def test_fingerprint_mismatch_names_the_path_and_both_shapes(tmp_path, base_vars, x):
    model, variables = build(base_vars, x, ("a", LinearAdapter(2), {}))
    save_adapters(tmp_path / "a", model, variables)
    wider = Net(dim=DIM + 4).init(jax.random.key(0), jnp.ones((1, DIM + 4)))
    with pytest.raises(CheckpointError, match=r"enc_0/fc/kernel: checkpoint base has shape \(8, 8\) float32, "
                                              r"this model has \(12, 12\) float32"):
        load_adapters(tmp_path / "a", with_adapters(Net(dim=DIM + 4), PLACES, global_modules=["encoder"]), wider)
    half = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), base_vars)
    with pytest.raises(CheckpointError, match="bfloat16"):
        load_adapters(tmp_path / "a", wrap(), half)
    # strict=False loads anyway (dtypes differ, shapes match).
    loaded_model, _ = load_adapters(tmp_path / "a", wrap(), half, strict=False)
    assert loaded_model.adapter_names() == ["a"]


def test_placement_mismatch_is_caught_unless_not_strict(tmp_path, base_vars, x):
    model, variables = build(base_vars, x, ("decoder:d", LinearAdapter(2), {}))
    save_adapters(tmp_path / "d", model, variables)
    moved = with_adapters(Net(), {"encoder": "enc_*", "decoder": "dec_1"})
    with pytest.raises(CheckpointError, match=r"module 'decoder' targeted \['dec_\*'\] when saved"):
        load_adapters(tmp_path / "d", moved, base_vars)
    undeclared = with_adapters(Net(), {"encoder": "enc_*"})
    with pytest.raises(CheckpointError, match="does not declare"):
        load_adapters(tmp_path / "d", undeclared, base_vars)
    loaded_model, loaded = load_adapters(tmp_path / "d", undeclared, base_vars, strict=False)
    np.testing.assert_array_equal(loaded_model.apply(loaded, x), model.apply(variables, x))


def test_saving_nothing_is_an_error(tmp_path, base_vars, x):
    with pytest.raises(AdapterError, match="no adapters to save"):
        save_adapters(tmp_path / "none", wrap(), base_vars)
    model, variables = build(base_vars, x, ("a", LinearAdapter(2), {}))
    with pytest.raises(AdapterError, match="no adapter selected"):
        save_adapters(tmp_path / "none", model, variables, name=[])
    with pytest.raises(UnknownAdapterError, match="'b'"):
        save_adapters(tmp_path / "none", model, variables, name="b")
    assert not (tmp_path / "none").exists()


def test_unstorable_hyperparameters_fail_at_save(tmp_path, base_vars, x):
    model, variables = build(base_vars, x, ("a", LinearAdapter(2), {}))
    odd = model.clone(adapters=(dataclasses.replace(model.adapters[0], strategy=Scale(1.0, (object(),))),))
    with pytest.raises(CheckpointError, match=r"adapter .a.: spec\.strategy\.axes has the value .*no JSON form"):
        save_adapters(tmp_path / "odd", odd, variables)
    assert list(tmp_path.iterdir()) == []


def step_dir(path):
    """The one committed step directory of a checkpoint."""
    (step,) = [p for p in Path(path).iterdir() if p.name.isdigit()]
    return step


def data_file(path):
    """The largest file of a checkpoint: its packed float32 buffer."""
    files = [p for p in step_dir(path).rglob("*") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_size)


def edit_metadata(path, change):
    meta_file = step_dir(path) / "_CHECKPOINT_METADATA"
    meta = json.loads(meta_file.read_text())
    change(meta["custom_metadata"])
    meta_file.write_text(json.dumps(meta))


def test_missing_truncated_and_corrupted_checkpoints(tmp_path, base_vars, x):
    model, variables = build(base_vars, x, ("a", LinearAdapter(2), {}))
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_adapters(tmp_path / "missing", wrap(), base_vars)
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        load_adapters(tmp_path / "file", wrap(), base_vars)
    (tmp_path / "plain").mkdir()
    with pytest.raises(CheckpointError, match="not a jadapters checkpoint"):
        load_adapters(tmp_path / "plain", wrap(), base_vars)

    def fresh(name):
        path = save_adapters(tmp_path / name, model, variables)
        return path, data_file(path)

    path, data = fresh("truncated")
    data.write_bytes(data.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="incomplete or corrupted|truncated|CRC32"):
        load_adapters(path, wrap(), base_vars)

    path, _ = fresh("flipped")
    edit_metadata(path, lambda m: m["buffers"][0].update(crc32=m["buffers"][0]["crc32"] ^ 1))
    with pytest.raises(CheckpointError, match="fails its CRC32 check"):
        load_adapters(path, wrap(), base_vars)

    path, data = fresh("gone")
    data.unlink()
    with pytest.raises(CheckpointError, match="incomplete or corrupted"):
        load_adapters(path, wrap(), base_vars)

    path, _ = fresh("bad_metadata")
    (step_dir(path) / "_CHECKPOINT_METADATA").write_text("{not json")
    with pytest.raises(CheckpointError):
        load_adapters(path, wrap(), base_vars)

    path, _ = fresh("not_ours")
    edit_metadata(path, lambda m: m.update(format="something else"))
    with pytest.raises(CheckpointError, match="not a jadapters checkpoint"):
        load_adapters(path, wrap(), base_vars)
    with pytest.raises(CheckpointError, match="not a jadapters checkpoint; refusing to replace it"):
        save_adapters(path, model, variables)

    path, _ = fresh("newer")
    edit_metadata(path, lambda m: m.update(format_version=99))
    with pytest.raises(CheckpointError, match="newer jadapters"):
        load_adapters(path, wrap(), base_vars)

    path, _ = fresh("older")
    edit_metadata(path, lambda m: m.update(format_version=1))
    with pytest.raises(CheckpointError, match="is in format 1, written by jadapters .*load it with that version and save it again"):
        load_adapters(path, wrap(), base_vars)

    path, _ = fresh("missing_field")
    edit_metadata(path, lambda m: m["adapters"][0].pop("targets"))
    with pytest.raises(CheckpointError, match=r"malformed metadata: field 'adapters\[0\]\.targets' is missing"):
        load_adapters(path, wrap(), base_vars)
    with pytest.raises(CheckpointError, match="malformed"):
        inspect_checkpoint(path)

    model_path = save_model(tmp_path / "model", model, variables)
    with pytest.raises(CheckpointError, match="read it with load_model"):
        load_adapters(model_path, wrap(), base_vars)


def test_unknown_path_schemes_are_errors_never_local_writes(tmp_path, base_vars, x, monkeypatch):
    model, variables = build(base_vars, x, ("a", LinearAdapter(2), {}))
    monkeypatch.chdir(tmp_path)
    for path in ("ftp://host/ckpt", "memory://ckpt", "hdfs://cluster/ckpt"):
        with pytest.raises(CheckpointError, match=r"the scheme '\w+://' is not supported; use a local path, gs://"):
            save_adapters(path, model, variables)
        with pytest.raises(CheckpointError, match="is not supported"):
            load_adapters(path, wrap(), base_vars)
        with pytest.raises(CheckpointError, match="is not supported"):
            jadapters.adapter_checkpoint_manager(path)
    assert list(tmp_path.iterdir()) == []  # nothing written locally
    # file:// is a local path.
    saved = save_adapters(f"file://{tmp_path}/local", model, variables)
    assert str(saved) == str(tmp_path / "local") and load_adapters(saved, wrap(), base_vars)[0].adapter_names() == ["a"]
    # A missing client library names the extra to install.
    real = io.importlib.util.find_spec
    monkeypatch.setattr(io.importlib.util, "find_spec", lambda name, *a: None if name == "gcsfs" else real(name, *a))
    with pytest.raises(CheckpointError, match=r"gs:// paths need gcsfs; install it with: pip install 'jadapters\[gcs\]'"):
        save_adapters("gs://bucket/ckpt", model, variables)


def test_only_registered_or_allowed_classes_are_rebuilt(tmp_path, base_vars, x):
    """A checkpoint names classes; loading never imports what the caller did not allow."""
    model, variables = build(base_vars, x, ("a", LinearAdapter(2), {"strategy": Scale(2.0)}))
    path = save_adapters(tmp_path / "a", model, variables)
    target = wrap()
    with pytest.raises(UnknownAdapterError, match=r"adapter 'a'.*names the class 'test_checkpoint\.Scale'.*allowed_classes"):
        load_adapters(path, target, base_vars)
    assert target.adapters == ()
    loaded_model, _ = load_adapters(path, target, base_vars, allowed_classes=[Scale])
    assert loaded_model.get_adapter("a").strategy == Scale(2.0)

    # A stranger's checkpoint naming an importable module: nothing is imported.
    edit_metadata(path, lambda m: m["adapters"][0]["spec"]["fields"]["strategy"].update(__object__="os.system"))
    with pytest.raises(UnknownAdapterError, match="names the class 'os.system'"):
        load_adapters(path, wrap(), base_vars, allowed_classes=[Scale])
    with pytest.raises(AdapterError, match="allowed_classes must hold classes"):
        load_adapters(path, wrap(), base_vars, allowed_classes=["os.system"])


def test_new_spec_and_adapter_fields_round_trip_generically(tmp_path, base_vars, x):
    """Nested frozen dataclasses, dtypes, dicts, tuples and non-finite floats in an adapter's fields."""

    @dataclasses.dataclass(frozen=True)
    class Init:
        scale: float = 1.0
        dims: tuple = (1, 2)

    class Configured(LinearAdapter):
        init: Init = Init()
        table: tuple = (("a", 1.0),)
        dtype: object = jnp.bfloat16
        limit: float = float("inf")

    model, variables = build(
        base_vars, x, ("c", Configured(2, init=Init(0.5, (3,)), table=(("b", 2.0),), limit=float("-inf")), {})
    )
    path = save_adapters(tmp_path / "c", model, variables)
    loaded_model, _ = load_adapters(path, wrap(), base_vars, allowed_classes=[Configured, Init])
    assert specs(loaded_model) == specs(model)
    with pytest.raises(UnknownAdapterError, match="Init"):
        load_adapters(path, wrap(), base_vars, allowed_classes=[Configured])


def test_adapters_with_other_collections_save_every_collection(tmp_path, base_vars, x):
    model, variables = build(base_vars, x, ("a", LinearAdapter(2), {}))
    extra = jax.tree_util.tree_map(lambda a: a * 0 + 3, split_adapters(variables)[0]["params"])
    with_stats = {**variables, "adapter_stats": extra}
    path = save_adapters(tmp_path / "a", model, with_stats)
    _, loaded = load_adapters(path, wrap(), base_vars)
    assert_same_tree(split_adapters(loaded)[0], split_adapters(with_stats)[0])


# ----------------------------------------------------------------------------- atomicity


@pytest.mark.slow
def test_kill_9_at_random_moments_of_50_saves_never_corrupts(tmp_path):
    """Orbax's commit protocol: a killed save leaves the previous checkpoint; the next save cleans up."""
    kill_trials.run(str(tmp_path / "ckpt"), 50, seed=0, max_delay=0.15, env=dict(os.environ))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_a_killed_first_save_leaves_a_directory_the_next_save_may_use(tmp_path, base_vars, x):
    model, variables = build(base_vars, x, ("a", LinearAdapter(2), {}))
    leftover = tmp_path / "a" / "1.orbax-checkpoint-tmp-1234"
    (leftover / "arrays").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="holds no committed orbax checkpoint"):
        load_adapters(tmp_path / "a", wrap(), base_vars)
    save_adapters(tmp_path / "a", model, variables)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["1"]


def test_a_training_manager_start_removes_what_killed_saves_left(tmp_path):
    with jadapters.adapter_checkpoint_manager(tmp_path / "runs", async_save=False) as manager:
        jadapters.save_training_state(manager, {"w": jnp.ones(2)}, step=1)
    (tmp_path / "runs" / "2.orbax-checkpoint-tmp-99" / "arrays").mkdir(parents=True)  # a killed save of step 2
    with jadapters.adapter_checkpoint_manager(tmp_path / "runs", async_save=False) as manager:
        assert manager.all_steps() == [1]
        jadapters.save_training_state(manager, {"w": jnp.zeros(2)}, step=2)
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["1", "2"]


# ----------------------------------------------------------------------------- properties


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    dims=st.lists(st.integers(1, 12), min_size=1, max_size=3),
    norm=st.sampled_from(["pre", "post"]),
    rank=st.integers(1, 4),
    enabled=st.lists(st.booleans(), min_size=4, max_size=4),
)
def test_save_then_load_is_the_identity(tmp_path_factory, base_vars, x, dims, norm, rank, enabled):
    adapters = [(f"lin{i}", LinearAdapter(d, norm_position=norm), {"enabled": enabled[i]}) for i, d in enumerate(dims)]
    adapters.append(("decoder:lora", LoRA(rank=rank), {"enabled": enabled[3]}))
    model, variables = build(base_vars, x, *adapters, seed=sum(dims))
    path = save_adapters(tmp_path_factory.mktemp("prop") / "ckpt", model, variables)
    loaded_model, loaded = load_adapters(path, wrap(), base_vars)
    assert specs(loaded_model) == specs(model)
    assert_same_tree(loaded, variables)


@settings(max_examples=40, deadline=None)
@given(
    arrays=st.lists(
        st.tuples(
            st.lists(st.integers(0, 5), min_size=0, max_size=3),
            st.sampled_from(["float32", "bfloat16", "int32", "float16", "uint8", "bool"]),
        ),
        min_size=1,
        max_size=12,
    )
)
def test_packed_arrays_read_back_exactly(arrays):
    rng = np.random.default_rng(len(arrays))
    leaves = [(rng.standard_normal(shape) * 10).astype(jnp.dtype(dtype)) for shape, dtype in arrays]
    paths = [("params", f"m{i}", ADAPTERS_KEY, "a", "w") for i in range(len(leaves))]
    tree, entries, buffers = io.stored_tree(list(zip(paths, leaves)), pack=True)
    assert len(buffers) <= len({d for _, d in arrays}) and "own" not in tree
    metadata = Metadata("adapters", "0", arrays=entries, buffers=buffers)
    got = io.read_arrays(lambda args: {"arrays": tree}, metadata, entries, [None] * len(entries), "here")
    for leaf, array in zip(leaves, got):
        assert array.dtype == leaf.dtype and array.shape == leaf.shape
        np.testing.assert_array_equal(np.asarray(array), leaf)


# ----------------------------------------------------------------------------- full model, inspect, training


def test_save_model_and_load_model(tmp_path, base_vars, x):
    model, variables = build(base_vars, x, ("a", LinearAdapter(2), {}), ("decoder:b", LoRA(2), {"enabled": False}))
    path = save_model(tmp_path / "model", model, variables)
    restored, restored_vars = load_model(path, Net())
    assert specs(restored) == specs(model)
    assert_same_tree(restored_vars, variables)
    np.testing.assert_array_equal(restored.apply(restored_vars, x), model.apply(variables, x))
    with pytest.raises(AdapterError, match="without adapters"):
        load_model(path, model)
    adapters_only = save_adapters(tmp_path / "adapters", model, variables)
    assert inspect_checkpoint(adapters_only).disk_bytes < inspect_checkpoint(path).disk_bytes


def test_inspect_reports_types_placement_sizes_and_fingerprint(tmp_path, base_vars, x):
    model, variables = build(base_vars, x, ("a", LinearAdapter(2), {}), ("decoder:b", LoRA(2), {"enabled": False}))
    info = inspect_checkpoint(save_adapters(tmp_path / "ab", model, variables))
    rows = {r["name"]: r for r in info.adapters}
    assert rows["a"]["type"] == "LinearAdapter" and rows["b"]["type"] == "LoRA"
    assert rows["a"]["locations"] == ["enc_0", "enc_1"] and rows["b"]["modules"] == ["decoder"]
    assert rows["b"]["enabled"] is False
    assert rows["a"]["params"] == 2 * (2 * DIM + 2 * DIM * 2)
    assert rows["a"]["bytes"] == 4 * rows["a"]["params"]
    as_dict = json.loads(json.dumps(info.as_dict()))
    assert as_dict["base_fingerprint"]["params"]["enc_0"]["fc/kernel"] == [[DIM, DIM], "float32"]
    assert as_dict["placement"]["modules"] == [["encoder", ["enc_*"]], ["decoder", ["dec_*"]]]
    assert {"rank": 2, "alpha": 8.0, "dropout": 0.0}.items() <= as_dict["adapters"][1]["hyperparameters"].items()
    text = str(info)
    assert "LinearAdapter" in text and "decoder:dec_*" in text and info.metadata.fingerprint.digest in text


def test_periodic_training_checkpoints_resume(tmp_path, base_vars, x):
    model = wrap().add_adapter("a", LinearAdapter(2))
    variables = init_adapters(model, base_vars, jax.random.key(3), x)
    loss = lambda out, batch: jnp.mean((out - batch[1]) ** 2)
    step = jadapters.make_train_step(model, loss, optax.adam(1e-2))
    batches = [(x, jnp.ones((4, 3)))] * 7
    with jadapters.adapter_checkpoint_manager(tmp_path / "runs", max_to_keep=2, save_interval_steps=2) as manager:
        state, _ = jadapters.fit(
            step, step.init(variables, jax.random.key(4)), batches, progress=False,
            on_step=lambda s, _: jadapters.save_training_state(manager, s, model),
        )
        manager.wait_until_finished()
        assert list(manager.all_steps()) == [4, 6]
    with jadapters.adapter_checkpoint_manager(tmp_path / "runs") as manager:
        template = step.init(variables, jax.random.key(99))
        resumed = jadapters.restore_training_state(manager, template)
        assert int(resumed.step) == 6
        assert resumed.frozen is template.frozen
        at_six = jadapters.fit(step, step.init(variables, jax.random.key(4)), batches[:6], progress=False)[0]
        assert_same_tree((resumed.trainable, resumed.opt_state), (at_six.trainable, at_six.opt_state))
        np.testing.assert_array_equal(jax.random.key_data(resumed.rng), jax.random.key_data(at_six.rng))
        # Training goes on from the restored state exactly as it would have.
        np.testing.assert_array_equal(
            step(resumed, batches[6])[0].trainable["params"]["enc_0"]["__adapters__"]["a"]["up"]["kernel"],
            state.trainable["params"]["enc_0"]["__adapters__"]["a"]["up"]["kernel"],
        )
        older = jadapters.restore_training_state(manager, template, step=4)
        assert int(older.step) == 4
        with pytest.raises(CheckpointError, match="no training checkpoint for step 5"):
            jadapters.restore_training_state(manager, template, step=5)
        wrong = step.init(init_adapters(wrap().add_adapter("a", LinearAdapter(3)), base_vars, jax.random.key(3), x),
                          jax.random.key(0))
        with pytest.raises(CheckpointError, match=r"saved with shape"):
            jadapters.restore_training_state(manager, wrong)
    info = inspect_checkpoint(tmp_path / "runs")
    assert info.kind == "training_state" and info.metadata.step == 6
    assert info.adapters[0]["params"] == 2 * (2 * DIM + 2 * DIM * 2)
    with jadapters.adapter_checkpoint_manager(tmp_path / "empty") as manager:
        with pytest.raises(CheckpointError, match="no training checkpoint"):
            jadapters.restore_training_state(manager, template)


def test_saving_adapters_that_were_never_initialised_raises(tmp_path):
    x = jnp.ones((2, 4))
    base = nn.Dense(4)
    params = base.init(jax.random.key(0), x)
    model = jadapters.with_adapters(base, {"d": ""}).add_adapter("a", jadapters.LinearAdapter(2))
    with pytest.raises(jadapters.AdapterError, match=r"adapters \['a'\] have no variables.*init_adapters"):
        jadapters.save_adapters(tmp_path / "a", model, params)
    assert not (tmp_path / "a").exists()
