"""Statistics for comparing token categories across traces: bootstrap CIs, the sign-flip p-value
(`analyses.inference.signflip_p`; the Wilcoxon signed-rank p kept as a descriptive field), Cliff's
δ, Holm.

Tokens within a trace are not independent, so every comparison first aggregates per trace (e.g. the
mean |ΔL̂| over a trace's reflection tokens) and then treats traces as the units: CIs resample
traces, tests pair the two categories within each trace. Below `analyses.inference.MIN_TRACES`
traces a comparison carries no CI or p-value, only n and its raw values. CIs are BCa
(`scipy.stats.bootstrap`) by default. Pure functions on numpy arrays; no I/O.
Entry point: `compare_paired`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

from analyses.inference import MIN_TRACES, bca_ci, signflip_pvalues, too_few

__all__ = [
    "PERMUTATIONS",
    "PairedComparison",
    "bootstrap_ci",
    "cliffs_delta",
    "compare_paired",
    "holm",
]


PERMUTATIONS = 9999
"""Random sign flips per permutation p-value: the smallest p is 1 / 10000, below Holm's
0.05 / 300 for compare's largest family."""


def cliffs_delta(x: np.ndarray, y: np.ndarray) -> float:
    """Cliff's δ = P(X > Y) − P(X < Y) over all pairs, in [−1, 1] (0: no effect).

    Computed from ranks in O((n+m) log(n+m)), ties counted as neither.
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    if x.size == 0 or y.size == 0:
        return float("nan")
    ys = np.sort(y)
    greater = np.searchsorted(ys, x, side="left").sum()  # pairs with y < x
    less = (y.size - np.searchsorted(ys, x, side="right")).sum()  # pairs with y > x
    return float((greater - less) / (x.size * y.size))


def bootstrap_ci(
    values: np.ndarray,
    statistic: Callable[[np.ndarray], float] = np.median,
    *,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap CI of `statistic` over units (here: traces).

    Args:
        values: One value per unit.
        statistic: Applied to each resample (vectorised over axis 1 when it accepts `axis`).
        n_boot: Number of resamples.
        level: Coverage, e.g. 0.95.
        seed: Seed of the private generator.

    Returns:
        (low, high); (nan, nan) for fewer than two units.
    """
    values = np.asarray(values, float)
    if values.size < 2:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, values.size, size=(n_boot, values.size))
    try:
        boots = statistic(values[idx], axis=1)
    except TypeError:
        boots = np.array([statistic(values[i]) for i in idx])
    alpha = (1 - level) / 2
    lo, hi = np.quantile(boots, [alpha, 1 - alpha])
    return (float(lo), float(hi))


def holm(pvalues: Sequence[float] | np.ndarray) -> np.ndarray:
    """Holm–Bonferroni adjusted p-values (step-down, monotone, capped at 1); NaNs stay NaN."""
    p = np.asarray(pvalues, float)
    out = np.full_like(p, np.nan)
    ok = ~np.isnan(p)
    q = p[ok]
    m = q.size
    if m == 0:
        return out
    order = np.argsort(q)
    adjusted = np.maximum.accumulate((m - np.arange(m)) * q[order])
    res = np.empty(m)
    res[order] = np.minimum(adjusted, 1.0)
    out[ok] = res
    return out


@dataclass(frozen=True)
class PairedComparison:
    """Category A against category B, with traces as units.

    Attributes:
        a, b: Category (or phrase) names.
        n_traces: Traces that have both categories.
        median_a, median_b: Medians over traces of the per-trace aggregates.
        mean_a, mean_b: Means over traces.
        ci_median_a, ci_median_b: Bootstrap CIs of those medians (resampling traces).
        median_diff: Median over traces of (A − B) within a trace.
        ci_median_diff: Bootstrap CI of `median_diff`.
        cliffs_delta: Cliff's δ between the per-trace aggregates of A and B.
        wilcoxon_p: Two-sided Wilcoxon signed-rank p-value of the within-trace differences
            (descriptive only: not calibrated on this project's data, docs/statistics.md).
        p: The calibrated p-value the verdicts use: two-sided sign-flip permutation test of the
            mean within-trace difference (`analyses.inference.signflip_p`).
        p_holm: Holm-adjusted `p` (set by `compare_paired` over its comparisons).
        testable: False below the floor (`analyses.inference.MIN_TRACES`): then every CI and
            p-value is NaN (the row is outside the Holm family) and `note` says why.
        note: `"n = 2: too few traces for inference"` for an untestable row, else "".
        values_a, values_b: The per-trace values of an untestable row (the raw data shown in
            place of the statistics); empty otherwise.
    """

    a: str
    b: str
    n_traces: int
    median_a: float
    median_b: float
    mean_a: float
    mean_b: float
    ci_median_a: tuple[float, float]
    ci_median_b: tuple[float, float]
    median_diff: float
    ci_median_diff: tuple[float, float]
    cliffs_delta: float
    wilcoxon_p: float
    p: float = float("nan")
    p_holm: float = float("nan")
    testable: bool = True
    note: str = ""
    values_a: tuple[float, ...] = ()
    values_b: tuple[float, ...] = ()

    def to_dict(self) -> dict:
        """JSON-able form."""
        return asdict(self)


