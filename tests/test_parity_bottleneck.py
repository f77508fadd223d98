"""Parity with AdapterHub 1.3: its saved bottleneck and Compacter adapters, loaded into jadapters, give its outputs.

Each case builds the method by name, as an AdapterHub user writes it, checks
that the config equals the one AdapterHub saved (its full dict), maps
AdapterHub's weight names onto jadapters' params, and compares
``last_hidden_state`` (and the gates) with the library's, float32, within 1e-5.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from flax import traverse_util

pytest.importorskip("transformers")
import reference  # noqa: E402

import jadapters  # noqa: E402
from jadapters.configs import parse_method  # noqa: E402

#: Fixture case -> the method as an AdapterHub user names it.
CASES = {
    "seq_bn": "seq_bn",
    "seq_bn_options": "seq_bn[reduction_factor=8,non_linearity='gelu',residual_before_ln=False]",
    "seq_bn_post_add": "seq_bn[residual_before_ln='post_add']",
    "seq_bn_no_ln_after": "seq_bn[original_ln_after=False]",
    "seq_bn_gating": "seq_bn[use_gating=True]",
    "seq_bn_leave_out": "seq_bn[leave_out=[0]]",
    "double_seq_bn": "double_seq_bn",
    "par_bn": "par_bn",
    "scaled_par_bn": "scaled_par_bn",
    "compacter": "compacter[reduction_factor=4]",
    "compacter_pp": "compacter++[reduction_factor=4]",
}


def adapterhub_params(case: str, bert, scratch) -> dict:
    """The case's saved adapter (plus the shared PHM rule AdapterHub's save drops) as jadapters params."""
    module, base, inputs = bert
    _, loaded = jadapters.load_adapterhub(reference.adapterhub_dir(case, scratch), module, base, *inputs)
    return jadapters.split_adapters(loaded)[0]["params"]


@pytest.fixture(scope="module")
def bert():
    module, base = reference.tiny_bert()
    return module, base, reference.bert_inputs()


@pytest.mark.parametrize("case", list(CASES))
def test_adapterhub_bottleneck_outputs(bert, case, tmp_path):
    module, base, inputs = bert
    config = parse_method(CASES[case])
    saved = reference.case_info(f"adapters/{case}")["config"]
    ours = dataclasses.asdict(config)
    assert {k: ours[k] for k in saved} == {**saved, "leave_out": tuple(saved["leave_out"])}

    adapted = jadapters.with_adapters(module, "hf_bert").add_adapter("a", config)
    params = adapterhub_params(case, bert, tmp_path)
    # The adapter creates exactly AdapterHub's tensors, with the same shapes: nothing missing, nothing extra.
    created = jax.eval_shape(lambda v: jadapters.init_adapters(adapted, v, jax.random.key(0), *inputs), base)
    expected_shapes = {p: leaf.shape for p, leaf in traverse_util.flatten_dict(params).items()}
    created_shapes = traverse_util.flatten_dict(jadapters.split_adapters(created)[0]["params"])
    assert {p: leaf.shape for p, leaf in created_shapes.items()} == expected_shapes

    variables = jadapters.merge_trees(base, {"params": params})
    output, state = jax.jit(lambda v: adapted.apply(v, *inputs, mutable=["intermediates"]))(variables)
    expected = reference.expected(f"adapters/{case}")
    np.testing.assert_allclose(output.last_hidden_state, expected["last_hidden_state"], atol=1e-5, rtol=0)
    gates = {k: v for k, v in expected.items() if k.startswith("gating/")}
    assert bool(gates) == config.use_gating
    for key, gate in gates.items():  # gating/a/<layer>/output_adapter
        _, name, layer, _ = key.split("/")
        ours = state["intermediates"]["encoder"]["layer"][layer]["output"]["__adapters__"][name]["gate_score"][0]
        np.testing.assert_allclose(ours, gate, atol=1e-6, rtol=0)
