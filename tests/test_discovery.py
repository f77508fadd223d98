"""Finding targets in a model you did not write: list_modules, and bare names as path suffixes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

import jadapters as ja
from architectures import families
from jadapters.discovery import list_modules
from jadapters.naming import path_matches


def test_list_modules_gives_each_called_path_type_and_output():
    model = families.BertEncoder()
    ids, valid = families.token_batch(jax.random.key(0))
    listed = list_modules(model, None, ids, valid, deterministic=True)
    table = listed.as_dict()
    assert listed.paths[0] == "" and table[""]["type"] == "BertEncoder"
    assert table["layer_0/attention/query"] == {"type": "DenseGeneral", "output": "float32[3,6,2,8]"}
    assert table["layer_0/attention_add/LayerNorm"]["type"] == "LayerNorm"
    text = str(listed)
    assert [c.strip() for c in text.splitlines()[0].split("|")] == ["path", "type", "output"]
    assert "layer_0/intermediate" in text and "float32[3,6,24]" in text
    # Given variables, and given an adapted model: the same listing (the wrapped model's modules).
    variables = model.init(jax.random.key(1), ids, valid)
    assert list_modules(model, variables, ids, valid).as_dict() == table
    adapted = ja.with_adapters(model, {"q": "query"})
    assert list_modules(adapted, variables, ids, valid).as_dict() == table


def test_list_modules_reports_a_module_calling_super_once():
    listed = list_modules(nn.SelfAttention(num_heads=2, qkv_features=4), None, jnp.ones((1, 3, 4)))
    assert listed.paths == ["", "query", "key", "value", "out"]


@pytest.mark.parametrize("target, path, matches", [
    ("query", "encoder/layer/0/attention/self/query", True),
    ("self/query", "encoder/layer/0/attention/self/query", True),
    ("query", "encoder/layer/0/attention/self/query_proj", False),
    ("query", "query", True),
    ("output/dense", "encoder/layer/0/attention/output/dense", True),  # as PEFT: a suffix is a suffix
    ("ery", "encoder/layer/0/attention/self/query", False),  # whole segments only
    ("", "encoder", False),
    ("", "", True),
    ("encoder/layer/*/output/dense", "encoder/layer/0/attention/output/dense", False),  # globs match whole paths
])
def test_plain_targets_match_as_path_suffixes_like_peft(target, path, matches):
    assert path_matches(path, target) is matches


def test_peft_style_bare_names_place_adapters():
    model = families.BertEncoder()
    ids, valid = families.token_batch(jax.random.key(0))
    variables = model.init(jax.random.key(1), ids, valid)
    adapted = ja.with_adapters(model, {"qv": ["query", "value"]}).add_adapter("qv:lora", ja.LoRA(rank=2))
    created = ja.init_adapters(adapted, variables, jax.random.key(2), ids, valid)
    assert sorted(ja.tree.adapter_locations(created)["lora"]) == ["layer_0/attention/query", "layer_0/attention/value"]
