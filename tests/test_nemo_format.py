"""NeMo's adapter files in: ``load_nemo_state_dict`` (torch-free) and ``load_nemo_adapters`` (torch).

The fixtures in ``tests/fixtures/reference/nemo/`` were made by NeMo's own adapter code
(``make_nemo_reference.py``): a tiny model (hidden 16) whose encoder layers hold a global
pre-norm LinearAdapter, whose decoder layers a post-norm one and whose attention block an
MHA adapter, all with non-zero weights; ``save_adapters``' file, a ``.nemo`` archive, the
same arrays as npz (NeMo's key names) and NeMo's outputs. Loading reproduces them within 1e-5.
"""

from __future__ import annotations

import gzip
import json
import pickle
import re
import tarfile
import zipfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jadapters as ja
from jadapters.errors import AdapterError
from jadapters.nemo_format import nemo_to_flax, read_nemo_file

pytestmark = pytest.mark.xdist_group("nemo_format")
FIXTURES = __import__("pathlib").Path(__file__).parent / "fixtures" / "reference" / "nemo"
TOLERANCE = 1e-5
H = 16
TARGETS = {"encoder": "encoder/layers_*", "attention": "attention", "decoder": "decoder/layers_*"}


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        return jnp.tanh(nn.Dense(H, name="fc")(x))


class Stack(nn.Module):
    def setup(self):
        self.layers = [Block(), Block()]

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class Attention(nn.Module):
    """The block whose output NeMo's MHA adapter attends over; the mask is for the adapter."""

    @nn.compact
    def __call__(self, x, mask):
        return nn.Dense(H, name="fc")(x)


class Tiny(nn.Module):
    def setup(self):
        self.encoder, self.attention, self.decoder = Stack(), Attention(), Stack()

    def __call__(self, x, mask):
        return self.decoder(self.attention(self.encoder(x), mask))


class ScanStep(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return Block(name="block")(x), None


class ScanStack(nn.Module):
    """The two blocks as one layer inside ``nn.scan``: params (and adapters) stacked on a leading axis."""

    @nn.compact
    def __call__(self, x):
        scan = nn.scan(ScanStep, variable_axes={"params": 0}, split_rngs={"params": True}, length=2)
        return scan(name="layers")(x, None)[0]


class ScanTiny(Tiny):
    def setup(self):
        self.encoder, self.attention, self.decoder = ScanStack(), Attention(), ScanStack()


def base_params(weights):
    """The torch model's base weights in Flax's layout (``encoder.layers.0.fc.weight`` -> ``encoder/layers_0/fc/kernel``)."""
    params = {}
    for key, array in weights.items():
        if not key.startswith("model/") or ".adapter_layer." in key:
            continue
        module, leaf = key[len("model/"):].rsplit(".", 1)
        node = params
        for part in nemo_to_flax(None)(module).split("/"):
            node = node.setdefault(part, {})
        node["kernel" if leaf == "weight" else "bias"] = jnp.asarray(array.T if leaf == "weight" else array)
    return {"params": params}


@pytest.fixture(scope="module")
def ref():
    weights = dict(np.load(FIXTURES / "weights.npz"))
    expected = dict(np.load(FIXTURES / "expected.npz"))
    allowed = jnp.asarray(expected["allowed"])
    inputs = (jnp.asarray(expected["x"]), allowed[:, :, None] & allowed[:, None, :])
    config = json.loads((FIXTURES / "config.json").read_text())
    return weights, config, base_params(weights), inputs, expected


def model_state(weights):
    return {k[len("model/"):]: v for k, v in weights.items() if k.startswith("model/")}


def saved_lists(weights):
    """save_adapters' layout back from the npz: ``{qualified name: [state dict, ...]}``."""
    out = {}
    for key, array in weights.items():
        if key.startswith("adapters/"):
            _, qualified, index, name = key.split("/")
            lists = out.setdefault(qualified, [])
            while len(lists) <= int(index):
                lists.append({})
            lists[int(index)][name] = array
    return out


def check(adapted, variables, inputs, expected):
    out = np.asarray(adapted.apply(variables, *inputs))
    diff = float(np.abs(out - expected["adapted"]).max())
    assert diff < TOLERANCE, diff
    return diff


def test_base_model_matches_nemo(ref):
    _, _, params, inputs, expected = ref
    np.testing.assert_allclose(Tiny().apply(params, *inputs), expected["base"], atol=TOLERANCE, rtol=0)


# ---------------------------------------------------------------------------------------------- torch-free


@pytest.fixture(scope="module")
def loaded_from_state_dict(ref):
    weights, config, params, inputs, _ = ref
    return ja.load_nemo_state_dict(model_state(weights), config, Tiny(), params, *inputs, mask_argument=1)


def test_model_state_dict_matches_nemo(ref, loaded_from_state_dict):
    _, _, params, inputs, expected = ref
    adapted, variables = loaded_from_state_dict
    check(adapted, variables, inputs, expected)
    assert sorted((s.name, s.targets, type(s.adapter).__name__) for s in adapted.adapters) == [
        ("lin_post", ("decoder/layers_0", "decoder/layers_1"), "LinearAdapter"),
        ("lin_pre", ("encoder/layers_0", "encoder/layers_1"), "LinearAdapter"),
        ("mha", ("attention",), "MultiHeadAttentionAdapter")]
    assert adapted.get_adapter("lin_post").adapter == ja.LinearAdapter(dim=3, activation="relu", norm_position="post")
    assert adapted.get_adapter("mha").adapter == ja.MultiHeadAttentionAdapter(n_head=2, n_feat=16, proj_dim=8)
    assert adapted.get_adapter("mha").strategy == ja.MHAResidualAdd(mask_argument=1)
    off = adapted.set_enabled_adapters(enabled=False)
    np.testing.assert_allclose(off.apply(variables, *inputs), expected["base"], atol=TOLERANCE, rtol=0)


def test_save_adapters_layout_matches_nemo(ref):
    weights, config, params, inputs, expected = ref
    lists = saved_lists(weights)
    # NeMo's save_adapters picks tensors by substring ('lin_pre' in key): another adapter whose name
    # starts with this one's leaks into its state dicts. Only '<name>.' keys belong to it.
    lists["lin_pre"][0]["lin_pre_v2.module.0.weight"] = np.zeros(3, np.float32)
    before = jax.tree_util.tree_map(np.array, params)
    adapted, variables = ja.load_nemo_state_dict(lists, config, Tiny(), params, *inputs,
                                                 targets=TARGETS, mask_argument=1)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, before)  # the caller's variables are unchanged
    assert "__adapters__" not in params["params"]["encoder"]["layers_0"]
    check(adapted, variables, inputs, expected)
    assert adapted.get_adapter("lin_pre").modules == ()  # global: NeMo's default module, the encoder
    assert adapted.get_adapter("lin_post").qualified_name == "decoder:lin_post"


