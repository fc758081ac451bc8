"""When a comparison may claim anything: the floor on inference, BCa intervals, binomial CIs of
rates, and the noise floor of "L̂ falls".

The floor (`MIN_TRACES`): traces are the units of every test (`analyses.stats`), and below eight
of them a comparison prints no CI, p-value or verdict, only n and the raw per-trace values. Why
eight:

* the two-sided sign-flip permutation p-value (`signflip_p`, the test of every comparison) cannot
  go below 2 / 2^n, which is 0.0625 at n = 5 (never significant at α = 0.05, whatever the data)
  and 0.0078 at n = 8, the smallest n at which a perfectly consistent effect still passes Holm
  over a handful (≤ 6) of tests (the exact Wilcoxon signed-rank test has the same bound);
* a bootstrap CI resamples the traces: with n traces there are C(2n−1, n) distinct resamples and
  the median takes at most n values, so at n < 8 the interval is a few order statistics with
  coverage well below its nominal level (BCa's jackknife acceleration needs n − 1 ≥ 7 leave-one-out
  values to be more than noise).

Pure numpy/scipy; no I/O. Entry points: `too_few`, `signflip_p`, `bca_ci`, `rate_ci`,
`falls_beyond_noise`.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Sequence

import numpy as np
from scipy import stats

__all__ = [
    "MIN_TRACES",
    "NOT_TESTABLE",
    "bca_ci",
    "falls_beyond_noise",
    "raw_values_text",
    "rate_ci",
    "signflip_p",
    "signflip_pvalues",
    "too_few",
]

MIN_TRACES = 8
"""Fewest traces (units with both sets present) for a CI, p-value or verdict (module docstring)."""

NOT_TESTABLE = "not testable"
"""Verdict of a comparison below the floor."""


def too_few(n: int, min_traces: int = MIN_TRACES) -> str | None:
    """`"n = 2: too few traces for inference"` below the floor, else None."""
    if n < min_traces:
        return f"n = {n}: too few traces for inference"
    return None


@functools.lru_cache(maxsize=16)
def _signs(n: int, n_perm: int, seed: int) -> np.ndarray:
    """float64 [k, n] of ±1: every sign vector when 2^n ≤ n_perm + 1 (exact), else `n_perm`
    random ones drawn from `seed` (cached: a table's rows of equal n share them, which keeps every
    row's p valid and the table fast). Read-only."""
    if 2 ** n <= n_perm + 1:
        bits = (np.arange(2 ** n)[:, None] >> np.arange(n)) & 1
    else:
        bits = np.random.default_rng([seed, n]).integers(0, 2, size=(n_perm, n))
    out = 1.0 - 2.0 * bits
    out.setflags(write=False)
    return out


def signflip_p(diff: np.ndarray, *, n_perm: int = 9999, seed: int = 0) -> float:
    """Two-sided sign-flip permutation p-value of H0: mean within-trace difference = 0.

    The statistic is |Σ d_i| (the mean times n); its null distribution flips the sign of each
    trace's difference independently (every 2^n sign vector when 2^n ≤ n_perm + 1, else `n_perm`
    random ones, p = (1 + #{|T*| ≥ |T|}) / (n_perm + 1), the observed signs counted as a draw).
    It tests the mean, not the pseudo-median as the signed-rank test does, so a skewed difference
    with mean 0 is not a rejection (docs/statistics.md: why; the measured false-positive rates).

    Args:
        diff: One within-trace difference per trace (NaN-free).
        n_perm: Random sign vectors beyond exact enumeration.
        seed: Seed of those vectors (the same seed gives the same p).

    Returns:
        The p-value in (0, 1]; NaN for no traces or all differences 0.
    """
    return float(signflip_pvalues([diff], n_perm=n_perm, seed=seed)[0])


def signflip_pvalues(diffs: Sequence[np.ndarray], *, n_perm: int = 9999,
                     seed: int = 0) -> np.ndarray:
    """`signflip_p` of many rows at once: rows with the same number of traces share one sign
    matrix and one matrix product (a table of 300 rows over 200 traces in well under a second)."""
    ds = [np.asarray(d, np.float64).reshape(-1) for d in diffs]
    out = np.full(len(ds), np.nan)
    by_n: dict[int, list[int]] = {}
    for i, d in enumerate(ds):
        if d.size and np.any(d != 0):
            by_n.setdefault(int(d.size), []).append(i)
    for n, rows in by_n.items():
        signs = _signs(n, int(n_perm), int(seed))
        D = np.stack([ds[i] for i in rows], axis=1)  # [n, k]
        observed = np.abs(D.sum(axis=0))
        # a relative tolerance: a sign vector giving the same |sum| counts as "as extreme"
        tol = 1e-12 * np.abs(D).sum(axis=0)
        hits = np.count_nonzero(np.abs(signs @ D) >= observed - tol, axis=0)
        if 2 ** n <= n_perm + 1:  # exact: every sign vector, the observed one among them
            out[rows] = hits / signs.shape[0]
        else:
            out[rows] = (hits + 1) / (signs.shape[0] + 1)
    return out


def raw_values_text(a: Sequence[float], b: Sequence[float], *, spec: str = ".3g",
                    names: tuple[str, str] = ("A", "B")) -> str:
    """The per-trace values of an untestable comparison, e.g. `A = [0.12, 0.3]; B = [0.1, 0.25]`."""
    def one(v):
        return "[" + ", ".join("nan" if x != x else format(float(x), spec) for x in v) + "]"

    return f"{names[0]} = {one(a)}; {names[1]} = {one(b)}"


def bca_ci(
    values: np.ndarray,
    statistic: Callable[..., float] = np.median,
    *,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """BCa bootstrap CI of `statistic` over units (`scipy.stats.bootstrap(method="BCa")`).

    Falls back to the percentile interval of the same resamples where BCa is undefined (a
    degenerate bootstrap distribution, e.g. all values equal, gives NaN acceleration), and to
    (nan, nan) below two units.

    Args:
        values: One value per unit (NaN-free).
        statistic: Called as `statistic(x, axis=-1)`.
        n_boot: Resamples.
        level: Coverage.
        seed: Seed of the resampling.

    Returns:
        (low, high).
    """
    x = np.asarray(values, float)
    if x.size < 2:
        return (float("nan"), float("nan"))
    if np.all(x == x[0]):
        return (float(x[0]), float(x[0]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = stats.bootstrap((x,), statistic, n_resamples=n_boot, confidence_level=level,
                              method="BCa", rng=np.random.default_rng(seed), vectorized=True)
    lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    if math.isnan(lo) or math.isnan(hi):
        alpha = (1 - level) / 2
        lo, hi = (float(q) for q in np.quantile(res.bootstrap_distribution, [alpha, 1 - alpha]))
    return (lo, hi)


def rate_ci(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Exact (Clopper–Pearson) CI of a rate k / n (`scipy.stats.binomtest`)."""
    if n == 0:
        return (float("nan"), float("nan"))
    ci = stats.binomtest(int(k), int(n)).proportion_ci(confidence_level=level, method="exact")
    return (float(ci.low), float(ci.high))


def falls_beyond_noise(
    lhat: np.ndarray,
    *,
    tolerance: float = 0.01,
    relative: float = 0.02,
    noise_change: float | None = None,
) -> tuple[bool, float]:
    """Does L̂ fall along this trace by more than its noise floor?

    L̂ is computed exactly (no sampling), so its "noise" is what a change too small to mean
    anything looks like. The floor is the largest of `tolerance` (nats, absolute), `relative ·
    L̂_0` (2% of the starting loss by default: a random-init model's −0.005-nat change on
    L̂_0 ≈ log|V| does not count), and `|noise_change|` (a baseline's change on the same trace,
    e.g. the random-init model's) when given.

    Args:
        lhat: float [T+1] the curve.
        tolerance: Absolute floor in nats.
        relative: Floor as a share of `lhat[0]`.
        noise_change: A baseline change on the same trace, or None.

    Returns:
        (falls, floor): `lhat[T] − lhat[0] < −floor`, and the floor used.
    """
    c = np.asarray(lhat, float)
    if c.size < 2 or np.isnan(c[0]) or np.isnan(c[-1]):
        return False, float("nan")
    floor = max(tolerance, relative * abs(float(c[0])))
    if noise_change is not None and not math.isnan(noise_change):
        floor = max(floor, abs(float(noise_change)))
    return bool(c[-1] - c[0] < -floor), floor
