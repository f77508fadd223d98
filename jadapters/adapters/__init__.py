"""Adapter networks: pure Flax modules whose output is zero at initialisation."""

from jadapters.adapters.attention import MultiHeadAttentionAdapter
from jadapters.adapters.linear import LinearAdapter
from jadapters.adapters.lora import LoRA
from jadapters.adapters.prefix import PrefixTuning
from jadapters.adapters.prompt import PromptTuning

__all__ = ["LinearAdapter", "LoRA", "MultiHeadAttentionAdapter", "PrefixTuning", "PromptTuning"]
