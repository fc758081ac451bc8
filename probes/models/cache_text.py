"""Text for the token ids of a cache: a decoder from the tokenizer the cache records, and the
names of its lexicon's phrases.

A cache stores token ids (`cache` never loads a tokenizer). `cache_decoder(path)` loads the
tokenizer of the model spec in the cache's metadata (offline, `load_tokenizer`), checks it against
the stored tokenizer fingerprint, and returns a function from one trace's ids to one string per
token (`token_pieces`); pass it to `cache.tables.token_table(..., decode=...)`. `phrase_names`
gives the phrase text by id when the cache's lexicon can be rebuilt (the built-in one, or the
lexicon files it names, with the same fingerprint).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from cache import open_cache
from probes.errors import ProbesError
from probes.models.identity import tokenizer_fingerprint
from probes.models.load import load_tokenizer
from probes.traces.categories import DEFAULT_LEXICON_PATH, load_lexicon

__all__ = ["CacheDecoder", "cache_decoder", "phrase_names", "token_pieces", "tokenizer_decoder"]

CacheDecoder = Callable[[Sequence[int]], list[str]]
"""One trace's token ids -> one string per token."""

_REPLACEMENT = "\ufffd"
_MAX_PENDING = 4
"""Tokens a character split over several tokens may span (UTF-8 has at most 4 bytes)."""
_CONTEXT = 4
"""Tokens of left context decoded with each token (SentencePiece drops a leading space alone)."""


def token_pieces(decode: Callable[[Sequence[int]], str], ids: Sequence[int]) -> list[str]:
    """The text of each token, so that the pieces join to the decoded text.

    Each token's text is what decoding it adds to the decoded tokens before it (a few tokens of
    context, so tokenizers that drop a leading space of a lone token still give it). A character
    whose bytes are split over several byte-level tokens goes to the last of them; the others get
    "".

    Args:
        decode: Token ids -> text (e.g. `tokenizer.decode`, special tokens kept).
        ids: The ids.

    Returns:
        One string per id.
    """
    ids = [int(i) for i in ids]
    pieces: list[str] = []
    anchor = 0  # tokens before `anchor` are given out
    for i in range(len(ids)):
        lo = max(0, anchor - _CONTEXT)
        head = decode(ids[lo:anchor]) if anchor > lo else ""
        full = decode(ids[lo:i + 1])
        pending = i + 1 - anchor
        if full.endswith(_REPLACEMENT) and pending < _MAX_PENDING and i + 1 < len(ids):
            pieces.append("")  # an incomplete character: its text comes with a later token
            continue
        pieces.append(full[len(head):] if full.startswith(head) else decode(ids[anchor:i + 1]))
        anchor = i + 1
    return pieces


def tokenizer_decoder(tokenizer: Any) -> CacheDecoder:
    """A decoder from a Hugging Face tokenizer (special tokens kept, spaces not cleaned up)."""

    def decode(ids: Sequence[int]) -> str:
        return tokenizer.decode(list(ids), skip_special_tokens=False,
                                clean_up_tokenization_spaces=False)

    def pieces(ids: Sequence[int]) -> list[str]:
        return token_pieces(decode, ids)

    return pieces


def cache_decoder(source: str | os.PathLike[str] | Mapping[str, Any]) -> CacheDecoder:
    """The decoder of a cache's tokenizer.

    Args:
        source: A cache path, or its root metadata (`CacheReader.metadata`).

    Returns:
        ids -> one string per token.

    Raises:
        ProbesError: The model spec in the cache does not resolve offline to a tokenizer, or the
            tokenizer found is not the one the cache was written with (other fingerprint).
    """
    meta = _metadata(source)
    spec = str(meta.get("model", ""))
    base = spec.split("+", 1)[0]  # "tiny-reasoner+random-init(0)": the control's base model
    tokenizer = load_tokenizer(spec if Path(spec).expanduser().is_dir() else base)
    stored = meta.get("tokenizer_fingerprint")
    if stored and tokenizer_fingerprint(tokenizer) != stored:
        raise ProbesError(
            f"the tokenizer of {spec!r} found here is not the one the cache was written with "
            "(other tokenizer fingerprint); its token texts would be wrong"
        )
    return tokenizer_decoder(tokenizer)


def phrase_names(source: str | os.PathLike[str] | Mapping[str, Any]) -> list[str] | None:
    """Phrase text by phrase id, if the cache's lexicon can be rebuilt with the same fingerprint.

    Tries the built-in lexicon, then the lexicon files recorded in the cache's `info`.

    Args:
        source: A cache path, or its root metadata.

    Returns:
        The phrases, or None when no lexicon here has the cache's fingerprint.
    """

    meta = _metadata(source)
    wanted = meta.get("lexicon_fingerprint")
    files = [Path(f) for f in (meta.get("info") or {}).get("lexicon_files", [])]
    extra = [f for f in files if f.resolve() != DEFAULT_LEXICON_PATH.resolve()]
    candidates: list[Callable[[], Any]] = [load_lexicon]
    if extra and all(f.is_file() for f in extra):
        candidates.append(lambda: load_lexicon(extra=extra))
    for make in candidates:
        try:
            lexicon = make()
        except ProbesError:
            continue
        if lexicon.fingerprint() == wanted:
            return [p.phrase for p in lexicon.phrases]
    return None


def _metadata(source: str | os.PathLike[str] | Mapping[str, Any]) -> Mapping[str, Any]:
    if isinstance(source, Mapping):
        return source

    with open_cache(source) as reader:
        return dict(reader.metadata)
