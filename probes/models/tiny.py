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


def tiny_config(family: str):
    """A 2-layer Llama / Qwen2 / Qwen3 config: d_model 32, GQA 4/2, vocab 300.

    `initializer_range=0.2` makes attention peaked rather than uniform, so identity tests on
    random-init models are not trivially satisfied. Llama gets attention biases, Qwen2 ties its
    embeddings, Qwen3 sets `head_dim=16`.

    Args:
        family: One of `TINY_FAMILIES`.

    Returns:
        A transformers config for `AutoModelForCausalLM.from_config`.
    """
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    builders = {
        "qwen2": lambda: Qwen2Config(**_TINY_COMMON, tie_word_embeddings=True),
        "llama": lambda: LlamaConfig(**_TINY_COMMON, attention_bias=True),
        "qwen3": lambda: Qwen3Config(**_TINY_COMMON, head_dim=16),
    }
    if family not in builders:
        raise ValueError(f"tiny_config: unknown family {family!r}; choose from {TINY_FAMILIES}")
    return builders[family]()