def test_one_adapter_by_name_onto_an_adapted_model_keeps_its_adapters(ref, loaded_from_state_dict):
    weights, config, params, inputs, _ = ref
    adapted = ja.with_adapters(Tiny(), TARGETS).add_adapter("mine", ja.LoRA(rank=2), targets="**/fc")
    mine = ja.init_adapters(adapted, params, jax.random.key(3), *inputs)
    loaded, variables = ja.load_nemo_state_dict(saved_lists(weights), config, adapted, mine, *inputs,
                                                name="decoder:lin_post")
    assert loaded.adapter_names() == ["mine", "lin_post"]
    ours, _ = ja.split_adapters(variables, ["mine"])
    jax.tree_util.tree_map(np.testing.assert_array_equal, ours, ja.split_adapters(mine, ["mine"])[0])
    want = loaded_from_state_dict[1]["params"]["decoder"]["layers_1"]["__adapters__"]["lin_post"]
    got = variables["params"]["decoder"]["layers_1"]["__adapters__"]["lin_post"]
    jax.tree_util.tree_map(np.testing.assert_array_equal, got, want)


def test_layers_inside_nn_scan_get_stacked_adapters(ref):
    weights, config, params, inputs, expected = ref
    p = params["params"]
    stacked = lambda part: {"layers": {"block": jax.tree_util.tree_map(
        lambda *a: jnp.stack(a), p[part]["layers_0"], p[part]["layers_1"])}}
    scanned = {"params": {**p, "encoder": stacked("encoder"), "decoder": stacked("decoder")}}
    to_flax = lambda name: re.sub(r"\.layers\.\d+$", "/layers/block", name)  # encoder.layers.1 -> encoder/layers/block
    adapted, variables = ja.load_nemo_state_dict(model_state(weights), config, ScanTiny(), scanned, *inputs,
                                                 module_map=to_flax, mask_argument=1)
    check(adapted, variables, inputs, expected)
    targets = {"encoder": "encoder/layers/block", "attention": "attention", "decoder": "decoder/layers/block"}
    adapted, from_lists = ja.load_nemo_state_dict(saved_lists(weights), config, ScanTiny(), scanned, *inputs,
                                                  targets=targets, mask_argument=1)
    jax.tree_util.tree_map(np.testing.assert_array_equal, from_lists, variables)


