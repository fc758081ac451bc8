"""Token sets of one trace, independent of any metric: category codes, phrase occurrences (lexicon and
RaML-notebook matching), paragraph starts, and the controls (position-matched ordinary tokens,
shuffled labels) that every per-token comparison uses.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from analyses.matching import matched_windows

CATEGORY_CODES: dict[str, int] = {
    "ordinary": 0,
    "reflection": 1,
    "delimiter": 2,
    "prompt": 3,
    "scaffold": 4,
    "answer": 5,
}
"""uint8 code of every token category: the one table (stored in caches as-is; `probes` labels
tokens with it)."""

CATEGORY_NAMES: dict[int, str] = {code: name for name, code in CATEGORY_CODES.items()}

ORDINARY, REFLECTION, DELIMITER = (CATEGORY_CODES[c] for c in ("ordinary", "reflection", "delimiter"))
"""Category codes of trajectory tokens."""


RAML_NOTEBOOK_WORDS = (
    "wait", "Wait", "retry", "Retry", "recheck", "Recheck",
    "however", "However", "alternatively", "Alternatively",
)
"""The reflection words of RaML's `pseudo_gradient_descent.ipynb` (cell 26), in its order."""


_UNITS = ("phrase", "first_token", "token")


MATCHED_SETS = {"matched_to_reflection": REFLECTION, "matched_to_delimiter": DELIMITER}
"""The confound-matched ordinary controls (`analyses.matching`) and the category each matches."""


_SET_NAMES = (
    "reflection", "delimiter", "ordinary", "paragraph_initial", "position_matched",
    "shuffled_reflection", "shuffled_ordinary", *MATCHED_SETS,
)


class Occurrence(NamedTuple):
    """A phrase occurrence covering trajectory tokens `[start, end)` (0-based).

    Attributes:
        start: First trajectory token.
        end: One past the last trajectory token.
        category: Category code (1 reflection, 2 delimiter).
        phrase_id: Phrase id (lexicon id, or index into `RAML_NOTEBOOK_WORDS` for notebook
            matches); -1 when unknown.
    """

    start: int
    end: int
    category: int
    phrase_id: int


def phrase_occurrences(
    category: np.ndarray,
    phrase_id: np.ndarray | None = None,
    is_first: np.ndarray | None = None,
    traj_span: tuple[int, int] | None = None,
) -> list[Occurrence]:
    """Phrase occurrences from per-token arrays, in trajectory token coordinates.

    An occurrence starts at a reflection/delimiter token that is a phrase's first token
    (`is_first`), or whose category or phrase differs from the previous token's; it runs while the
    following tokens carry the same category and phrase and are not a first token.

    Args:
        category: uint8 per-token category codes (`TokenCategories.category`), over the whole
            sequence when `traj_span` is given, else over the trajectory only.
        phrase_id: int per-token phrase ids (-1 none), same length; None: runs of one category.
        is_first: bool per-token "first token of its occurrence", same length; None: runs only.
        traj_span: `(start, end)` of the trajectory in the arrays (`tt.spans["trajectory"]`), or
            None when the arrays already cover the trajectory only.

    Returns:
        The occurrences, sorted by start; `start`/`end` are 0-based trajectory token indices.
    """
    cat = np.asarray(category)
    sl = slice(*traj_span) if traj_span is not None else slice(None)
    cat = cat[sl].astype(np.int64)
    n = cat.size
    pid = (np.asarray(phrase_id)[sl].astype(np.int64) if phrase_id is not None
           else np.full(n, -1, dtype=np.int64))
    first = (np.asarray(is_first)[sl].astype(bool) if is_first is not None
             else np.zeros(n, dtype=bool))
    if pid.size != n or first.size != n:
        raise ValueError("category, phrase_id and is_first must have the same length.")
    labelled = (cat == REFLECTION) | (cat == DELIMITER)
    prev_cat = np.concatenate([[-1], cat[:-1]])
    prev_pid = np.concatenate([[-2], pid[:-1]])
    prev_lab = np.concatenate([[False], labelled[:-1]])
    new = labelled & (first | ~prev_lab | (prev_cat != cat) | (prev_pid != pid))
    starts = np.flatnonzero(new)
    breaks = np.flatnonzero(new | ~labelled)
    out = []
    for s in starts:
        k = np.searchsorted(breaks, s, side="right")
        e = int(breaks[k]) if k < breaks.size else n
        out.append(Occurrence(int(s), e, int(cat[s]), int(pid[s])))
    return out


