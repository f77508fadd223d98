"""Unions of methods (``mam``, ``unipelt``, ``ConfigUnion``) and the gates they need (gated LoRA, gated prefix).

Parity: AdapterHub's own MAM and UniPELT adapters (the reference fixtures) load
through ``load_adapterhub`` onto Hugging Face's Flax BERT and reproduce
AdapterHub's ``last_hidden_state`` and, for UniPELT, every recorded gate within
1e-5; the same weights on ``add_adapter(name, "mam" / "unipelt")`` give the same
output (so the configs' defaults are AdapterHub's).
"""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("transformers")
import reference  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

import jadapters as ja  # noqa: E402
from jadapters.configs import parse_method  # noqa: E402
from jadapters.naming import path_matches  # noqa: E402
from jadapters.sites import AttentionSite  # noqa: E402
from jadapters.transform import AdapterGroup  # noqa: E402

# With the AdapterHub format's tests: one worker loads the tiny BERT once for both.
pytestmark = pytest.mark.xdist_group("adapterhub_format")
TOLERANCE = 1e-5
CONFIGS = {"mam": ja.MAMConfig, "unipelt": ja.UniPELTConfig}


@pytest.fixture(scope="module")
def bert():
    module, variables = reference.tiny_bert()
    return module, variables, reference.bert_inputs()


@pytest.fixture(scope="module")
def loaded(bert):
    """Each case loaded from AdapterHub's files: ``{case: (adapted, variables)}``."""
    module, base, inputs = bert
    return {case: ja.load_adapterhub(reference.adapterhub_dir(case, None), module, base, *inputs)
            for case in CONFIGS}


def gates(state: dict) -> dict[str, np.ndarray]:
    """The sown gate scores as AdapterHub records them: ``gating/a/<layer>/<location>``."""
    found = {}
    for path, value in jax.tree_util.tree_flatten_with_path(state["intermediates"])[0]:
        keys = [str(getattr(k, "key", k)) for k in path]
        found["/".join(keys[: keys.index("__adapters__")])] = np.asarray(value)
    out = {}
    for layer in (0, 1):
        at = f"encoder/layer/{layer}"
        out[f"gating/a/{layer}/selfattn_lora"] = np.stack(
            [found[f"{at}/attention/self/query"], found[f"{at}/attention/self/value"]], axis=-1)
        out[f"gating/a/{layer}/self_prefix"] = found[f"{at}/attention/self"]
        out[f"gating/a/{layer}/output_adapter"] = found[f"{at}/output"]
    return out


@pytest.mark.parametrize("case", list(CONFIGS))
def test_adapterhub_parity_and_the_configs_defaults(bert, loaded, case, tmp_path):
    module, base, inputs = bert
    adapted, variables = loaded[case]
    assert adapted.adapter_names() == [f"a.{p}" for p in CONFIGS[case]().part_names()]
    out, state = adapted.apply(variables, *inputs, mutable=["intermediates"])
    expected = reference.expected(f"adapters/{case}")
    np.testing.assert_allclose(out.last_hidden_state, expected["last_hidden_state"], atol=TOLERANCE, rtol=0)
    if case == "unipelt":
        recorded = {k: v for k, v in expected.items() if k.startswith("gating/")}
        assert len(recorded) == 6
        ours = gates(state)
        for key, value in recorded.items():
            np.testing.assert_allclose(ours[key], value, atol=TOLERANCE, rtol=0, err_msg=key)
    else:
        assert "intermediates" not in state  # MAM has no gates

    # The method by name, with AdapterHub's defaults, is the same adapters at the same modules.
    by_name = ja.with_adapters(module, "hf_bert").add_adapter("a", case)
    assert [(s.name, s.adapter, s.strategy) for s in by_name.adapters] == \
        [(s.name, s.adapter, s.strategy) for s in adapted.adapters]
    for ours, file in zip(by_name.adapters, adapted.adapters):
        assert ours.targets == file.targets or all(any(path_matches(t, pattern) for pattern in ours.targets)
                                                   for t in file.targets), ours.name  # roles vs the file's paths

    # save_adapterhub writes AdapterHub's tensors and union config back.
    folder = reference.adapterhub_dir(case, None)
    ja.save_adapterhub(tmp_path, adapted, variables)
    theirs = reference.weights(folder / "adapter.safetensors")
    ours = reference.weights(tmp_path / "adapter.safetensors")
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    original = json.loads((folder / "adapter_config.json").read_text())
    assert saved["name"] == "a" and saved["config"]["architecture"] == "union"
    for mine, its in zip(saved["config"]["configs"], original["config"]["configs"], strict=True):
        assert {k: v for k, v in mine.items() if k in its} == {k: its[k] for k in mine if k in its}


