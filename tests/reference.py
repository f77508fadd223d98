"""The reference fixtures made by PEFT, AdapterHub and transformers (``tests/fixtures/reference``).

The tiny BERT they were made on loads into Hugging Face's Flax BERT with
transformers' own safetensors conversion (no torch); its output matches the
torch model's to 1e-6. See ``fixtures/reference/README.md`` for every case.
"""

from __future__ import annotations

import functools
import json
import os
import warnings
from pathlib import Path

import numpy as np

FIXTURES = Path(__file__).parent / "fixtures" / "reference"


def case_dir(case: str) -> Path:
    """``'peft/lora'`` -> its directory."""
    return FIXTURES / case


def case_info(case: str) -> dict:
    """The case's ``case.json``."""
    return json.loads((case_dir(case) / "case.json").read_text())


def expected(case: str) -> dict[str, np.ndarray]:
    """The arrays the library computed for the case (``last_hidden_state``, ...)."""
    with np.load(case_dir(case) / "expected.npz") as data:
        return {k: data[k] for k in data.files}


def inputs() -> dict[str, np.ndarray]:
    """``input_ids``, ``attention_mask``, ``token_type_ids`` (3, 7), int32."""
    with np.load(FIXTURES / "inputs.npz") as data:
        return {k: data[k].astype(np.int32) for k in data.files}


def weights(path: Path) -> dict[str, np.ndarray]:
    """A safetensors file as numpy arrays (torch layout, torch names)."""
    from safetensors.numpy import load_file

    return load_file(str(path))


@functools.cache
def tiny_bert():
    """``(module, {'params': ...})``: the fixtures' base BERT in Hugging Face's Flax BERT (no pooler)."""
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from transformers import FlaxBertModel
        from transformers.utils import logging

        logging.set_verbosity_error()
        model = FlaxBertModel.from_pretrained(FIXTURES / "base", from_pt=True, add_pooling_layer=False)
    return model.module, {"params": model.params}


def bert_inputs() -> tuple:
    """The positional inputs of the Flax BERT module: ids, mask, token types, positions."""
    data = inputs()
    ids = data["input_ids"]
    positions = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int32), ids.shape)
    return ids, data["attention_mask"], data["token_type_ids"], positions


def adapterhub_dir(case: str, scratch: Path) -> Path:
    """AdapterHub's saved directory of ``adapters/<case>`` with safetensors, complete.

    Prefix tuning: ``adapter_safetensors/`` (AdapterHub cannot write safetensors there).
    Compacter: a copy under ``scratch`` with the shared PHM rule that AdapterHub's save drops on a
    bare model (``shared_parameters.safetensors``) added to ``adapter.safetensors``.
    """
    import shutil

    from safetensors.numpy import save_file

    folder = case_dir(f"adapters/{case}")
    if (folder / "adapter_safetensors").is_dir():
        return folder / "adapter_safetensors"
    if not (folder / "shared_parameters.safetensors").exists():
        return folder / "adapter"
    complete = scratch / f"{case}_with_shared"
    complete.mkdir(parents=True, exist_ok=True)
    shutil.copy(folder / "adapter" / "adapter_config.json", complete)
    tensors = {**weights(folder / "adapter" / "adapter.safetensors"),
               **weights(folder / "shared_parameters.safetensors")}
    save_file(tensors, str(complete / "adapter.safetensors"))
    return complete
