"""Confound-matched controls: ordinary tokens that look like a reflection / delimiter occurrence in
everything but the category.

Reflection words are mostly paragraph-initial, frequent and late in a trace; a naive "reflection vs
all ordinary tokens" difference mixes those properties with the category ("Illusion of Insight",
arXiv 2601.00514). For each occurrence `[a, a+len)` of a category the matched control is a window
`[m, m+len)` of ordinary tokens of the SAME trace (so trace length is held fixed by design, and
relative and absolute position coincide up to the constant T) that minimises

    |m − a| / (POSITION_SCALE · T)  +  |log2 f(tok_m) − log2 f(tok_a)| / FREQUENCY_SCALE
                                    +  [paragraph start of m ≠ that of a]

where f is the token's count in the corpus (all trajectories of the cache: `corpus_log_frequency`).
So one unit of cost is 5% of the trace in position, a factor of 2 in frequency, or a different
paragraph status. Matching is with replacement (nearest neighbour; ties broken at random), so every
occurrence with at least one all-ordinary window of its length gets a control. `match_balance`
reports how close the matches are.

Pure numpy; no I/O. Entry points: `corpus_log_frequency`, `matched_windows`, `match_balance`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "FREQUENCY_SCALE",
    "MATCH_COVARIATES",
    "POSITION_SCALE",
    "corpus_log_frequency",
    "match_balance",
    "matched_windows",
]

POSITION_SCALE = 0.05
"""One unit of matching cost in position: 5% of the trace."""

FREQUENCY_SCALE = 1.0
"""One unit of matching cost in frequency: a factor 2 (log2 units)."""

MATCH_COVARIATES = ("position (relative = absolute / T, same trace)", "trace length (same trace)",
                    "corpus token frequency (log2)", "paragraph start")
"""What the matched controls are matched on, for reports."""


def corpus_log_frequency(token_lists: Sequence[np.ndarray]) -> list[np.ndarray]:
    """log2 of each token's count over all the given token lists (e.g. every trajectory).

    Args:
        token_lists: Per trace, int [T] token ids.

    Returns:
        Per trace, float64 [T]: log2 count of that token id in the whole corpus (>= 0).
    """
    arrays = [np.asarray(t, np.int64).reshape(-1) for t in token_lists]
    if not arrays:
        return []
    allt = np.concatenate(arrays)
    ids, counts = np.unique(allt, return_counts=True)
    out = []
    for t in arrays:
        out.append(np.log2(counts[np.searchsorted(ids, t)].astype(np.float64)) if t.size
                   else np.zeros(0))
    return out


def _window_starts(ordinary: np.ndarray, length: int) -> np.ndarray:
    """Starts m with tokens [m, m+length) all ordinary."""
    n = ordinary.size
    if length < 1 or n < length:
        return np.zeros(0, np.int64)
    run = np.convolve(ordinary.astype(np.int64), np.ones(length, np.int64), mode="valid")
    return np.flatnonzero(run == length)


def matched_windows(
    starts: Sequence[int],
    lengths: Sequence[int],
    ordinary_mask: np.ndarray,
    *,
    log_freq: np.ndarray | None = None,
    paragraph_start: np.ndarray | None = None,
    rng: np.random.Generator | int | None = None,
) -> np.ndarray:
    """The matched ordinary window of each occurrence (module docstring for the cost).

    Args:
        starts: First token of each occurrence (trajectory coordinates).
        lengths: Tokens of each occurrence.
        ordinary_mask: bool [T] tokens that may serve as controls.
        log_freq: float [T] log2 corpus frequency of each token, or None (not matched on).
        paragraph_start: bool [T] paragraph starts, or None (not matched on).
        rng: Tie-breaking.

    Returns:
        int64 [n_occ] start m of each control window `[m, m + length)`; -1 where the trace has
        no all-ordinary window of that length.
    """
    rng = np.random.default_rng(rng)
    ordinary = np.asarray(ordinary_mask, bool)
    n = ordinary.size
    out = np.full(len(starts), -1, np.int64)
    for k, (a, ln) in enumerate(zip(starts, lengths)):
        cand = _window_starts(ordinary, int(ln))
        if cand.size == 0:
            continue
        cost = np.abs(cand - int(a)) / (POSITION_SCALE * max(n, 1))
        if log_freq is not None:
            cost = cost + np.abs(log_freq[cand] - log_freq[int(a)]) / FREQUENCY_SCALE
        if paragraph_start is not None:
            cost = cost + (paragraph_start[cand] != paragraph_start[int(a)])
        cost = cost + rng.random(cand.size) * 1e-9  # ties only
        out[k] = cand[int(np.argmin(cost))]
    return out


def match_balance(
    pairs: Sequence[tuple[np.ndarray, np.ndarray, int]],
    log_freqs: Sequence[np.ndarray | None],
    paragraph_starts: Sequence[np.ndarray | None],
) -> dict[str, Any]:
    """How close the matched controls are to their occurrences, over all traces.

    Args:
        pairs: Per trace, (occurrence starts, matched starts (-1 none), T).
        log_freqs: Per trace, float [T] log2 frequencies, or None.
        paragraph_starts: Per trace, bool [T], or None.

    Returns:
        {"n_occurrences", "n_matched", "mean_abs_relative_position", "mean_abs_log2_frequency",
        "share_same_paragraph_status"} (NaN where not measured).
    """
    pos, freq, para = [], [], []
    n_occ = n_matched = 0
    for (a, m, T), lf, ps in zip(pairs, log_freqs, paragraph_starts):
        a, m = np.asarray(a, np.int64), np.asarray(m, np.int64)
        n_occ += a.size
        ok = m >= 0
        n_matched += int(ok.sum())
        a, m = a[ok], m[ok]
        pos += (np.abs(a - m) / max(T, 1)).tolist()
        if lf is not None:
            freq += np.abs(lf[a] - lf[m]).tolist()
        if ps is not None:
            para += (ps[a] == ps[m]).tolist()

    def mean(v):
        return float(np.mean(v)) if v else float("nan")

    return {"n_occurrences": n_occ, "n_matched": n_matched,
            "mean_abs_relative_position": mean(pos), "mean_abs_log2_frequency": mean(freq),
            "share_same_paragraph_status": mean(para)}
