"""Models and tokenizers built in code, for tests, benchmarks and random-init controls.

`byte_tokenizer()` is a 257-token byte-level BPE without merges (any text round-trips, nothing is
read from disk). Use it with a random-init Hugging Face model and `probes.models.load.boot_model`.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

BYTE_VOCAB_SIZE = 257
"""`<|endoftext|>` plus the 256 byte symbols."""


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE with no merges, built in memory: no files, no download.

    Returns:
        A fast tokenizer with `<|endoftext|>` (id 0) as bos and eos and ids 1..256 for the bytes.
    """
    vocab = {"<|endoftext|>": 0}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>"
    )


_TINY_COMMON = {
    "vocab_size": 300, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
    "initializer_range": 0.2,
}
TINY_FAMILIES = ("llama", "qwen2", "qwen3")
"""Families `tiny_config` builds (the RoPE + GQA architectures the update identities cover)."""

MORE_FAMILIES = ("mistral", "gemma2", "gemma3", "phi3", "olmo2", "gpt2")
"""The further families `tiny_config` builds (`hooks.weights.layer_views` describes them all;
tests/probes/models/test_families.py says which measurements run on them)."""

UPDATE_FAMILIES = TINY_FAMILIES + ("mistral", "gpt2", "phi3", "olmo2", "gemma3", "gemma2")
"""The families of `tiny_config` that `updates` (M1–M7) measures; the update identity tests run
on each of them."""


def tiny_config(family: str):
    """A 2-layer config of `family`: d_model 32, GQA 4/2 (GPT-2: 4 heads), vocab 300.

    `initializer_range=0.2` makes attention peaked rather than uniform, so identity tests on
    random-init models are not trivially satisfied. Llama gets attention biases, Qwen2 ties its
    embeddings, Qwen3 sets `head_dim=16`; Mistral has no sliding window (as Mistral-7B v0.2+ and
    Mistral-Small); Gemma-2/3 use head_dim 16 with the published
    `query_pre_attn_scalar` default (256, so the query scale is not 1/√d_h), Gemma-2 keeps its
    attention and final logit soft-capping and both a sliding-window and a global layer (window 8,
    so the tests' sequences exceed it); Phi-3 has the fused `qkv_proj` / `gate_up_proj`; OLMo-2 its
    norms after the sublayers and q/k norms; GPT-2 LayerNorm, GELU without a gate, Conv1D.

    Args:
        family: One of `TINY_FAMILIES` or `MORE_FAMILIES`.

    Returns:
        A transformers config for `AutoModelForCausalLM.from_config`.
    """
    from transformers import (
        Gemma2Config,
        Gemma3TextConfig,
        GPT2Config,
        LlamaConfig,
        MistralConfig,
        Olmo2Config,
        Phi3Config,
        Qwen2Config,
        Qwen3Config,
    )

    ids = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
    gemma = {**_TINY_COMMON, **ids, "head_dim": 16, "sliding_window": 8}
    builders = {
        "qwen2": lambda: Qwen2Config(**_TINY_COMMON, tie_word_embeddings=True),
        "llama": lambda: LlamaConfig(**_TINY_COMMON, attention_bias=True),
        "qwen3": lambda: Qwen3Config(**_TINY_COMMON, head_dim=16),
        "mistral": lambda: MistralConfig(**_TINY_COMMON, **ids, sliding_window=None),
        "gemma2": lambda: Gemma2Config(**gemma, final_logit_softcapping=5.0,
                                       attn_logit_softcapping=3.0),
        "gemma3": lambda: Gemma3TextConfig(**gemma, layer_types=["sliding_attention",
                                                                 "full_attention"]),
        "phi3": lambda: Phi3Config(**_TINY_COMMON, **ids),
        "olmo2": lambda: Olmo2Config(**_TINY_COMMON, **ids),
        "gpt2": lambda: GPT2Config(vocab_size=300, n_embd=32, n_layer=2, n_head=4, n_positions=256,
                                   initializer_range=0.2, bos_token_id=0, eos_token_id=0),
    }
    if family not in builders:
        raise ValueError(f"tiny_config: unknown family {family!r}; choose from "
                         f"{TINY_FAMILIES + MORE_FAMILIES}")
    return builders[family]()
