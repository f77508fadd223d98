"""The reference fixtures themselves: the base model loads without torch and matches torch's output."""

import numpy as np
import pytest

pytest.importorskip("transformers")
import reference  # noqa: E402


def test_the_fixture_bert_in_flax_matches_torch():
    module, variables = reference.tiny_bert()
    out = module.apply(variables, *reference.bert_inputs()).last_hidden_state
    np.testing.assert_allclose(out, reference.expected("base")["last_hidden_state"], atol=2e-6, rtol=1e-5)
