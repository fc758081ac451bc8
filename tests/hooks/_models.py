"""Tiny random-init models of the four supported architectures, built in code for the hook tests.

`build_tiny(name)` returns a booted `LoadedModel` (fp32, CPU, eager attention forced by the boot)
around a seeded 2-layer model with a 257-token byte-level tokenizer made in memory. No files, no
network. GQA (4 query heads, 2 KV heads) for Qwen2/Llama/Qwen3; Qwen3's head_dim is set explicitly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
)

from hooks.model import LoadedModel
from probes.models.load import boot_model
from probes.models.tiny import byte_tokenizer

VOCAB = 300  # the byte tokenizer has 257 tokens; the model's vocab may be larger




def _qwen2() -> PretrainedConfig:
    return Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=True,
    )


def _llama() -> PretrainedConfig:
    return LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )


def _qwen3() -> PretrainedConfig:
    return Qwen3Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
    )


def _gpt2() -> PretrainedConfig:
    return GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=256)


CONFIGS: dict[str, Callable[[], PretrainedConfig]] = {
    "qwen2": _qwen2,
    "llama": _llama,
    "qwen3": _qwen3,
    "gpt2": _gpt2,
}
"""Architecture name -> config factory (the four architectures the hook library supports)."""


def build_tiny(name: str, *, seed: int = 0, dtype: str = "float32") -> LoadedModel:
    """Build and boot a seeded tiny random-init model of architecture `name` on the CPU."""
    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(CONFIGS[name](), attn_implementation="eager")
    return boot_model(hf, byte_tokenizer(), spec=f"tiny-{name}", device="cpu", dtype=dtype)


def token_ids(n: int, *, seed: int = 1) -> torch.Tensor:
    """Random token ids [1, n] drawn with a local generator."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 257, (1, n), generator=gen)
