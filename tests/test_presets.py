"""Roles and presets: one line to adapt a known family; clear errors for roles a family lacks."""

import jax
import pytest

import jadapters as ja
from jadapters.presets import HF_BERT, PRESETS, Preset, get_preset

try:
    from architectures import hf
except ImportError:  # transformers<5 with Flax models is not installed
    hf = None


def test_shipped_presets_by_name_and_object():
    assert sorted(PRESETS) == ["hf_bert", "hf_gpt2", "hf_t5", "hf_vit"]
    assert get_preset("hf_bert") is HF_BERT and get_preset(HF_BERT) is HF_BERT
    with pytest.raises(ja.AdapterError, match=r"no preset named 'hf_llama'; the shipped presets are \['hf_bert'"):
        get_preset("hf_llama")


def test_a_role_the_family_does_not_declare_is_an_error_naming_it():
    with pytest.raises(ja.AdapterError, match=r"preset 'hf_gpt2' declares no role 'query'; its roles: \['qkv'"):
        get_preset("hf_gpt2").targets("query")
    with pytest.raises(ja.AdapterError, match=r"global role 'ffn' is not one of its roles \['q'\]"):
        Preset.make("mine", {"q": "attn/q"}, global_roles=["ffn"])


@pytest.mark.skipif(hf is None, reason="needs transformers<5 with its Flax models")
@pytest.mark.parametrize("family, roles, per_layer", [
    ("hf_bert", ["query", "key", "value", "attention_output", "ffn_intermediate", "ffn_output"], 1),
    ("hf_gpt2", ["qkv", "attention_output", "ffn_intermediate", "ffn_output"], 1),
    ("hf_t5", ["query", "value", "ffn_output"], None),
    ("hf_vit", ["query", "key", "value", "attention_output", "ffn_intermediate", "ffn_output"], 1),
])
def test_one_line_for_hugging_face_models(family, roles, per_layer):
    spec = next(f for f in hf.FAMILIES if f.name == family)
    module, base = spec.built()
    adapted = ja.with_adapters(module, family)
    for role in roles:
        adapted = adapted.add_adapter(f"{role}:lora_{role}", ja.LoRA(rank=2))
    variables = ja.init_adapters(adapted, base, jax.random.key(0), *spec.inputs(0), **spec.eval_kwargs)
    located = ja.tree.adapter_locations(variables)
    for role in roles:
        paths = located[f"lora_{role}"]
        assert paths and (per_layer is None or len(paths) == per_layer), (role, paths)
    if "ffn_output" in roles and family == "hf_bert":
        assert located["lora_ffn_output"] == ["encoder/layer/0/output/dense"]  # not attention/output/dense
    with pytest.raises(ja.AdapterError, match=r"unknown module name 'nope'; valid module names"):
        adapted.add_adapter("nope:x", ja.LoRA(rank=2))