def _find_subsequence(ids: np.ndarray, pattern: np.ndarray) -> np.ndarray:
    """Start indices where `pattern` occurs in `ids` (overlaps allowed)."""
    m = pattern.size
    if m == 0 or ids.size < m:
        return np.zeros(0, dtype=np.int64)
    windows = np.lib.stride_tricks.sliding_window_view(ids, m)
    return np.flatnonzero(np.all(windows == pattern[None, :], axis=1))


def raml_notebook_occurrences(
    traj_token_ids: np.ndarray | Sequence[int],
    tokenizer_encode: Callable[[str], Sequence[int]],
    think_close_id: int | Sequence[int] | None = None,
    *,
    words: Sequence[str] = RAML_NOTEBOOK_WORDS,
) -> list[Occurrence]:
    """Reflection words matched exactly as RaML's notebook does (docs/methods.md#m8).

    Each word is matched by the id sequence `tokenizer_encode(word)`, i.e. its spelling *without*
    a leading space. So a line-initial "Wait" (after "\\n\\n", or after punctuation when the
    tokenizer splits there) is found, but a mid-sentence " wait" (a different BPE id) is not.
    Only tokens before the first `</think>` are scanned; a match must end before it. Words are
    matched independently (the notebook keeps one list per word).

    Args:
        traj_token_ids: int [T] trajectory token ids.
        tokenizer_encode: `str -> ids` without special tokens, e.g.
            `lambda s: tok.encode(s, add_special_tokens=False)` (a callable, so that this module
            does not import transformers).
        think_close_id: Id of `</think>` (or its id sequence when it is several tokens); None: scan
            everything.
        words: The word list (default: the notebook's ten).

    Returns:
        `Occurrence(start, end, 1, word_index)` per match (word_index into `words`), sorted by
        (start, word_index).
    """
    ids = np.asarray(traj_token_ids, dtype=np.int64)
    stop = ids.size
    if think_close_id is not None:
        close = np.atleast_1d(np.asarray(think_close_id, dtype=np.int64))
        hits = _find_subsequence(ids, close)
        if hits.size:
            stop = int(hits[0])
    scan = ids[:stop]
    out = []
    for w_idx, word in enumerate(words):
        pattern = np.asarray(list(tokenizer_encode(word)), dtype=np.int64)
        for s in _find_subsequence(scan, pattern):
            out.append(Occurrence(int(s), int(s) + pattern.size, REFLECTION, w_idx))
    return sorted(out, key=lambda o: (o.start, o.phrase_id))


def paragraph_starts(token_strings: Sequence[str], *, include_first: bool = False) -> np.ndarray:
    """Which tokens start a paragraph ("\\n\\n"-separated), from the decoded token strings.

    Token i starts a paragraph when it holds a non-whitespace character and the whitespace run just
    before its first non-whitespace character (possibly spread over earlier tokens, e.g. "\\n" +
    "\\n", or inside the token, e.g. "\\n\\nWait") contains at least two newlines. So both "the
    previous token ends with \\n\\n" and "the token starts with \\n\\n" count. Whitespace-only
    tokens never start a paragraph.

    Args:
        token_strings: Decoded text of every token (e.g. `tok.decode([id])` or slices of the text by
            the offset mapping), not byte-level symbols such as "ĊĊ".
        include_first: Also mark the first token with non-whitespace text.

    Returns:
        bool [n].
    """
    out = np.zeros(len(token_strings), dtype=bool)
    pending_newlines = 0
    seen_content = False
    for i, s in enumerate(token_strings):
        stripped = s.lstrip()
        if not stripped:
            pending_newlines += s.count("\n")
            continue
        lead = s[: len(s) - len(stripped)]
        newlines = pending_newlines + lead.count("\n")
        out[i] = newlines >= 2 or (include_first and not seen_content)
        seen_content = True
        trail = s[len(s.rstrip()):]
        pending_newlines = trail.count("\n")
    return out


