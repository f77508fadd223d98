"""Adapter networks: pure Flax modules whose output is zero at initialisation."""

from jadapters.adapters.attention import MultiHeadAttentionAdapter
from jadapters.adapters.bottleneck import Bottleneck, PHMLayer
from jadapters.adapters.ia3 import IA3, IA3Config, IA3Scale
from jadapters.adapters.linear import LinearAdapter
from jadapters.adapters.lora import LoRA, LoraConfig
from jadapters.adapters.prefix import PrefixTuning
from jadapters.adapters.prompt import PromptTuning
from jadapters.adapters.vera import VeRA, VeraConfig

__all__ = ["Bottleneck", "LinearAdapter", "LoRA", "LoraConfig", "MultiHeadAttentionAdapter", "IA3", "IA3Config",
           "IA3Scale", "PHMLayer", "PrefixTuning", "PromptTuning", "VeRA", "VeraConfig"]
