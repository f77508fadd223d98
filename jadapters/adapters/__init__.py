"""Adapter networks: pure Flax modules whose output is zero at initialisation."""

from jadapters.adapters.attention import MultiHeadAttentionAdapter
from jadapters.adapters.bottleneck import Bottleneck, PHMLayer
from jadapters.adapters.linear import LinearAdapter
from jadapters.adapters.lora import LoRA

__all__ = ["Bottleneck", "LinearAdapter", "LoRA", "MultiHeadAttentionAdapter", "PHMLayer"]