def test_a_union_is_one_adapter_name(bert, loaded, tmp_path):
    module, base, inputs = bert
    adapted, variables = loaded["unipelt"]
    group = adapted.get_adapter("a")
    assert isinstance(group, AdapterGroup) and group.enabled
    assert [p.name for p in group.parts] == ["a.prefix_tuning", "a.adapter", "a.lora"]
    assert all(p.group == "a" for p in group.parts) and all(c.use_gating for c in group.configs)
    assert adapted.get_adapter("a.lora").config.use_gating  # a part by its own name
    off = adapted.set_enabled_adapters("a", False)
    assert off.get_enabled_adapters() == [] and not off.get_adapter("a").enabled
    assert off.set_enabled_adapters("a.lora").get_enabled_adapters() == ["a.lora"]
    assert adapted.remove_adapter("a").adapter_names() == []
    with pytest.raises(ja.AdapterError, match=r"adapter 'a' already exists \(a union of \['a.prefix_tuning'"):
        adapted.add_adapter("a", "seq_bn")
    with pytest.raises(ja.AdapterError, match="'a.lora' already exists"):
        adapted.add_adapter("a.lora", "seq_bn")
    with pytest.raises(ja.UnknownAdapterError, match="no adapter named 'b'"):
        adapted.set_enabled_adapters("b")
    with pytest.raises(ja.UnknownAdapterError, match=r"no adapter named 'a.prompt'; the model has \['a.prefix_tuning'"):
        adapted.get_adapter("a.prompt")  # an unknown part
    with pytest.raises(ja.AdapterError, match="adapter 'u': a union of methods takes each part's own strategy"):
        adapted.add_adapter("u", "mam", strategy=ja.ResidualAdd())

    # Checkpoints save and load the union by its name, parts and grouping included.
    other = ja.LinearAdapter(2)
    with_other = off.add_adapter("other", other, targets="encoder/layer/0/output/dense")
    path = ja.save_adapters(tmp_path / "ck", with_other, variables, name="a")
    assert [r.name for r in ja.inspect_checkpoint(path).metadata.adapters] == ["a.prefix_tuning", "a.adapter",
                                                                                 "a.lora"]
    plain = ja.with_adapters(module, "hf_bert").add_adapter("other", other, targets="encoder/layer/0/output/dense")
    restored, restored_vars = ja.load_adapters(path, plain, base, name="a")
    assert restored.adapter_names() == ["other", "a.prefix_tuning", "a.adapter", "a.lora"]
    assert restored.adapters[1:] == off.adapters  # disabled, grouped, configs kept
    jax.tree_util.tree_map(np.testing.assert_array_equal, ja.split_adapters(restored_vars)[0],
                           ja.split_adapters(variables)[0])


