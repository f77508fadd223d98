"""Adapter networks: pure Flax modules whose output is zero at initialisation."""

from jadapters.adapters.attention import MultiHeadAttentionAdapter
from jadapters.adapters.ia3 import IA3, IA3Config, IA3Scale
from jadapters.adapters.linear import LinearAdapter
from jadapters.adapters.lora import LoRA, LoraConfig
from jadapters.adapters.vera import VeRA, VeraConfig

__all__ = ["LinearAdapter", "LoRA", "LoraConfig", "MultiHeadAttentionAdapter", "IA3", "IA3Config", "IA3Scale",
           "VeRA", "VeraConfig"]
