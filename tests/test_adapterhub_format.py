"""AdapterHub's adapter format: ``load_adapterhub`` on the real AdapterHub files of the reference fixtures, back with
``save_adapterhub``.

Each case loads AdapterHub's saved adapter onto Hugging Face's Flax BERT,
compares ``last_hidden_state`` with AdapterHub's own output within 1e-5, writes
it back with ``save_adapterhub`` (AdapterHub's tensor names, shapes and config
fields, checked against its files) and reloads it (identical outputs).
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
from safetensors.numpy import save_file  # noqa: E402

import jadapters as ja  # noqa: E402
from jadapters.adapterhub_format import bottleneck_leaf, bottleneck_tensor  # noqa: E402

pytestmark = pytest.mark.xdist_group("adapterhub_format")
TOLERANCE = 1e-5
CASES = ["seq_bn", "seq_bn_options", "seq_bn_post_add", "seq_bn_no_ln_after", "seq_bn_gating", "seq_bn_leave_out",
         "double_seq_bn", "par_bn", "scaled_par_bn", "compacter", "compacter_pp", "lora", "ia3", "prefix_tuning",
         "prefix_tuning_flat", "prompt_tuning"]


@pytest.fixture(scope="module")
def bert():
    module, variables = reference.tiny_bert()
    return module, variables, reference.bert_inputs()


def adapter_dir(case, tmp_path):
    return reference.adapterhub_dir(case, tmp_path)


def hidden(adapted, variables, inputs):
    return np.asarray(adapted.apply(variables, *inputs).last_hidden_state)


def shapes(folder):
    return {k: v.shape for k, v in reference.weights(folder / "adapter.safetensors").items()}


def config_of(folder):
    return json.loads((folder / "adapter_config.json").read_text())


@pytest.mark.parametrize("case", CASES)
def test_load_matches_adapterhub_and_save_round_trips(bert, case, tmp_path):
    module, base, inputs = bert
    before = jax.tree_util.tree_map(np.array, base)
    folder = adapter_dir(case, tmp_path)
    adapted, variables = ja.load_adapterhub(folder, module, base, *inputs)
    assert adapted.adapter_names() == ["a"]  # the file's name
    out = hidden(adapted, variables, inputs)
    np.testing.assert_allclose(out, reference.expected(f"adapters/{case}")["last_hidden_state"], atol=TOLERANCE,
                               rtol=0)
    jax.tree_util.tree_map(np.testing.assert_array_equal, base, before)  # the caller's variables are unchanged

    saved = tmp_path / "saved"
    ja.save_adapterhub(saved, adapted, variables)
    assert shapes(saved) == shapes(folder)
    ours, theirs = config_of(saved), config_of(folder)
    assert ours["name"] == theirs["name"] and ours["hidden_size"] == theirs["hidden_size"]
    if "architecture" in theirs["config"]:
        assert set(ours["config"]) <= set(theirs["config"])
    else:  # a bottleneck: every field of AdapterHub's BnConfig, as AdapterHub wrote it
        assert ours["config"] == theirs["config"]
    for field in ("architecture", "r", "alpha", "composition_mode", "attn_matrices", "selfattn_lora",
                  "intermediate_lora", "output_lora", "prefix_length", "flat", "prompt_length", "combine",
                  "reduction_factor", "mh_adapter", "output_adapter", "original_ln_before", "residual_before_ln",
                  "scaling", "leave_out", "phm_layer"):
        assert ours["config"].get(field) == theirs["config"].get(field), field
    again, reloaded = ja.load_adapterhub(saved, module, base, *inputs)
    np.testing.assert_array_equal(hidden(again, reloaded, inputs), out)


def test_names_map_both_ways():
    assert bottleneck_leaf("adapter_down.0.weight") == (("adapter_down", "kernel"), True)
    assert bottleneck_leaf("adapter_up.W_left") == (("adapter_up", "W_left"), False)
    assert bottleneck_leaf("adapter_norm_before.weight") == (("adapter_norm_before", "scale"), False)
    assert bottleneck_leaf("gate.bias") == (("gate", "bias"), False)
    for tensor in ("adapter_down.0.weight", "adapter_down.0.W_right", "adapter_up.bias", "gate.weight", "scaling",
                   "adapter_norm_after.weight"):
        assert bottleneck_tensor(bottleneck_leaf(tensor)[0]) == (tensor, bottleneck_leaf(tensor)[1])


def test_adapter_name_a_head_prefix_and_an_adapted_model(bert, tmp_path):
    module, base, inputs = bert
    folder = adapter_dir("lora", tmp_path)
    mine = ja.with_adapters(module, "hf_bert").add_adapter("mine", ja.LoraConfig(r=2, target_modules=["key"]))
    variables = ja.init_adapters(mine, base, jax.random.key(0), *inputs)
    kept = jax.tree_util.tree_map(np.array, variables)
    both, loaded = ja.load_adapterhub(folder, mine, variables, *inputs, adapter_name="hub")
    assert both.adapter_names() == ["mine", "hub"] and mine.adapter_names() == ["mine"]
    jax.tree_util.tree_map(np.testing.assert_array_equal, variables, kept)
    jax.tree_util.tree_map(np.testing.assert_array_equal, ja.split_adapters(loaded, ["mine"])[0],
                           ja.split_adapters(variables, ["mine"])[0])
    # Saved from a model with a head (torch names 'bert.encoder...'): the default rule drops the prefix.
    headed = tmp_path / "headed"
    ja.save_adapterhub(headed, both, loaded, name="hub", module_map=lambda p: "bert." + p.replace("/", "."))
    assert all(k.startswith("bert.encoder.layer.") for k in shapes(headed))
    again, reloaded = ja.load_adapterhub(headed, module, base, *inputs)
    assert again.adapter_names() == ["hub"]
    expected = reference.expected("adapters/lora")["last_hidden_state"]
    np.testing.assert_allclose(hidden(again, reloaded, inputs), expected, atol=TOLERANCE, rtol=0)


def copy_adapter(case, tmp_path, tensors=None, **config_changes):
    folder = tmp_path / f"copy_{case}_{len(list(tmp_path.glob('copy_*')))}"
    shutil.copytree(adapter_dir(case, tmp_path), folder)
    config = config_of(folder)
    config["config"].update(config_changes)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    if tensors is not None:
        save_file(tensors, str(folder / "adapter.safetensors"))
    return folder


def test_unknown_config_fields_are_ignored_with_a_warning(bert, tmp_path):
    module, base, inputs = bert
    folder = copy_adapter("seq_bn", tmp_path, some_future_option=3)
    with pytest.warns(UserWarning, match=r"ignoring config field\(s\) jadapters does not know: \['some_future_opt"):
        adapted, variables = ja.load_adapterhub(folder, module, base, *inputs)
    np.testing.assert_allclose(hidden(adapted, variables, inputs),
                               reference.expected("adapters/seq_bn")["last_hidden_state"], atol=TOLERANCE, rtol=0)


def test_load_errors(bert, tmp_path):
    module, base, inputs = bert
    pickle_only = reference.case_dir("adapters/prefix_tuning") / "adapter"
    with pytest.raises(ja.AdapterError, match=r"holds only pytorch_adapter.bin, a torch pickle, which jadapters does "
                                              r"not unpickle; re-save .*use_safetensors=True"):
        ja.load_adapterhub(pickle_only, module, base, *inputs)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ja.AdapterError, match=r"empty: expected AdapterHub's adapter directory .*adapter_config.json"):
        ja.load_adapterhub(tmp_path / "empty", module, base, *inputs)
    with pytest.raises(ja.AdapterError, match=r"architecture 'fusion' is not supported; jadapters loads "
                                              r"\['bottleneck', 'lora', 'prefix_tuning', 'prompt_tuning', 'union'\]"):
        ja.load_adapterhub(copy_adapter("seq_bn", tmp_path, architecture="fusion"), module, base, *inputs)

    seq_bn = reference.weights(adapter_dir("seq_bn", tmp_path) / "adapter.safetensors")
    down = "encoder.layer.0.output.adapters.a.adapter_down.0.weight"
    with pytest.raises(ja.AdapterError, match=(
            rf"adapter.safetensors: tensor '{down}' for the Flax param "
            r"'encoder/layer/0/output/__adapters__/a/adapter_down/kernel' has shape \(32, 3\) \(Flax layout\), the "
            r"model expects \(32, 2\)")):
        ja.load_adapterhub(copy_adapter("seq_bn", tmp_path, {**seq_bn, down: np.ones((3, 32), np.float32)}),
                           module, base, *inputs)
    moved = {k.replace("layer.1.", "layer.7."): v for k, v in seq_bn.items()}
    with pytest.raises(ja.AdapterError, match=r"module 'encoder.layer.7.output' \(Flax path 'encoder/layer/7/output'\)"
                                              r" is absent from the model's params; pass module_map"):
        ja.load_adapterhub(copy_adapter("seq_bn", tmp_path, moved), module, base, *inputs)
    with pytest.raises(ja.AdapterError, match=r"config not supported: .*shared_W_phm"):
        ja.load_adapterhub(copy_adapter("seq_bn", tmp_path, shared_W_phm=True), module, base, *inputs)
    # AdapterHub's own save of a Compacter on a bare model lacks the shared rule: named, with the reason.
    compacter = reference.case_dir("adapters/compacter") / "adapter"
    with pytest.raises(ja.AdapterError, match=r"no tensor for the adapter's param\(s\) \['__adapters__/a/__shared__/"
                                              r"phm_rule'\] .*'shared_parameters.a.phm_rule', which AdapterHub's "
                                              r"save_adapter leaves out"):
        ja.load_adapterhub(compacter, module, base, *inputs)
    with pytest.raises(ja.AdapterError, match=r"AdapterHub's LoRA with use_dora=True is not supported"):
        ja.load_adapterhub(copy_adapter("lora", tmp_path, use_dora=True), module, base, *inputs)
    prefix = reference.weights(adapter_dir("prefix_tuning_flat", tmp_path) / "adapter.safetensors")
    (tensor, flat), = prefix.items()
    with pytest.raises(ja.AdapterError, match=rf"tensor '{tensor}' has shape \(500,\), the model's 2 attention "
                                              r"layers expect \(512,\)"):
        ja.load_adapterhub(copy_adapter("prefix_tuning_flat", tmp_path, {tensor: flat[:500]}), module, base, *inputs)


def test_save_errors(bert, tmp_path):
    module, base, inputs = bert
    x = jnp.ones((2, 4))
    plain = nn.Sequential([nn.Dense(4), nn.Dense(3)])
    params = plain.init(jax.random.key(0), x)

    def saving(method, name="a", **kwargs):
        adapted = ja.with_adapters(plain).add_adapter(name, method)
        ja.save_adapterhub(tmp_path / name, adapted, ja.init_adapters(adapted, params, jax.random.key(1), x), **kwargs)

    with pytest.raises(ja.AdapterError, match=r"adapter 'v' is a VeRA, which AdapterHub has no format for"):
        saving(ja.VeraConfig(r=2, target_modules=["layers_0"]), "v")
    with pytest.raises(ja.AdapterError, match=r"adapter 'd': AdapterHub's LoRA has no use_dora"):
        saving(ja.LoraConfig(r=2, target_modules=["layers_0"], use_dora=True), "d")
    with pytest.raises(ja.AdapterError, match=r"'layers_1': AdapterHub's IA3 scales layer outputs; this one scales "
                                              r"the input"):
        saving(ja.IA3Config(target_modules=["layers_1"], feedforward_modules=["layers_1"]), "i")
    with pytest.warns(UserWarning, match=r"\['layers_0'\] are none of them, so AdapterHub will not load those"):
        saving(ja.LoraConfig(r=2, target_modules=["layers_0"]), "elsewhere")

    peft_prefix = ja.with_adapters(module, "hf_bert").add_adapter("p", "prefix_tuning[num_virtual_tokens=2]")
    variables = ja.init_adapters(peft_prefix, base, jax.random.key(0), *inputs)
    with pytest.raises(ja.AdapterError, match=r"adapter 'p': only AdapterHub-style prefix tuning"):
        ja.save_adapterhub(tmp_path / "p", peft_prefix, variables)
    peft_prompt = ja.with_adapters(module, "hf_bert").add_adapter("q", "prompt_tuning[num_virtual_tokens=2]")
    with pytest.raises(ja.AdapterError, match=r"adapter 'q': only AdapterHub-style prompt tuning"):
        ja.save_adapterhub(tmp_path / "q", peft_prompt, ja.init_adapters(peft_prompt, base, jax.random.key(0), *inputs))
    two = peft_prefix.add_adapter("b", "seq_bn")
    with pytest.raises(ja.AdapterError, match=r"save_adapterhub writes one adapter; the model has \['p', 'b'\]: pass "
                                              r"name="):
        ja.save_adapterhub(tmp_path / "two", two, ja.init_adapters(two, base, jax.random.key(0), *inputs))


def test_adapterhub_loads_what_save_adapterhub_writes(bert, tmp_path):
    """Real AdapterHub (torch) loads each directory jadapters writes and gives jadapters' output.

    Skipped without torch and ``adapters``. To run it, use an environment with torch and AdapterHub's
    ``adapters`` and put this environment's packages on the path (jadapters never imports torch), e.g.
    ``PYTHONPATH=<this venv>/lib/python3.11/site-packages <torch env>/bin/python -m pytest -n0 -k
    adapterhub_loads tests/test_adapterhub_format.py``.
    """
    torch = pytest.importorskip("torch")
    adapters = pytest.importorskip("adapters")
    from transformers import BertModel

    module, base, inputs = bert
    data = {k: torch.tensor(v).long() for k, v in reference.inputs().items()
            if k in ("input_ids", "attention_mask", "token_type_ids")}
    for case in CASES:
        adapted, variables = ja.load_adapterhub(adapter_dir(case, tmp_path / case), module, base, *inputs)
        folder = tmp_path / case / "saved"
        ja.save_adapterhub(folder, adapted, variables)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            model = BertModel.from_pretrained(reference.FIXTURES / "base", add_pooling_layer=False,
                                              attn_implementation="eager")  # as the fixtures were made: with
            # torch's sdpa attention AdapterHub's prompt tuning gives padded rows other outputs (1.6e-2)
            adapters.init(model)
            model.load_adapter(str(folder), set_active=True, use_safetensors=True)
            theirs = model.eval()(**data).last_hidden_state.numpy()
        np.testing.assert_allclose(theirs, hidden(adapted, variables, inputs), atol=TOLERANCE, rtol=0, err_msg=case)
