"""The tokenizer fingerprint's fast path gives the reference value (caches store it; resume compares
it): on the real Qwen tokenizer, on tiny-reasoner's, and on a BPE whose tokens need JSON escapes."""

from __future__ import annotations

import json

import pytest

from probes.models import identity
from probes.models.identity import (
    _canonical_fast,
    _small_fields,
    tokenizer_fingerprint,
    tokenizer_fingerprint_reference,
)


def _fresh(tokenizer) -> str:
    """The fingerprint with this process's memo emptied first (so the fast path runs)."""
    identity._FINGERPRINTS.clear()
    return tokenizer_fingerprint(tokenizer)


def _assert_fast_path_equal(tokenizer) -> None:
    text = _canonical_fast(tokenizer.backend_tokenizer.to_str(), _small_fields(tokenizer))
    assert text is not None                                   # the fast path, not the fallback
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    spec.pop("truncation", None)
    spec.pop("padding", None)
    assert json.loads(text) == {"backend": spec, **_small_fields(tokenizer)}
    assert _fresh(tokenizer) == tokenizer_fingerprint_reference(tokenizer)


def test_fast_fingerprint_equals_reference_on_real_qwen(qwen_tokenizer):
    _assert_fast_path_equal(qwen_tokenizer)
    assert tokenizer_fingerprint(qwen_tokenizer) == tokenizer_fingerprint_reference(qwen_tokenizer)


def test_fast_fingerprint_equals_reference_on_tiny_reasoner():
    from probes.models.load import load_tokenizer

    _assert_fast_path_equal(load_tokenizer("tiny-reasoner"))


def _bpe_with_escapes():
    from tokenizers import Tokenizer
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    # Keys whose JSON text differs from their decoded order: '"' and '\\' escapes, control
    # characters (short and \u00xx forms), U+007F, non-BMP; "a" so encode("a") has an id.
    tokens = ["a", "b", "ab", '"', "\\", "\\n", "\n", "\t", "\x01", "\x1f", "\x7f", "é", "😀",
              'q"u', "z\\", "A", "~"]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(BPE(vocab=vocab, merges=[("a", "b")], unk_token="~"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="~")


def test_fast_fingerprint_sorts_escaped_keys_as_the_reference():
    tok = _bpe_with_escapes()
    _assert_fast_path_equal(tok)


def test_layout_not_understood_takes_the_reference_path():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({"a": 0, "[UNK]": 1},
                                                                      unk_token="[UNK]")))
    assert _canonical_fast(tok.backend_tokenizer.to_str(), _small_fields(tok)) is None
    assert _fresh(tok) == tokenizer_fingerprint_reference(tok)


def test_memo_follows_the_content():
    tok = _bpe_with_escapes()
    before = _fresh(tok)
    assert tokenizer_fingerprint(tok) == before               # memoised, same value
    tok.add_tokens(["newtoken"])                              # same object, other content
    assert tokenizer_fingerprint(tok) == tokenizer_fingerprint_reference(tok) != before


def test_slow_tokenizer_is_refused():
    from probes.errors import ProbesError

    with pytest.raises(ProbesError, match="has no backend tokenizer to fingerprint"):
        tokenizer_fingerprint(object())
