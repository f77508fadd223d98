"""PEFT's adapter format: ``load_peft`` on the real PEFT files of the reference fixtures, ``save_peft`` back.

Each case loads PEFT's saved adapter onto Hugging Face's Flax BERT, compares
``last_hidden_state`` with PEFT's own output within 1e-5, writes it back with
``save_peft`` (PEFT's tensor names and shapes, checked against PEFT's file) and
reloads it (identical outputs).
"""

from __future__ import annotations

import json
import shutil
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("transformers")
import reference  # noqa: E402

import jadapters as ja  # noqa: E402
from jadapters.tree import merge_trees, split_adapters  # noqa: E402

pytestmark = pytest.mark.xdist_group("peft_format")
TOLERANCE = 1e-5
CASES = ["lora", "lora_rslora", "lora_patterns", "lora_bias", "lora_lora_bias", "lora_embedding", "dora", "ia3",
         "vera", "vera_mixed_shapes", "prompt_tuning"]


@pytest.fixture(scope="module")
def bert():
    module, variables = reference.tiny_bert()
    return module, variables, reference.bert_inputs()


def adapter_dir(case):
    return reference.case_dir(f"peft/{case}") / "adapter"


def hidden(adapted, variables, inputs):
    return np.asarray(adapted.apply(variables, *inputs).last_hidden_state)


def shapes(folder):
    return {k: v.shape for k, v in reference.weights(folder / "adapter_model.safetensors").items()}


@pytest.mark.parametrize("case", CASES)
def test_load_matches_peft_and_save_round_trips(bert, case, tmp_path):
    module, base, inputs = bert
    before = jax.tree_util.tree_map(np.array, base)
    adapted, variables = ja.load_peft(adapter_dir(case), module, base, *inputs)
    out = hidden(adapted, variables, inputs)
    np.testing.assert_allclose(out, reference.expected(f"peft/{case}")["last_hidden_state"], atol=TOLERANCE, rtol=0)
    jax.tree_util.tree_map(np.testing.assert_array_equal, base, before)  # the caller's variables are unchanged

    ja.save_peft(tmp_path, adapted, variables)
    assert shapes(tmp_path) == shapes(adapter_dir(case))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    theirs = json.loads((adapter_dir(case) / "adapter_config.json").read_text())
    assert config["peft_type"] == theirs["peft_type"]
    again, reloaded = ja.load_peft(tmp_path, module, base, *inputs)
    np.testing.assert_array_equal(hidden(again, reloaded, inputs), out)


def test_patterns_are_resolved_on_the_torch_names_and_written_per_module(bert, tmp_path):
    module, base, inputs = bert
    adapted, variables = ja.load_peft(adapter_dir("lora_patterns"), module, base, *inputs)
    lora = adapted.get_adapter("default").adapter
    assert lora.rank_and_alpha("encoder/layer/1/attention/self/value") == (6, 8.0)
    assert lora.rank_and_alpha("encoder/layer/0/attention/self/value") == (4, 8.0)
    assert lora.rank_and_alpha("encoder/layer/0/attention/self/query") == (4, 16.0)
    assert lora.rank_and_alpha("encoder/layer/1/intermediate/dense") == (2, 8.0)
    ja.save_peft(tmp_path, adapted, variables)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["rank_pattern"]["encoder.layer.1.attention.self.value"] == 6
    assert config["alpha_pattern"]["encoder.layer.0.attention.output.dense"] == 4


def test_an_adapted_model_gets_the_adapter_beside_its_own(bert):
    module, base, inputs = bert
    adapted = ja.with_adapters(module, "hf_bert").add_adapter("mine", ja.LoraConfig(r=2, target_modules=["key"]))
    variables = ja.init_adapters(adapted, base, jax.random.key(0), *inputs)
    both, loaded = ja.load_peft(adapter_dir("lora"), adapted, variables, *inputs, adapter_name="peft")
    assert both.adapter_names() == ["mine", "peft"]
    mine, _ = split_adapters(loaded, ["mine"])
    jax.tree_util.tree_map(np.testing.assert_array_equal, mine, split_adapters(variables, ["mine"])[0])