def position_matched_ordinary(
    occurrence_starts: np.ndarray | Sequence[int],
    ordinary_mask: np.ndarray,
    rng: np.random.Generator | int | None = None,
    k: int = 1,
    *,
    window: int | None = None,
) -> np.ndarray:
    """Ordinary tokens matched in position to each occurrence (a control for position effects).

    Default: for each occurrence start s, the k ordinary tokens nearest to s (|i − s| smallest;
    ties, e.g. s−1 against s+1, broken at random). With `window=w`: k ordinary tokens drawn at
    random without replacement from those with |i − s| <= w (fewer if fewer exist).

    Args:
        occurrence_starts: int [n_occ] first trajectory token of each occurrence.
        ordinary_mask: bool [T] tokens eligible as controls (ordinary, inside no phrase).
        rng: Generator or seed for tie-breaking / sampling.
        k: Controls per occurrence.
        window: Sample within ±window tokens instead of taking the nearest.

    Returns:
        int64 [n_occ, k] trajectory token indices; -1 where no control was found.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}.")
    rng = np.random.default_rng(rng)
    starts = np.asarray(occurrence_starts, dtype=np.int64).reshape(-1)
    cand = np.flatnonzero(np.asarray(ordinary_mask, dtype=bool))
    out = np.full((starts.size, k), -1, dtype=np.int64)
    if cand.size == 0:
        return out
    for r, s in enumerate(starts):
        dist = np.abs(cand - s)
        if window is None:
            jitter = dist + rng.random(cand.size) * 0.5  # < 1: breaks ties only
            take = min(k, cand.size)
            chosen = cand[np.argsort(jitter, kind="stable")[:take]]
        else:
            pool = cand[dist <= window]
            take = min(k, pool.size)
            chosen = rng.choice(pool, size=take, replace=False) if take else pool[:0]
        out[r, : chosen.size] = np.sort(chosen)
    return out


def shuffled_labels(
    category_codes: np.ndarray, rng: np.random.Generator | int | None = None
) -> np.ndarray:
    """Category labels permuted among a trace's trajectory tokens (counts preserved): the null.

    Args:
        category_codes: [T] labels of one trace's trajectory tokens.
        rng: Generator or seed.

    Returns:
        A permutation of `category_codes` (same dtype).
    """
    return np.random.default_rng(rng).permutation(np.asarray(category_codes))


def _trajectory_length(category: np.ndarray, traj_span: tuple[int, int] | None) -> int:
    cat = np.asarray(category)
    return int(cat[slice(*traj_span)].size if traj_span is not None else cat.size)


@dataclass(frozen=True)
class TokenSets:
    """One trace's token labels, phrase occurrences and control sets, independent of any metric.

    The same sets serve every per-token quantity: the L̂ effects (`token_effects`) and the
    mechanistic per-layer arrays (`analyses.update_effects`).

    Attributes:
        labels: uint8 [T] 1/2 on tokens inside a reflection/delimiter occurrence, 0 on ordinary
            tokens (other codes passed in are kept and belong to no set).
        occurrences: The occurrences (trajectory coordinates), sorted by start.
        paragraph_initial: bool [T] ordinary tokens that start a paragraph, or None.
        position_matched: int64 [n_reflection_occ, k] matched ordinary tokens (-1 none).
        shuffled: [T] `labels` permuted within the trace.
        shuffled_ordinary: int64 [n] a random sample, as large as the shuffled reflection set, of
            the tokens whose shuffled label is ordinary.
        matched: {"matched_to_reflection" | "matched_to_delimiter": int64 [n_occ of that
            category]} start of each occurrence's matched ordinary window (`analyses.matching`;
            the window has the occurrence's length; -1 none). Empty when not matched.
    """

    labels: np.ndarray
    occurrences: tuple[Occurrence, ...]
    paragraph_initial: np.ndarray | None
    position_matched: np.ndarray
    shuffled: np.ndarray
    shuffled_ordinary: np.ndarray
    matched: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def n_tokens(self) -> int:
        """T, the number of trajectory tokens."""
        return int(self.labels.size)

    def matched_windows(self, name: str) -> list[tuple[int, int, int]]:
        """(occurrence start, control start, length) of each matched occurrence of a
        `MATCHED_SETS` name (occurrences without a control are left out)."""
        code = MATCHED_SETS[name]
        occs = [o for o in self.occurrences if o.category == code]
        starts = self.matched.get(name, np.full(len(occs), -1, np.int64))
        return [(o.start, int(m), o.end - o.start) for o, m in zip(occs, starts) if m >= 0]

    def indices(self, name: str, unit: str = "token") -> np.ndarray:
        """Trajectory token indices of one set.

        Args:
            name: `reflection`, `delimiter`, `ordinary`, `paragraph_initial`, `position_matched`,
                `shuffled_reflection`, `shuffled_ordinary` or `phrase:<id>`.
            unit: For phrase sets: `"token"` every token inside the occurrences, `"first_token"`
                each occurrence's first token (`"phrase"` is not a token set and is refused).
                Control sets are single tokens either way.

        Returns:
            int64 sorted unique indices (a token may appear once even if matched twice).
        """
        if unit not in ("token", "first_token"):
            raise ValueError(f"TokenSets.indices: unit must be 'token' or 'first_token', got {unit!r}.")
        if name == "ordinary":
            return np.flatnonzero(self.labels == ORDINARY)
        if name == "paragraph_initial":
            return (np.flatnonzero(self.paragraph_initial) if self.paragraph_initial is not None
                    else np.zeros(0, np.int64))
        if name == "position_matched":
            idx = self.position_matched.reshape(-1)
            return np.unique(idx[idx >= 0])
        if name == "shuffled_reflection":
            return np.flatnonzero(self.shuffled == REFLECTION)
        if name == "shuffled_ordinary":
            return np.asarray(self.shuffled_ordinary, np.int64)
        if name in MATCHED_SETS:
            wins = self.matched_windows(name)
            if unit == "first_token":
                return np.unique(np.asarray([m for _, m, _ in wins], np.int64))
            return np.unique(np.asarray([t for _, m, ln in wins for t in range(m, m + ln)], np.int64))
        if name in ("reflection", "delimiter"):
            code = REFLECTION if name == "reflection" else DELIMITER
            occs = [o for o in self.occurrences if o.category == code]
        elif name.startswith("phrase:"):
            pid = int(name.split(":", 1)[1])
            occs = [o for o in self.occurrences if o.phrase_id == pid]
        else:
            raise ValueError(f"Unknown set name {name!r}.")
        if unit == "first_token":
            return np.unique(np.asarray([o.start for o in occs], np.int64))
        return np.unique(np.asarray([t for o in occs for t in range(o.start, o.end)], np.int64))


def token_sets(
    category: np.ndarray,
    phrase_id: np.ndarray | None = None,
    is_first: np.ndarray | None = None,
    *,
    traj_span: tuple[int, int] | None = None,
    occurrences: Sequence[Occurrence] | None = None,
    paragraph_start: np.ndarray | None = None,
    n_matched: int = 1,
    match_window: int | None = None,
    rng: np.random.Generator | int | None = None,
    log_freq: np.ndarray | None = None,
    matched: bool = False,
) -> TokenSets:
    """One trace's labels, occurrences and control sets (see `token_effects` for the arguments).

    Draws from `rng` in a fixed order (position matching, label shuffle, null sample, then the
    confound-matched windows), so the same generator state gives the same sets whichever metric
    they are used with.

    `matched=True` adds the confound-matched controls (`TokenSets.matched`, `analyses.matching`):
    matched on position and, when given, `log_freq` (float [T] log2 corpus frequency of each
    trajectory token, `analyses.matching.corpus_log_frequency`) and `paragraph_start`.

    Returns:
        The `TokenSets`.

    Raises:
        ValueError: If an occurrence or `paragraph_start` does not fit the trajectory.
    """
    cat = np.asarray(category)
    if traj_span is not None:
        cat = cat[slice(*traj_span)]
    n = cat.size
    rng = np.random.default_rng(0 if rng is None else rng)
    if occurrences is None:
        occs = phrase_occurrences(category, phrase_id, is_first, traj_span)
    else:
        occs = sorted((Occurrence(*map(int, o[:4])) for o in occurrences),
                      key=lambda o: (o.start, o.phrase_id))

    labels = cat.astype(np.uint8).copy()
    labels[(labels == REFLECTION) | (labels == DELIMITER)] = ORDINARY
    for o in occs:
        if not 0 <= o.start < o.end <= n:
            raise ValueError(f"Occurrence {o} is outside the trajectory (T = {n}).")
        labels[o.start:o.end] = o.category

    para = None
    if paragraph_start is not None:
        ps = np.asarray(paragraph_start, dtype=bool)
        if ps.size != n:
            raise ValueError(f"paragraph_start has {ps.size} entries, the trajectory {n}.")
        para = ps & (labels == ORDINARY)

    refl_starts = [o.start for o in occs if o.category == REFLECTION]
    pos_matched = position_matched_ordinary(refl_starts, labels == ORDINARY, rng, n_matched,
                                        window=match_window)
    shuffled = shuffled_labels(labels, rng)
    pool = np.flatnonzero(shuffled == ORDINARY)
    size = min(int(np.sum(shuffled == REFLECTION)), pool.size)
    shuffled_ord = np.sort(rng.choice(pool, size=size, replace=False)) if size else pool[:0]
    match: dict[str, np.ndarray] = {}
    if matched:
        if log_freq is not None and np.asarray(log_freq).size != n:
            raise ValueError(f"log_freq has {np.asarray(log_freq).size} entries, the trajectory {n}.")
        ps = None if paragraph_start is None else np.asarray(paragraph_start, dtype=bool)
        for name, code in MATCHED_SETS.items():
            occ = [o for o in occs if o.category == code]
            match[name] = matched_windows([o.start for o in occ], [o.end - o.start for o in occ],
                                          labels == ORDINARY, log_freq=log_freq,
                                          paragraph_start=ps, rng=rng)
    return TokenSets(
        labels=labels,
        occurrences=tuple(occs),
        paragraph_initial=para,
        position_matched=pos_matched,
        shuffled=shuffled,
        shuffled_ordinary=shuffled_ord.astype(np.int64),
        matched=match,
    )