def test_config_unions_and_their_errors(bert):
    module, _, _ = bert
    unipelt = ja.UniPELTConfig()
    assert (unipelt.prefix_tuning.length, unipelt.prefix_tuning.adapter().hidden) == (10, 512)
    assert (unipelt.adapter.reduction_factor, unipelt.adapter.method, unipelt.lora.r, unipelt.lora.lora_alpha) == \
        (16, "seq_bn", 8, 2)
    assert unipelt.lora.target_modules is None  # the preset's query and value, AdapterHub's attn_matrices q, v
    mam = ja.MAMConfig()
    assert (mam.prefix_tuning.length, mam.prefix_tuning.adapter().hidden, mam.adapter.method) == (30, 800, "par_bn")
    assert not any(c.use_gating for c in mam.configs)
    # Given parts are gated too, as AdapterHub does.
    assert ja.UniPELTConfig(lora=ja.LoraConfig(r=4)).lora.use_gating
    # Bracket overrides: to every part with the field, or to one part by name.
    assert parse_method("unipelt[r=4]").lora.r == 4
    assert parse_method("mam[adapter.reduction_factor=4]").adapter.reduction_factor == 4
    assert parse_method("mam[prefix_length=8]").prefix_tuning.length == 8
    assert parse_method("mam") == mam and parse_method("unipelt") == unipelt
    with pytest.raises(ja.AdapterError, match=r"method 'mam' has no part 'lora' \(in 'lora.r'\); its parts: "
                                              r"\['prefix_tuning', 'adapter'\]"):
        parse_method("mam[lora.r=4]")
    with pytest.raises(ja.AdapterError, match=r"method 'unipelt' has no option\(s\) \['rank'\] in any part"):
        parse_method("unipelt[rank=4]")
    with pytest.raises(ValueError, match="cannot be combined: two bottlenecks"):
        ja.ConfigUnion(ja.SeqBnConfig(), ja.ParBnConfig())
    with pytest.raises(ValueError, match="same architecture \\('lora'\\)"):
        ja.ConfigUnion(ja.LoraConfig(), ja.LoraConfig(r=2))
    with pytest.raises(ValueError, match="not supported inside a union"):
        ja.ConfigUnion(ja.MAMConfig())
    with pytest.raises(ValueError, match="adapter must be a BnConfig"):
        ja.MAMConfig(adapter=ja.LoraConfig())
    # Two bottlenecks at different places combine; repeated part names are numbered.
    houlsby = ja.ConfigUnion(ja.SeqBnConfig(), ja.BnConfig(mh_adapter=True, output_adapter=False), ja.LoraConfig())
    assert houlsby.part_names() == ("adapter", "adapter_1", "lora")
    adapted = ja.with_adapters(module, "hf_bert")
    with pytest.raises(ja.AdapterError, match="adapter 'u': method 'unipelt': a union of methods places each part"):
        adapted.add_adapter("query:u", "unipelt")
    with pytest.raises(ja.AdapterError, match="adapter 'u': part 'prefix_tuning' \\(PrefixTuningConfig\\): method "
                                              "'prefix_tuning' needs the site 'attention'"):
        ja.with_adapters(nn.Dense(2), {"query": "q", "value": "v"}).add_adapter("u", "unipelt")


def test_gated_lora_alone_formula_merge_error_and_off_unchanged():
    x = jax.random.normal(jax.random.key(0), (2, 5, 4))
    base = nn.Dense(3)
    params = base.init(jax.random.key(1), x)
    config = ja.LoraConfig(r=2, lora_alpha=16, target_modules=[""], init_lora_weights=False, use_gating=True)
    adapted = ja.with_adapters(base).add_adapter("g", config)
    variables = ja.init_adapters(adapted, params, jax.random.key(2), x)
    p = variables["params"]["__adapters__"]["g"]
    assert p["gate"]["kernel"].shape == (4, 1) and p["gate"]["bias"].shape == (1,)
    p["gate"]["bias"] = jnp.array([0.3])  # non-zero gate, bias included
    p["gate"]["kernel"] = jax.random.normal(jax.random.key(3), (4, 1))
    out, state = adapted.apply(variables, x, mutable=["intermediates"])
    w, b = params["params"]["kernel"], params["params"]["bias"]
    g = jnp.mean(jax.nn.sigmoid(x @ p["gate"]["kernel"] + p["gate"]["bias"]), axis=1)  # (B, 1): mean over positions
    want = x @ w + b + g[:, None] * (x @ p["lora_a"]["kernel"] @ p["lora_b"]["kernel"])  # no alpha / r
    np.testing.assert_allclose(out, want, atol=1e-5, rtol=0)
    np.testing.assert_allclose(state["intermediates"]["__adapters__"]["g"]["gate_score"][0], g[:, 0], atol=1e-6)
    other_alpha = ja.with_adapters(base).add_adapter("g", config.replace(lora_alpha=1))
    np.testing.assert_array_equal(other_alpha.apply(variables, x), out)  # the gate replaces the scaling
    with pytest.raises(ja.AdapterError, match=r"a gated LoRA \(use_gating=True\) cannot be merged"):
        ja.merge_adapters(adapted, variables, x)
    with pytest.raises(ValueError, match="use_gating=True .* does not combine with DoRA"):
        ja.LoraConfig(use_dora=True, use_gating=True)
    # Without the gate: the LoRA it always was (same params, same output), scaling alpha / r.
    plain = ja.with_adapters(base).add_adapter("g", config.replace(use_gating=False))
    ungated = {"params": {**variables["params"], "__adapters__": {"g": {k: v for k, v in p.items() if k != "gate"}}}}
    np.testing.assert_allclose(plain.apply(ungated, x), x @ w + b + 8.0 * (x @ p["lora_a"]["kernel"] @
                                                                           p["lora_b"]["kernel"]), atol=1e-4, rtol=0)