def test_name_rule_and_module_map():
    assert nemo_to_flax(None)("encoder.layers.12.feed_forward") == "encoder/layers_12/feed_forward"
    params = {"encoder": {"layer": {"0": {"kernel": 1}}}}
    assert nemo_to_flax(None, params)("encoder.layer.0") == "encoder/layer/0"
    assert nemo_to_flax(lambda n: "x/" + n)("a.1") == "x/a.1"


def bad(ref, mutate=None, **kwargs):
    weights, config, params, inputs, _ = ref
    state, config = model_state(weights), json.loads(json.dumps(config))
    if mutate:
        mutate(state, config)
    before = jax.tree_util.tree_map(np.array, params)
    try:
        return ja.load_nemo_state_dict(state, config, Tiny(), params, *inputs, mask_argument=1, **kwargs)
    finally:
        jax.tree_util.tree_map(np.testing.assert_array_equal, params, before)


def test_unknown_adapter_class(ref):
    def mutate(state, config):
        config["lin_post"]["_target_"] = "nemo.collections.asr.parts.submodules.adapters.RelPositionMultiHeadAttentionAdapter"
    with pytest.raises(AdapterError, match=r"adapter 'lin_post': NeMo adapter class '.*RelPosition.*' is not supported"):
        bad(ref, mutate)


def test_unknown_tensor_names_the_adapter_key_and_expected(ref):
    def mutate(state, config):
        state["decoder.layers.1.adapter_layer.lin_post.module.1.weight"] = np.zeros((3, 16), np.float32)
    with pytest.raises(AdapterError, match=r"adapter 'lin_post': tensor 'decoder\.layers\.1\.adapter_layer\.lin_post\."
                                           r"module\.1\.weight' is not a param of NeMo's LinearAdapter, "
                                           r"norm_position='post'; expected \['module\.0\.weight', "):
        bad(ref, mutate)


def test_missing_tensor(ref):
    def mutate(state, config):
        del state["encoder.layers.1.adapter_layer.lin_pre.module.3.weight"]
    with pytest.raises(AdapterError, match=r"no tensor for the adapter's param\(s\) "
                                           r"\['encoder/layers_1/__adapters__/lin_pre/up/kernel'\]"):
        bad(ref, mutate)


def test_shape_mismatch(ref):
    def mutate(state, config):
        config["lin_pre"]["dim"] = 5
    with pytest.raises(AdapterError, match=r"tensor 'encoder\.layers\.0\.adapter_layer\.lin_pre\.module\.1\.weight' "
                                           r"for the Flax param "
                                           r"'.*lin_pre/down/kernel' has shape \(16, 4\).*expects \(16, 5\)"):
        bad(ref, mutate)


def test_missing_module_and_config(ref):
    with pytest.raises(AdapterError, match=r"adapter 'mha' is on NeMo's module 'attention' \(Flax path 'attn'\), "
                                           "which the model's params lack; pass module_map"):
        bad(ref, module_map={"attention": "attn"})

    def no_tensors(state, config):
        config["extra"] = dict(config["lin_pre"])
    with pytest.raises(AdapterError, match=r"adapter 'extra' is in the config but the weights hold no"):
        bad(ref, no_tensors)
    with pytest.raises(AdapterError, match=r"no adapter 'nope'; the file holds \['lin_post', 'lin_pre', 'mha'\]"):
        bad(ref, name="nope")


def test_enabled_flags_and_strategies_come_from_the_config(ref):
    def mutate(state, config):
        config["mha"]["enabled"] = False
        config["lin_pre"]["adapter_strategy"]["stochastic_depth"] = 0.5
        config["lin_post"]["adapter_strategy"] = {
            "_target_": "nemo.core.classes.mixins.adapter_mixin_strategies.ReturnResultAdapterStrategy"}
    adapted, _ = bad(ref, mutate)
    assert sorted(adapted.get_enabled_adapters()) == ["lin_post", "lin_pre"]
    assert adapted.get_adapter("lin_pre").strategy == ja.ResidualAdd(stochastic_depth=0.5)
    assert adapted.get_adapter("lin_post").strategy == ja.ReturnResult()

    def other_strategy(state, config):
        config["lin_pre"]["adapter_strategy"] = {"_target_": "my.CustomStrategy"}
    with pytest.raises(AdapterError, match=r"adapter 'lin_pre': NeMo adapter strategy 'my\.CustomStrategy' is not "
                                           "supported"):
        bad(ref, other_strategy)

    def orphan(state, config):
        state["decoder.layers.0.adapter_layer.ghost.module.0.weight"] = np.zeros((3, 16), np.float32)
    with pytest.raises(AdapterError, match=r"tensor 'decoder\.layers\.0\.adapter_layer\.ghost\.module\.0\.weight' "
                                           r"belongs to adapter 'ghost', which the adapters config lacks"):
        bad(ref, orphan)