def _paired(a_name: str, b_name: str, a: np.ndarray, b: np.ndarray, *, n_boot: int, seed: int,
            min_traces: int = MIN_TRACES, ci_method: str = "BCa"):
    both = ~(np.isnan(a) | np.isnan(b))
    a, b = a[both], b[both]
    diff = a - b
    note = too_few(int(diff.size), min_traces)
    nan2 = (float("nan"), float("nan"))
    medians = dict(
        a=a_name,
        b=b_name,
        n_traces=int(diff.size),
        median_a=float(np.median(a)) if a.size else float("nan"),
        median_b=float(np.median(b)) if b.size else float("nan"),
        mean_a=float(np.mean(a)) if a.size else float("nan"),
        mean_b=float(np.mean(b)) if b.size else float("nan"),
        median_diff=float(np.median(diff)) if diff.size else float("nan"),
        cliffs_delta=cliffs_delta(a, b),
    )
    if note is not None:
        # below the floor: no interval, no test; the raw per-trace values instead
        return PairedComparison(**medians, ci_median_a=nan2, ci_median_b=nan2, ci_median_diff=nan2,
                                wilcoxon_p=float("nan"), testable=False, note=note,
                                values_a=tuple(float(x) for x in a),
                                values_b=tuple(float(x) for x in b))
    if np.any(diff != 0):
        wp = float(stats.wilcoxon(a, b, zero_method="wilcox", alternative="two-sided").pvalue)
    else:
        wp = float("nan")

    def ci(v, s):
        if ci_method == "none":
            return nan2
        if ci_method == "BCa":
            return bca_ci(v, n_boot=n_boot, seed=s)
        return bootstrap_ci(v, n_boot=n_boot, seed=s)

    return PairedComparison(
        **medians,
        ci_median_a=ci(a, seed),
        ci_median_b=ci(b, seed + 1),
        ci_median_diff=ci(diff, seed + 2),
        wilcoxon_p=wp,
    )


def compare_paired(
    per_trace: dict[str, np.ndarray],
    pairs: Sequence[tuple[str, str]],
    *,
    n_boot: int = 2000,
    seed: int = 0,
    min_traces: int = MIN_TRACES,
    ci_method: str = "BCa",
    n_perm: int = PERMUTATIONS,
) -> list[PairedComparison]:
    """Compare categories pairwise with traces as units, Holm-correcting over `pairs`.

    Args:
        per_trace: Category name → per-trace aggregate, all arrays aligned on the same traces
            (NaN where a trace has no token of that category).
        pairs: (A, B) comparisons to make.
        n_boot: Bootstrap resamples per CI.
        seed: Base seed (each comparison derives its own).
        min_traces: The floor: a pair with fewer traces (both sets present) gets no CI, p-value
            or Holm entry, only its raw values (`analyses.inference`).
        ci_method: "BCa" (`scipy.stats.bootstrap`, the default), "percentile" (`bootstrap_ci`)
            or "none" (no intervals: the tests alone, e.g. for calibration runs).
        n_perm: Random sign flips of the permutation p-value (`analyses.inference.signflip_p`;
            exact enumeration where 2^n is not larger); they are drawn from `seed`, so a row's p
            is the same for the same seed.

    Returns:
        One `PairedComparison` per pair, with `p_holm` filled in (Holm of `p` over the testable
        rows).
    """
    if ci_method not in ("BCa", "percentile", "none"):
        raise ValueError(f"ci_method must be 'BCa', 'percentile' or 'none', got {ci_method!r}.")
    results = [
        _paired(a, b, np.asarray(per_trace[a], float), np.asarray(per_trace[b], float),
                n_boot=n_boot, seed=seed + 10 * i, min_traces=min_traces, ci_method=ci_method)
        for i, (a, b) in enumerate(pairs)
    ]
    diffs = []
    for r, (a, b) in zip(results, pairs, strict=True):
        x, y = np.asarray(per_trace[a], float), np.asarray(per_trace[b], float)
        both = ~(np.isnan(x) | np.isnan(y))
        diffs.append((x - y)[both] if r.testable else np.zeros(0))
    p = signflip_pvalues(diffs, n_perm=n_perm, seed=seed)
    adjusted = holm(p)
    return [
        PairedComparison(**{**r.to_dict(), "p": float(q), "p_holm": float(h)})
        for r, q, h in zip(results, p, adjusted, strict=True)
    ]
