"""Whole L̂ curves: whether L̂ falls along the trajectory (`lhat_trend`), per-curve summaries
(`curve_summaries`), and two sets of curves compared pair by pair, e.g. thinking vs no-thinking
(`compare_curves`). Per-token effects are in `analyses.lhat_effects`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats

from analyses.inference import MIN_TRACES, falls_beyond_noise, too_few
from analyses.lhat_effects import _as_curve
from analyses.stats import bootstrap_ci, cliffs_delta, compare_paired, holm


def _spearman(y: np.ndarray) -> float:
    if y.size < 2 or np.any(np.isnan(y)) or np.all(y == y[0]):
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(stats.spearmanr(np.arange(y.size), y).statistic)


def _wilcoxon_one_sample(x: np.ndarray) -> float:
    x = x[~np.isnan(x)]
    if x.size < 2 or not np.any(x != 0):
        return float("nan")
    return float(stats.wilcoxon(x, zero_method="wilcox", alternative="two-sided").pvalue)


def lhat_trend(
    lhat_curves: Iterable[np.ndarray | Sequence[float]], *, n_boot: int = 2000, seed: int = 0,
    tolerance: float = 0.01, relative: float = 0.02, min_traces: int = MIN_TRACES,
) -> dict[str, Any]:
    """Does L̂ fall along the trajectory? Per trace and across traces (RaML Fig. 3-style claim).

    Per trace: `lhat_0` (no trajectory), `lhat_T` (full), `change = lhat_T − lhat_0`, `falls`
    (the drop exceeds the trace's noise floor, `analyses.inference.falls_beyond_noise`: at least
    `tolerance` nats and `relative` of L̂_0), `falls_raw` (`lhat_T < lhat_0`),
    `noise_floor`, and `spearman`, the Spearman correlation of L̂_t with t (negative = falling;
    NaN for constant or too short curves).

    Args:
        lhat_curves: One [T+1] curve per trace (lengths may differ).
        n_boot: Bootstrap resamples.
        seed: Seed.
        tolerance: The stated minimum drop (nats) for a trace to count as falling.
        relative: ... and the minimum as a share of the trace's L̂_0.
        min_traces: The floor on inference: fewer traces give no CI and no p-value (`note`).

    Returns:
        JSON-able dict: `per_trace` ({name: list}), `n_traces`, `share_falling` (beyond noise) and
        its bootstrap CI `share_falling_ci`, `share_falling_raw`, `tolerance`, `median_change`
        with `median_change_ci`, `mean_change`, `wilcoxon_p` (two-sided signed-rank test of the
        changes against 0), `median_spearman` with `median_spearman_ci`,
        `share_negative_spearman`, and `note` (too few traces, or "").
    """
    curves = [_as_curve(c) for c in lhat_curves]
    l0 = np.array([c[0] for c in curves], dtype=np.float64)
    lt = np.array([c[-1] for c in curves], dtype=np.float64)
    change = lt - l0
    beyond = [falls_beyond_noise(c, tolerance=tolerance, relative=relative) for c in curves]
    falls = np.array([b for b, _ in beyond], dtype=np.float64)
    falls_raw = (lt < l0).astype(np.float64)
    rho = np.array([_spearman(c) for c in curves], dtype=np.float64)
    ok_rho = rho[~np.isnan(rho)]
    nan2 = [float("nan"), float("nan")]
    note = too_few(len(curves), min_traces)
    if note is not None:
        def ci(_v, _stat=None, _seed=0):
            return nan2
    else:
        def ci(v, stat=np.median, s=0):
            return list(bootstrap_ci(v, stat, n_boot=n_boot, seed=s)) if v.size else nan2
    return {
        "per_trace": {
            "lhat_0": l0.tolist(), "lhat_T": lt.tolist(), "change": change.tolist(),
            "falls": falls.astype(bool).tolist(), "falls_raw": falls_raw.astype(bool).tolist(),
            "noise_floor": [f for _, f in beyond], "spearman": rho.tolist(),
        },
        "n_traces": len(curves),
        "share_falling": float(falls.mean()) if falls.size else float("nan"),
        "share_falling_ci": ci(falls, np.mean, seed),
        "share_falling_raw": float(falls_raw.mean()) if falls_raw.size else float("nan"),
        "tolerance": tolerance,
        "relative_tolerance": relative,
        "median_change": float(np.median(change)) if change.size else float("nan"),
        "median_change_ci": ci(change, np.median, seed + 1),
        "mean_change": float(change.mean()) if change.size else float("nan"),
        "wilcoxon_p": float("nan") if note else _wilcoxon_one_sample(change),
        "median_spearman": float(np.median(ok_rho)) if ok_rho.size else float("nan"),
        "median_spearman_ci": ci(ok_rho, np.median, seed + 2),
        "share_negative_spearman": float(np.mean(ok_rho < 0)) if ok_rho.size else float("nan"),
        "note": note or "",
    }


def curve_summaries(lhat_curves: Iterable[np.ndarray | Sequence[float]]) -> dict[str, np.ndarray]:
    """Per-curve summaries used to compare two sets of curves.

    * `final`: L̂_T.
    * `auc`: area under the normalised curve `L̂_t / L̂_0` over `x = t / T ∈ [0, 1]`
      (trapezoid; 1 = no progress, smaller = faster/larger decrease). NaN if T = 0 or L̂_0 = 0.
    * `half_time`: the first `t / T` at which L̂ has covered half its total change
      (`(L̂_t − L̂_0) / (L̂_T − L̂_0) >= 0.5`); NaN if L̂_T = L̂_0 or T = 0. Small = early
      convergence.

    Args:
        lhat_curves: One [T+1] curve per trace.

    Returns:
        {"final", "auc", "half_time": float64 [n]}.
    """
    final, auc, half = [], [], []
    for c in lhat_curves:
        y = _as_curve(c)
        t = y.size - 1
        final.append(y[-1])
        if t == 0 or y[0] == 0:
            auc.append(np.nan)
        else:
            r = y / y[0]
            auc.append(float(np.sum(r[:-1] + r[1:]) / (2.0 * t)))  # trapezoid, dx = 1/T
        total = y[-1] - y[0]
        if t == 0 or total == 0:
            half.append(np.nan)
        else:
            reached = np.flatnonzero((y - y[0]) / total >= 0.5)
            half.append(reached[0] / t if reached.size else np.nan)
    return {"final": np.asarray(final, float), "auc": np.asarray(auc, float),
            "half_time": np.asarray(half, float)}


@dataclass(frozen=True)
class CurveComparison:
    """One summary (e.g. final L̂) of curve set A against curve set B.

    Attributes:
        metric: `final`, `auc` or `half_time` (`curve_summaries`).
        a, b: Set names.
        paired: Whether curve i of A and B belong to the same trace/question.
        n_a, n_b: Curves with a finite value (paired: the pairs, both counts equal).
        median_a, median_b: Medians; `ci_median_a`, `ci_median_b` their bootstrap CIs.
        median_diff: Paired: median of the within-pair differences A − B; unpaired: median A −
            median B. `ci_median_diff` its bootstrap CI.
        cliffs_delta: Cliff's δ of A against B.
        test: `"wilcoxon"` (paired signed-rank) or `"mannwhitneyu"`.
        p: Two-sided p-value; `p_holm` Holm-adjusted over the metrics compared.
    """

    metric: str
    a: str
    b: str
    paired: bool
    n_a: int
    n_b: int
    median_a: float
    median_b: float
    ci_median_a: tuple[float, float]
    ci_median_b: tuple[float, float]
    median_diff: float
    ci_median_diff: tuple[float, float]
    cliffs_delta: float
    test: str
    p: float
    p_holm: float = float("nan")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return asdict(self)


def _diff_of_medians_ci(
    a: np.ndarray, b: np.ndarray, n_boot: int, seed: int
) -> tuple[float, float]:
    if a.size < 2 or b.size < 2:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    ma = np.median(a[rng.integers(0, a.size, (n_boot, a.size))], axis=1)
    mb = np.median(b[rng.integers(0, b.size, (n_boot, b.size))], axis=1)
    lo, hi = np.quantile(ma - mb, [0.025, 0.975])
    return (float(lo), float(hi))


def compare_curves(
    curves_a: Sequence[np.ndarray | Sequence[float]],
    curves_b: Sequence[np.ndarray | Sequence[float]],
    *,
    names: tuple[str, str] = ("thinking", "no_thinking"),
    paired: bool = True,
    metrics: Sequence[str] = ("final", "auc", "half_time"),
    n_boot: int = 2000,
    seed: int = 0,
) -> dict[str, CurveComparison]:
    """Compare two sets of L̂ curves, e.g. thinking vs no-thinking (docs/methods.md#m8).

    For no-thinking curves the caller inserts the NoThinking delimiter "Therefore, after all this,
    I believe the answer is" after `<think>` (RaML/QwQ) as the trajectory; this function only
    compares curve summaries (`curve_summaries`): final L̂ ("converges to a worse point"), area
    under the normalised curve and half-change time ("converges faster").

    Args:
        curves_a: Curves of set A (e.g. thinking).
        curves_b: Curves of set B; with `paired`, curve i belongs to the same question as A's i.
        names: Set names.
        paired: Pair by index (Wilcoxon signed-rank, bootstrap of within-pair differences);
            otherwise independent samples (Mann–Whitney U, bootstrap of the median difference).
        metrics: Summaries to compare.
        n_boot: Bootstrap resamples.
        seed: Seed.

    Returns:
        {metric: CurveComparison}, Holm-adjusted over `metrics`.

    Raises:
        ValueError: If `paired` and the two sets differ in size, or an unknown metric.
    """
    if paired and len(curves_a) != len(curves_b):
        raise ValueError(f"paired=True needs equally many curves, got {len(curves_a)} and "
                         f"{len(curves_b)}.")
    sa, sb = curve_summaries(curves_a), curve_summaries(curves_b)
    out: list[CurveComparison] = []
    for i, m in enumerate(metrics):
        if m not in sa:
            raise ValueError(f"Unknown metric {m!r}; use final, auc or half_time.")
        a, b = sa[m], sb[m]
        s = seed + 10 * i
        if paired:
            (r,) = compare_paired({names[0]: a, names[1]: b}, [names], n_boot=n_boot, seed=s)
            out.append(CurveComparison(
                metric=m, a=names[0], b=names[1], paired=True, n_a=r.n_traces, n_b=r.n_traces,
                median_a=r.median_a, median_b=r.median_b, ci_median_a=r.ci_median_a,
                ci_median_b=r.ci_median_b, median_diff=r.median_diff,
                ci_median_diff=r.ci_median_diff, cliffs_delta=r.cliffs_delta, test="wilcoxon",
                p=r.wilcoxon_p))
        else:
            a, b = a[~np.isnan(a)], b[~np.isnan(b)]
            if a.size and b.size and not (np.all(a == a[0]) and np.all(b == a[0])):
                p = float(stats.mannwhitneyu(a, b, alternative="two-sided").pvalue)
            else:
                p = float("nan")
            med_a = float(np.median(a)) if a.size else float("nan")
            med_b = float(np.median(b)) if b.size else float("nan")
            out.append(CurveComparison(
                metric=m, a=names[0], b=names[1], paired=False, n_a=int(a.size), n_b=int(b.size),
                median_a=med_a, median_b=med_b,
                ci_median_a=bootstrap_ci(a, n_boot=n_boot, seed=s),
                ci_median_b=bootstrap_ci(b, n_boot=n_boot, seed=s + 1),
                median_diff=med_a - med_b,
                ci_median_diff=_diff_of_medians_ci(a, b, n_boot, s + 2),
                cliffs_delta=cliffs_delta(a, b), test="mannwhitneyu", p=p))
    adjusted = holm([c.p for c in out])
    return {c.metric: CurveComparison(**{**asdict(c), "p_holm": float(p)})
            for c, p in zip(out, adjusted, strict=True)}