def copy_adapter(case, tmp_path, **config_changes):
    folder = tmp_path / case
    shutil.copytree(adapter_dir(case), folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(config_changes)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def test_unknown_config_fields_are_ignored_with_a_warning(bert, tmp_path):
    module, base, inputs = bert
    folder = copy_adapter("lora", tmp_path, some_future_option=3)
    with pytest.warns(UserWarning, match=r"ignoring config field\(s\).*\['some_future_option'\]"):
        adapted, variables = ja.load_peft(folder, module, base, *inputs)
    np.testing.assert_allclose(hidden(adapted, variables, inputs), reference.expected("peft/lora")["last_hidden_state"],
                               atol=TOLERANCE, rtol=0)


def test_load_errors_name_the_file_and_what_was_expected(bert, tmp_path):
    module, base, inputs = bert
    with pytest.raises(ja.AdapterError, match=r"empty: expected PEFT's adapter directory .*adapter_config.json is missing"):
        ja.load_peft(tmp_path / "empty", module, base, *inputs)

    corrupt = copy_adapter("lora", tmp_path)
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    with pytest.raises(ja.AdapterError, match=r"adapter_model.safetensors: not a readable safetensors file"):
        ja.load_peft(corrupt, module, base, *inputs)
    (corrupt / "adapter_config.json").write_text("{not json")
    with pytest.raises(ja.AdapterError, match=r"adapter_config.json: not a readable JSON config"):
        ja.load_peft(corrupt, module, base, *inputs)

    with pytest.raises(ja.AdapterError, match=r"peft_type 'LOHA' is not supported; jadapters loads \['IA3', 'LORA'"):
        ja.load_peft(copy_adapter("ia3", tmp_path, peft_type="LOHA"), module, base, *inputs)

    with pytest.raises(ja.AdapterError, match=(
            r"tensor 'base_model.model.encoder.layer.0.attention.self.query.lora_A.weight' for the Flax param "
            r"'encoder/layer/0/attention/self/query/__adapters__/default/lora_a/kernel' has shape \(32, 4\) "
            r"\(Flax layout\), the model expects \(32, 2\)")):
        ja.load_peft(copy_adapter("lora", tmp_path / "r2", r=2), module, base, *inputs)

    with pytest.raises(ja.AdapterError, match=r"prompt tuning expects num_virtual_tokens, a positive int, got None"):
        ja.load_peft(copy_adapter("prompt_tuning", tmp_path, num_virtual_tokens=None), module, base, *inputs)

    moved = lambda name: name.replace("encoder.layer", "encoder.block").replace(".", "/")
    with pytest.raises(ja.AdapterError, match=(
            r"target module 'encoder.layer.0.attention.self.query' \(Flax path "
            r"'encoder/block/0/attention/self/query'\) is absent from the model's params")):
        ja.load_peft(adapter_dir("lora"), module, base, *inputs, module_map=moved)


def test_a_file_lacking_a_tensor_the_config_implies_is_an_error(bert, tmp_path):
    module, base, inputs = bert
    folder = copy_adapter("dora", tmp_path)
    tensors = reference.weights(folder / "adapter_model.safetensors")
    from safetensors.numpy import save_file

    save_file({k: v for k, v in tensors.items() if "layer.1.attention.self.value.lora_magnitude" not in k},
              str(folder / "adapter_model.safetensors"))
    with pytest.raises(ja.AdapterError, match=(
            r"no tensor for the adapter's param\(s\) \['encoder/layer/1/attention/self/value/__adapters__/default/"
            r"lora_magnitude'\] \(check the config: LORA with \{'use_dora': True, 'bias': 'none', 'lora_bias': False")):
        ja.load_peft(folder, module, base, *inputs)


def test_vera_without_saved_projections_is_an_error(bert, tmp_path):
    module, base, inputs = bert
    folder = copy_adapter("vera", tmp_path, save_projection=False)
    tensors = reference.weights(folder / "adapter_model.safetensors")
    from safetensors.numpy import save_file

    save_file({k: v for k, v in tensors.items() if k.startswith("base_model.model.")},
              str(folder / "adapter_model.safetensors"))
    with pytest.raises(ja.AdapterError, match=r"VeRA adapter needs 'base_model.vera_A'.*save_projection=True"):
        ja.load_peft(folder, module, base, *inputs)


class Mine(nn.Module):
    """A model whose Flax names are not its (imagined) torch names."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, name="proj_out")(nn.relu(nn.Dense(5, name="proj_in")(x)))


def test_module_map_for_a_model_of_ones_own(tmp_path):
    x = jnp.ones((2, 4))
    params = Mine().init(jax.random.key(0), x)
    adapted = ja.with_adapters(Mine()).add_adapter("a", ja.LoraConfig(r=2, target_modules=["proj_in", "proj_out"],
                                                                       init_lora_weights=False))
    variables = ja.init_adapters(adapted, params, jax.random.key(1), x)
    names = {"mlp.fc1": "proj_in", "mlp.fc2": "proj_out"}
    ja.save_peft(tmp_path, adapted, variables, module_map=names)
    assert sorted(shapes(tmp_path)) == [f"base_model.model.mlp.fc{i}.lora_{ab}.weight" for i in (1, 2) for ab in "AB"]
    assert shapes(tmp_path)["base_model.model.mlp.fc1.lora_A.weight"] == (2, 4)  # torch's (r, in)
    loaded, new = ja.load_peft(tmp_path, Mine(), params, x, module_map=lambda torch_name: names[torch_name])
    np.testing.assert_array_equal(loaded.apply(new, x), adapted.apply(variables, x))


def test_save_errors(bert, tmp_path):
    x = jnp.ones((2, 4))
    base = nn.Sequential([nn.Dense(4), nn.Dense(3)])
    params = base.init(jax.random.key(0), x)
    linear = ja.with_adapters(base, {"d": "layers_0"}).add_adapter("d:a", ja.LinearAdapter(dim=2))
    with pytest.raises(ja.AdapterError, match=r"adapter 'a' is a LinearAdapter, which PEFT has no format for"):
        ja.save_peft(tmp_path / "linear", linear, ja.init_adapters(linear, params, jax.random.key(1), x))

    module, bert_base, inputs = bert
    adapted = ja.with_adapters(module, "hf_bert").add_adapter("bn", "seq_bn[reduction_factor=8]")
    variables = ja.init_adapters(adapted, bert_base, jax.random.key(0), *inputs)
    with pytest.raises(ja.AdapterError, match=r"adapter 'bn' is a Bottleneck, which PEFT has no format for"):
        ja.save_peft(tmp_path / "bn", adapted, variables)

    lora = ja.with_adapters(base).add_adapter("a", ja.LoraConfig(r=2, target_modules=["layers_0"]))
    lora_variables = ja.init_adapters(lora, params, jax.random.key(1), x)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ja.AdapterError, match=r"cannot write PEFT's adapter to '.*a_file/out'"):
        ja.save_peft(blocker / "out", lora, lora_variables)
    two = lora.add_adapter("b", ja.LoraConfig(r=2, target_modules=["layers_1"]))
    with pytest.raises(ja.AdapterError, match=r"save_peft writes one adapter; the model has \['a', 'b'\]: pass name="):
        ja.save_peft(tmp_path / "two", two, ja.init_adapters(two, params, jax.random.key(1), x))


def test_peft_loads_what_save_peft_wrote(bert, tmp_path):
    """Real PEFT on the torch BERT of the fixtures reads save_peft's directory (skipped without torch and peft)."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from transformers import BertModel

    module, base, inputs = bert
    data = reference.inputs()
    for case in ("lora_patterns", "lora_bias", "dora", "ia3", "vera_mixed_shapes", "prompt_tuning"):
        adapted, variables = ja.load_peft(adapter_dir(case), module, base, *inputs)
        ours = hidden(adapted, variables, inputs)
        ja.save_peft(tmp_path / case, adapted, variables)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # PEFT's prompt tuning ignores token types, with a warning
            model = BertModel.from_pretrained(reference.FIXTURES / "base", add_pooling_layer=False)
            model = peft.PeftModel.from_pretrained(model, tmp_path / case).eval()
            theirs = model(input_ids=torch.tensor(data["input_ids"]).long(),
                           attention_mask=torch.tensor(data["attention_mask"]).long(),
                           token_type_ids=torch.tensor(data["token_type_ids"]).long()).last_hidden_state.numpy()
        np.testing.assert_allclose(ours, theirs, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("save_projection", [False, True])
def test_vera_of_mixed_shapes_round_trips_with_its_projections(tmp_path, save_projection):
    """Output widths may differ (B is sliced, as PEFT's shared vera_B); unstored projections are regenerated."""
    x = jnp.ones((2, 4))
    base = nn.Sequential([nn.Dense(4), nn.Dense(3)])
    params = base.init(jax.random.key(0), x)
    config = ja.VeraConfig(r=2, target_modules=["layers_0", "layers_1"], save_projection=save_projection)
    adapted = ja.with_adapters(base).add_adapter("v", config)
    variables = ja.init_adapters(adapted, params, jax.random.key(1), x)
    adapters, rest = split_adapters(variables)
    adapters["params"] = jax.tree_util.tree_map(lambda a: a + 0.5, adapters["params"])  # non-zero lambda_b
    variables = merge_trees(rest, adapters)
    ja.save_peft(tmp_path, adapted, variables)
    assert shapes(tmp_path)["base_model.vera_A"] == (2, 4) and shapes(tmp_path)["base_model.vera_B"] == (4, 2)
    loaded, new = ja.load_peft(tmp_path, base, params, x)
    np.testing.assert_allclose(loaded.apply(new, x), adapted.apply(variables, x), atol=1e-6, rtol=0)


def test_vera_over_different_input_widths_cannot_be_written(tmp_path):
    x = jnp.ones((2, 4))
    base = nn.Sequential([nn.Dense(6), nn.Dense(3)])
    adapted = ja.with_adapters(base).add_adapter("v", ja.VeraConfig(r=2, target_modules=["layers_0", "layers_1"]))
    variables = ja.init_adapters(adapted, base.init(jax.random.key(0), x), jax.random.key(1), x)
    with pytest.raises(ja.AdapterError, match=r"adapter 'v' at 'layers_\d': its VeRA projections are not slices"):
        ja.save_peft(tmp_path, adapted, variables)
