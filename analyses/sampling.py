"""Statistics of k sampled answers per question: accuracy, Pass@k, G-Pass@k / mG-Pass@k, lengths.

Per question with n samples of which c are correct:

- Pass@k = 1 − C(n−c, k) / C(n, k), the unbiased estimator of "at least one of k samples is
  correct" (Chen et al. 2021, arXiv 2107.03374);
- G-Pass@k_τ = P(X ≥ ⌈τk⌉), X ~ Hypergeometric(n, c, k): at least a share τ of k samples drawn
  without replacement is correct, and mG-Pass@k = (2/k) Σ_{i=⌈k/2⌉+1}^{k} P(X ≥ i), its mean over
  τ in (0.5, 1] (Liu et al. 2024, arXiv 2412.13147; equal to the reference implementation in
  `open-compass/GPassK`); both unbiased for n ≥ k.

The questions are the units: every figure is a mean over questions of a per-question value, with a
percentile bootstrap CI that resamples questions (samples of one question are not independent
draws from the question pool). Per question, the accuracy gets a Wilson interval over its samples.
Pure numpy/scipy; entry point `sample_statistics`.
"""

from __future__ import annotations

from collections.abc import Sequence
from math import ceil, comb

import numpy as np
from scipy import stats

from analyses.stats import bootstrap_ci

__all__ = ["default_ks", "g_pass_at_k", "mg_pass_at_k", "pass_at_k", "sample_statistics", "wilson_ci"]

LENGTH_QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


def _check(n: int, c: int, k: int) -> None:
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased Pass@k of one question with `c` correct out of `n` samples (`1 <= k <= n`)."""
    _check(n, c, k)
    return 1.0 - comb(n - c, k) / comb(n, k)


def g_pass_at_k(n: int, c: int, k: int, tau: float) -> float:
    """G-Pass@k_τ of one question: P(at least ⌈τk⌉ (at least 1) of k samples are correct)."""
    _check(n, c, k)
    m = max(ceil(k * tau), 1)
    return float(stats.hypergeom.sf(m - 1, n, c, k))


def mg_pass_at_k(n: int, c: int, k: int) -> float:
    """mG-Pass@k of one question: (2/k) Σ_{i=⌈k/2⌉+1}^{k} P(X ≥ i) (0 for k = 1: an empty sum)."""
    _check(n, c, k)
    tail = stats.hypergeom.sf(np.arange(ceil(k / 2), k), n, c, k)  # P(X >= i), i = ⌈k/2⌉+1..k
    return float(2.0 * tail.sum() / k)


def wilson_ci(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion ((nan, nan) for n = 0)."""
    if n == 0:
        return (float("nan"), float("nan"))
    z = stats.norm.ppf(0.5 + level / 2)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (float(max(0.0, centre - half)), float(min(1.0, centre + half)))


def default_ks(n_min: int) -> list[int]:
    """The k reported: powers of two up to the fewest samples any question has, and that number."""
    ks = [1 << i for i in range(n_min.bit_length()) if 1 << i <= n_min]
    return ks + ([n_min] if n_min and n_min not in ks else [])


def _estimate(values: Sequence[float], *, n_boot: int, level: float, seed: int) -> dict:
    arr = np.asarray(values, float)
    lo, hi = bootstrap_ci(arr, np.mean, n_boot=n_boot, level=level, seed=seed)
    return {"value": float(arr.mean()) if arr.size else float("nan"), "ci": [lo, hi]}


def _length_statistics(n_tokens: Sequence[Sequence[int]], correct: Sequence[Sequence[bool]],
                       boot: dict) -> dict:
    lengths = np.concatenate([np.asarray(t, float) for t in n_tokens])
    flags = np.concatenate([np.asarray(c, bool) for c in correct])
    return {
        **_estimate([np.mean(t) for t in n_tokens], **boot),
        "quantiles": {str(q): float(v) for q, v in zip(LENGTH_QUANTILES,
                                                      np.quantile(lengths, LENGTH_QUANTILES))},
        "min": int(lengths.min()),
        "max": int(lengths.max()),
        "mean_correct": float(lengths[flags].mean()) if flags.any() else None,
        "mean_incorrect": float(lengths[~flags].mean()) if (~flags).any() else None,
    }


def sample_statistics(
    groups: Sequence[str],
    correct: Sequence[Sequence[bool]],
    n_tokens: Sequence[Sequence[int]] | None = None,
    truncated: Sequence[Sequence[bool]] | None = None,
    *,
    ks: Sequence[int] | None = None,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> dict:
    """Accuracy, Pass@k, mG-Pass@k, trajectory lengths and truncation over questions.

    Args:
        groups: One name per question.
        correct: Per question, whether each sample is correct.
        n_tokens: Per question, each sample's length in tokens (None: no `length` entry).
        truncated: Per question, whether each sample hit the token limit (None: no `truncated`).
        ks: The k of Pass@k / mG-Pass@k; default `default_ks` of the fewest samples. A k above a
            question's sample count leaves that question out of that k (`n_questions` says how many
            count).
        n_boot: Bootstrap resamples (of questions) per CI.
        level: CI coverage.
        seed: Bootstrap seed.

    Returns:
        A JSON-able dict: `n_questions`, `n_samples`, `samples_per_question` (min, max),
        `accuracy` (mean over questions of the share correct = Pass@1), `pass_at_k` and
        `mg_pass_at_k` ({k: {value, ci, n_questions}}), `all_correct` / `none_correct` (questions),
        `per_question` (group, n, n_correct, accuracy, Wilson CI; mean tokens, n_truncated), and
        with `n_tokens` / `truncated`: `length` (mean with CI, quantiles, min, max, mean of the
        correct and of the incorrect samples) / `truncated` (share with CI).
    """
    if not groups:
        raise ValueError("no questions")
    ns = [len(c) for c in correct]
    cs = [int(sum(c)) for c in correct]
    ks = list(ks) if ks is not None else default_ks(min(ns))
    boot = {"n_boot": n_boot, "level": level, "seed": seed}
    out: dict = {
        "n_questions": len(groups),
        "n_samples": int(sum(ns)),
        "samples_per_question": [min(ns), max(ns)],
        "ci_level": level,
        "accuracy": _estimate([c / n for c, n in zip(cs, ns)], **boot),
        "pass_at_k": {},
        "mg_pass_at_k": {},
        "all_correct": sum(c == n for c, n in zip(cs, ns)),
        "none_correct": cs.count(0),
    }
    for k in ks:
        use = [(n, c) for n, c in zip(ns, cs) if n >= k]
        if not use:
            continue
        out["pass_at_k"][str(k)] = {**_estimate([pass_at_k(n, c, k) for n, c in use], **boot),
                                    "n_questions": len(use)}
        if k > 1:
            out["mg_pass_at_k"][str(k)] = {**_estimate([mg_pass_at_k(n, c, k) for n, c in use], **boot),
                                           "n_questions": len(use)}
    per_question = [{"group": g, "n": n, "n_correct": c, "accuracy": c / n,
                     "ci": list(wilson_ci(c, n, level))} for g, n, c in zip(groups, ns, cs)]
    if n_tokens is not None:
        out["length"] = _length_statistics(n_tokens, correct, boot)
        for row, t in zip(per_question, n_tokens):
            row["mean_tokens"] = float(np.mean(t))
    if truncated is not None:
        out["truncated"] = _estimate([np.mean(t) for t in truncated], **boot)
        for row, t in zip(per_question, truncated):
            row["n_truncated"] = int(sum(t))
    out["per_question"] = per_question
    return out
