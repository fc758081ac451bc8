"""The label arrays stored with every trace, so that `compare` runs from the cache alone.

`label_arrays` is written by the write loop into every trace group it creates (or touches, when
the group lacks them); a group that has `LABEL_KEY` has them all. Their names, axes and dtypes are
declared in `probes.arrays`.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from analyses.token_sets import paragraph_starts, raml_notebook_occurrences
from probes import arrays

if TYPE_CHECKING:
    from probes.traces.categories import TokenCategories
    from probes.traces.tokenize import TokenizedTrace

LABEL_KEY = arrays.LABELS[0].name
"""A trace group that has this array has all of `label_arrays` (they are written together)."""


def token_texts(tt: TokenizedTrace) -> list[str]:
    """Decoded text of each trajectory token, sliced from the trajectory by its offsets."""
    text = tt.trajectory_text
    return [text[s:e] for s, e in tt.trajectory_offsets.tolist()]


def label_arrays(tt: TokenizedTrace, cats: TokenCategories, tokenizer: Any) -> dict[str, np.ndarray]:
    """What `compare` needs besides categories.

    `phrase_id` int16 [n_tokens] (-1: none), `phrase_first` uint8 [n_tokens],
    `paragraph_start` uint8 [T] (trajectory token starts a blank-line paragraph), and
    `raml_notebook_occurrences` int32 [n, 3] (start, end, word index into
    `analyses.token_sets.RAML_NOTEBOOK_WORDS`, trajectory coordinates): RaML's notebook matching
    (ids of each word without a leading space, up to the first `</think>`), for
    `compare --raml-notebook`.
    """
    a, b = tt.spans["trajectory"]
    close = tokenizer.convert_tokens_to_ids("</think>")
    if close is None or close == tokenizer.unk_token_id:
        close = None
    occ = raml_notebook_occurrences(tt.ids[a:b], _encoder(tokenizer), close)
    return {
        "phrase_id": cats.phrase_id.astype(np.int16),
        "phrase_first": cats.is_first.astype(np.uint8),
        "paragraph_start": paragraph_starts(token_texts(tt)).astype(np.uint8),
        "raml_notebook_occurrences": np.asarray(
            [(o.start, o.end, o.phrase_id) for o in occ], dtype=np.int32
        ).reshape(-1, 3),
    }


_ENCODED: weakref.WeakKeyDictionary[Any, dict[str, Sequence[int]]] = weakref.WeakKeyDictionary()


def _encoder(tokenizer: Any) -> Callable[[str], Sequence[int]]:
    """`tokenizer.encode(word, add_special_tokens=False)`, remembered per tokenizer (the same
    ten words are encoded for every trace)."""
    try:
        known = _ENCODED.setdefault(tokenizer, {})
    except TypeError:  # not weakly referenceable: encode every time
        known = {}

    def encode(word: str) -> Sequence[int]:
        if word not in known:
            known[word] = tokenizer.encode(word, add_special_tokens=False)
        return known[word]

    return encode
