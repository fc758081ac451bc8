"""`compare`'s confound matching read from a cache: the corpus frequency of every trajectory token
(the matching covariate of `analyses.matching`) and the balance / description lines of a report."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from analyses.matching import MATCH_COVARIATES, corpus_log_frequency, match_balance
from analyses.token_sets import MATCHED_SETS, TokenSets
from probes.readouts.loader import load_traces


def trajectory_log_frequency(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Trace id -> float64 [T]: log2 count of each trajectory token over all trajectories of the
    cache (the corpus the traces come from)."""
    traces = load_traces(path, arrays=[])
    toks = [np.asarray(t.tokens[slice(*t.trajectory)]) for t in traces]
    return dict(zip([t.id for t in traces], corpus_log_frequency(toks)))


def matching_summary(sets: Sequence[TokenSets], log_freqs: Sequence[np.ndarray | None],
                     paragraph_starts: Sequence[np.ndarray | None], *, matched: bool) -> dict[str, Any]:
    """What `compare` matched on and how close the matches are, per category."""
    if not matched:
        return {"applied": False, "covariates": [],
                "text": "matching: none (--unmatched: categories against all ordinary tokens)"}
    balance = {}
    for name in MATCHED_SETS:
        pairs = []
        for ts in sets:
            wins = [(o.start, o.end - o.start) for o in ts.occurrences
                    if o.category == MATCHED_SETS[name]]
            pairs.append((np.asarray([a for a, _ in wins], np.int64),
                          np.asarray(ts.matched.get(name, np.full(len(wins), -1)), np.int64),
                          ts.n_tokens))
        balance[name] = match_balance(pairs, log_freqs, paragraph_starts)
    parts = []
    for name, b in balance.items():
        if b["n_occurrences"]:
            parts.append(f"{name}: {b['n_matched']}/{b['n_occurrences']} occurrences matched, "
                         f"mean |Δposition| {b['mean_abs_relative_position']:.3f} of the trace, "
                         f"mean |Δlog2 freq| {b['mean_abs_log2_frequency']:.2f}, same paragraph "
                         f"status {b['share_same_paragraph_status']:.0%}")
    text = ("matching: each category against ordinary windows of the same trace matched on "
            + ", ".join(MATCH_COVARIATES) + "\n  " + "\n  ".join(parts or ["no occurrences"]))
    return {"applied": True, "covariates": list(MATCH_COVARIATES), "balance": balance, "text": text}