def test_save_adapters_layout_needs_placement_and_matching_counts(ref):
    weights, config, params, inputs, _ = ref
    lists = saved_lists(weights)
    with pytest.raises(AdapterError, match=r"does not name the modules holding adapters .*pass targets="):
        ja.load_nemo_state_dict(lists, config, Tiny(), params, *inputs)
    with pytest.raises(AdapterError, match=r"adapter 'lin_pre': the file holds 2 module\(s\), the model places it "
                                           r"on 1: \['encoder/layers_0'\]"):
        ja.load_nemo_state_dict(lists, config, Tiny(), params, *inputs, name="lin_pre",
                                targets={"encoder": "encoder/layers_0"})
    lists["decoder:lin_post"][1]["lin_post.module.9.weight"] = np.zeros(3, np.float32)
    with pytest.raises(AdapterError, match=r"tensor 'decoder:lin_post\[1\] lin_post\.module\.9\.weight' is not a "
                                           r"param of NeMo's LinearAdapter"):
        ja.load_nemo_state_dict(lists, config, Tiny(), params, *inputs, name="lin_post", targets=TARGETS)


# ---------------------------------------------------------------------------------------------- files, torch-free errors


def test_not_a_nemo_file(tmp_path):
    (tmp_path / "x.pt").write_text("hello")
    with pytest.raises(AdapterError, match=r"not a NeMo file: expected save_adapters' torch file \(a zip\) or a "
                                           r"\.nemo archive \(a tar\)"):
        ja.load_nemo_adapters(tmp_path / "x.pt", Tiny(), {})
    with pytest.raises(AdapterError, match="no such file"):
        ja.load_nemo_adapters(tmp_path / "missing.nemo", Tiny(), {})


def test_archive_without_weights_or_adapters(tmp_path):
    config = tmp_path / "model_config.yaml"
    config.write_text("hidden: 16\n")
    with tarfile.open(tmp_path / "a.nemo", "w:") as tar:
        tar.add(config, arcname="./model_config.yaml")
    with pytest.raises(AdapterError, match=r"a \.nemo archive holds model_config\.yaml and model_weights\.ckpt; "
                                           r"\['model_weights\.ckpt'\] missing"):
        read_nemo_file(tmp_path / "a.nemo")
    (tmp_path / "model_weights.ckpt").write_bytes(b"")
    with tarfile.open(tmp_path / "b.nemo", "w:gz") as tar:
        tar.add(config, arcname="./model_config.yaml")
        tar.add(tmp_path / "model_weights.ckpt", arcname="./model_weights.ckpt")
    with pytest.raises(AdapterError, match=r"model_config\.yaml has no 'adapters' section"):
        read_nemo_file(tmp_path / "b.nemo")


def test_a_pickle_with_other_globals_is_refused_before_loading(tmp_path):
    import datetime

    with zipfile.ZipFile(tmp_path / "evil.pt", "w") as z:
        z.writestr("evil/data.pkl", pickle.dumps({"__cfg__": datetime.date(2020, 1, 1)}, protocol=2))
    with pytest.raises(AdapterError, match=r"refused: the file holds \['datetime\.date'\]"):
        read_nemo_file(tmp_path / "evil.pt")


def test_without_torch_a_clear_import_error(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "torch", None)
    with pytest.raises(ImportError, match=r"needs torch: pip install 'jadapters\[nemo\]'"):
        read_nemo_file(FIXTURES / "adapters.pt")


# ---------------------------------------------------------------------------------------------- NeMo's files (torch)


@pytest.mark.parametrize("case", ["adapters.pt", "tiny.nemo", "tiny.nemo.gz"])
def test_nemo_files_match_nemo(ref, case, tmp_path):
    pytest.importorskip("torch")
    _, config, params, inputs, expected = ref
    path = FIXTURES / case
    if case.endswith(".gz"):  # NeMo before 1.7 gzipped its archives
        path = tmp_path / "old.nemo"
        path.write_bytes(gzip.compress((FIXTURES / "tiny.nemo").read_bytes()))
    if case == "adapters.pt":
        import torch

        torch.save({"w": torch.zeros(2)}, tmp_path / "plain.pt")
        with pytest.raises(AdapterError, match=r"not a file of NeMo's save_adapters \(a dict with '__cfg__'\); "
                                               r"found \['w'\]"):
            read_nemo_file(tmp_path / "plain.pt")
    state, read_config = read_nemo_file(path)
    assert read_config == config  # the omegaconf config rebuilt as plain dicts, without omegaconf
    kwargs = {"targets": TARGETS} if case == "adapters.pt" else {}
    adapted, variables = ja.load_nemo_adapters(path, Tiny(), params, *inputs, mask_argument=1, **kwargs)
    check(adapted, variables, inputs, expected)
