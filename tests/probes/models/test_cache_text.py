"""Token texts for the ids of a cache: pieces that join to the decoded text, the cache's own
tokenizer (checked by fingerprint), and its lexicon's phrase names."""

from __future__ import annotations

import pytest

from probes.errors import ProbesError
from probes.models.cache_text import cache_decoder, phrase_names, token_pieces

BYTES = {1: b"caf", 2: b"\xc3", 3: b"\xa9", 4: b" ok", 5: b"\xe2\x82", 6: b"\xac"}


def _byte_level(ids):
    return b"".join(BYTES[i] for i in ids).decode("utf-8", errors="replace")


def test_a_character_split_over_tokens_goes_to_its_last_token():
    ids = [1, 2, 3, 4, 5, 6]
    pieces = token_pieces(_byte_level, ids)
    assert pieces == ["caf", "", "é", " ok", "", "€"]
    assert "".join(pieces) == _byte_level(ids)


def test_a_leading_space_dropped_by_the_tokenizer_is_kept_in_context():
    words = {1: "▁hello", 2: "▁world", 3: "!"}

    def sentencepiece(ids):  # like SentencePiece: a leading space of the text is dropped
        return "".join(words[i] for i in ids).replace("▁", " ").lstrip(" ")

    assert token_pieces(sentencepiece, [1, 2, 3]) == ["hello", " world", "!"]


def test_cache_decoder_and_phrase_names():
    from probes.models.identity import tokenizer_fingerprint
    from probes.models.load import load_tokenizer
    from probes.traces.categories import load_lexicon

    tok = load_tokenizer("tiny-reasoner")
    meta = {"model": "tiny-reasoner+random-init(0)", "tokenizer_fingerprint": tokenizer_fingerprint(tok),
            "lexicon_fingerprint": load_lexicon().fingerprint(), "info": {}}
    ids = tok.encode("Wait, 12 + 3 = 15.\n\nSo the answer is 15.")
    assert "".join(cache_decoder(meta)(ids)) == tok.decode(ids)
    assert phrase_names(meta) == [p.phrase for p in load_lexicon().phrases]
    with pytest.raises(ProbesError, match="not the one the cache was written with"):
        cache_decoder({**meta, "tokenizer_fingerprint": "other"})
    assert phrase_names({**meta, "lexicon_fingerprint": "other"}) is None