def test_gated_prefix_alone_scales_keys_and_values_per_sample():
    model = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)
    x = jax.random.normal(jax.random.key(0), (2, 3, 8))
    params = model.init(jax.random.key(1), x)
    preset = ja.Preset.make("attn", {}, sites={"attention": AttentionSite("")})
    gated = ja.with_adapters(model, preset).add_adapter(
        "p", ja.PrefixTuningConfig(style="adapterhub", prefix_length=2, flat=True, use_gating=True,
                                   shared_gating=False))
    variables = ja.init_adapters(gated, params, jax.random.key(2), x)
    p = variables["params"]["__adapters__"]["p"]
    assert p["gate"]["kernel"].shape == (8, 2)  # one gate for the keys, one for the values
    p["gate"]["kernel"] = jax.random.normal(jax.random.key(3), (8, 2))
    p["gate"]["bias"] = jnp.array([0.5, -0.5])
    out, state = gated.apply(variables, x, mutable=["intermediates"])
    g = np.asarray(jnp.mean(jax.nn.sigmoid(x @ p["gate"]["kernel"] + p["gate"]["bias"]), axis=1))  # (B, 2)
    np.testing.assert_allclose(state["intermediates"]["__adapters__"]["p"]["gate_score"][0], g, atol=1e-6)
    plain = ja.with_adapters(model, preset).add_adapter("p", ja.PrefixTuningConfig(style="adapterhub",
                                                                                   prefix_length=2, flat=True))
    for row in range(2):  # sample b attends to keys * g[b, 0] and values * g[b, 1]
        scaled = {"keys": p["keys"] * g[row, 0], "values": p["values"] * g[row, 1]}
        want = plain.apply({"params": {**variables["params"], "__adapters__": {"p": scaled}}}, x)
        np.testing.assert_allclose(out[row], want[row], atol=1e-5, rtol=0)
    assert float(np.abs(out - plain.apply({"params": {**variables["params"], "__adapters__": {
        "p": {"keys": p["keys"], "values": p["values"]}}}}, x)).max()) > 1e-2  # the gate matters


def test_load_adapterhub_union_errors(bert, tmp_path):
    module, base, inputs = bert
    source = reference.adapterhub_dir("unipelt", None)

    def copy(change_config=None, extra_tensor=None):
        folder = tmp_path / f"copy_{len(list(tmp_path.iterdir()))}"
        folder.mkdir()
        config = json.loads((source / "adapter_config.json").read_text())
        if change_config:
            change_config(config["config"])
        (folder / "adapter_config.json").write_text(json.dumps(config))
        tensors = reference.weights(source / "adapter.safetensors")
        if extra_tensor:
            tensors[extra_tensor] = np.zeros(2, np.float32)
        save_file(tensors, str(folder / "adapter.safetensors"))
        return folder

    with pytest.raises(ja.AdapterError, match="a union's part of architecture 'prompt_tuning' is not supported"):
        ja.load_adapterhub(copy(lambda c: c["configs"][0].update(architecture="prompt_tuning")), module, base,
                           *inputs)
    with pytest.raises(ja.AdapterError, match=r"tensor\(s\) \['encoder.layer.0.x'\] belong to no part of the union"):
        ja.load_adapterhub(copy(extra_tensor="encoder.layer.0.x"), module, base, *inputs)
    with pytest.raises(ja.AdapterError, match="a union's config needs 'configs'"):
        ja.load_adapterhub(copy(lambda c: c.pop("configs")), module, base, *inputs)


def test_adapterhub_loads_the_unions_save_adapterhub_writes(bert, loaded, tmp_path):
    """Real AdapterHub (torch) loads jadapters' MAM and UniPELT and gives its own reference output.

    Skipped without torch and ``adapters``; run it as ``test_adapterhub_loads_what_save_adapterhub_writes``
    in tests/test_adapterhub_format.py says.
    """
    torch = pytest.importorskip("torch")
    adapters = pytest.importorskip("adapters")
    from transformers import BertModel

    data = {k: torch.tensor(v).long() for k, v in reference.inputs().items()
            if k in ("input_ids", "attention_mask", "token_type_ids")}
    for case, (adapted, variables) in loaded.items():
        ja.save_adapterhub(tmp_path / case, adapted, variables)
        with torch.no_grad():
            model = BertModel.from_pretrained(reference.FIXTURES / "base", add_pooling_layer=False,
                                              attn_implementation="eager")
            adapters.init(model)
            model.load_adapter(str(tmp_path / case), set_active=True, use_safetensors=True)
            theirs = model.eval()(**data).last_hidden_state.numpy()
        np.testing.assert_allclose(theirs, reference.expected(f"adapters/{case}")["last_hidden_state"],
                                   atol=TOLERANCE, rtol=0, err_msg=case)
