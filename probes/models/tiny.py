"""Models and tokenizers built in code, for tests, benchmarks and random-init controls.

`byte_tokenizer()` is a 257-token byte-level BPE without merges (any text round-trips, nothing is
read from disk). Use it with a random-init Hugging Face model and `probes.models.load.boot_model`.
"""

from __future__ import annotations

import copy

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from hooks.families import family_named, names

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


TINY_FAMILIES = names(lambda f: f.tiny_core)
"""Families `tiny_config` builds (the RoPE + GQA architectures the update identities cover)."""

MORE_FAMILIES = names(lambda f: not f.tiny_core)
"""The further families `tiny_config` builds (`hooks.weights.layer_views` describes them all;
tests/probes/models/test_families.py says which measurements run on them)."""

UPDATE_FAMILIES = names(lambda f: f.updates)
"""The families of `tiny_config` that `updates` (M1–M7) measures; the update identity tests run
on each of them."""


def tiny_config(family: str):
    """A 2-layer config of `family` from its record's `tiny_config` / `tiny_kwargs`
    (`hooks.families`): d_model 32, GQA 4/2 (GPT-2: 4 heads), vocab 300.

    `initializer_range=0.2` makes attention peaked rather than uniform, so identity tests on
    random-init models are not trivially satisfied. Llama gets attention biases, Qwen2 ties its
    embeddings, Qwen3 sets `head_dim=16`; Mistral has no sliding window (as Mistral-7B v0.2+ and
    Mistral-Small); Gemma-2/3 use head_dim 16 with the published
    `query_pre_attn_scalar` default (256, so the query scale is not 1/√d_h), Gemma-2 keeps its
    attention and final logit soft-capping and both a sliding-window and a global layer (window 8,
    so the tests' sequences exceed it); Phi-3 has the fused `qkv_proj` / `gate_up_proj`; OLMo-2 its
    norms after the sublayers and q/k norms; GPT-2 LayerNorm, GELU without a gate, Conv1D.

    Args:
        family: One of `TINY_FAMILIES` or `MORE_FAMILIES` (a record's `name`).

    Returns:
        A new transformers config for `AutoModelForCausalLM.from_config`.
    """
    import transformers

    record = family_named(family)
    if record is None:
        raise ValueError(f"tiny_config: unknown family {family!r}; choose from "
                         f"{TINY_FAMILIES + MORE_FAMILIES}")
    return getattr(transformers, record.tiny_config)(**copy.deepcopy(dict(record.tiny_kwargs)))
