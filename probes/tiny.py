"""Models and tokenizers built in code, for tests, benchmarks and random-init controls.

`byte_tokenizer()` is a 257-token byte-level BPE without merges (any text round-trips, nothing is
read from disk). Use it with a random-init Hugging Face model and `probes.models.boot_model`.
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
