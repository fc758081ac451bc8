"""Trajectory efficiency from L̂ curves: how much, how fast and how early a trajectory lowers the
answer loss, its relation to trajectory length, and paired variants of the same question.

Conventions as in `analyses.lhat_effects`: a curve `y` is float [T+1], `y[t]` = L̂ after t
trajectory tokens (`y[0]`: no trajectory). Per trace (`efficiency_measures`, docs/methods.md#efficiency):

* `drop = y[0] − y[T]` (nats; > 0 = the trajectory lowered the answer loss);
* `tokens_to_50`, `tokens_to_90`: the first t with `y[0] − y[t] ≥ f · drop` (f = 0.5, 0.9);
  NaN when `drop ≤ 0`; `frac_to_50`, `frac_to_90` the same divided by T; `stay_to_90` the first t
  from which the curve stays at or below that level (a transient dip does not count);
* `auc_remaining`: area under the normalised remaining-drop curve `r_t = (y[t] − y[T]) / drop`
  over `x = t / T ∈ [0, 1]` (trapezoid): 0.5 for a straight line, near 0 when the whole drop comes
  at once at the start, near 1 when it comes at the end (in [0, 1] for a monotone curve; a curve
  that overshoots or rises above its start can leave it); NaN when `drop ≤ 0` or T = 0;
* `drop_per_100 = 100 · drop / T`;
* `final` = `y[T]` and `length` = T.

Across traces: `length_relation` (Spearman correlation of each measure with T, bootstrap CI over
traces). Paired variants (`compare_variants`): per group (question), variant A against variant B
on final L̂, tokens-to-90% and stay-to-90% with `analyses.stats.compare_paired` (Wilcoxon signed-rank,
bootstrap CI of the median within-group difference, Cliff's δ, Holm over every comparison).
Pure numpy/scipy; no I/O.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats

from analyses.lhat_effects import _as_curve
from analyses.stats import compare_paired, holm

__all__ = [
    "MEASURES",
    "VARIANT_METRICS",
    "compare_variants",
    "efficiency_measures",
    "length_relation",
    "measure_table",
    "tokens_to_fraction",
    "verdict",
]

MEASURES = ("final", "drop", "tokens_to_50", "tokens_to_90", "stay_to_90", "frac_to_50", "frac_to_90",
            "auc_remaining", "drop_per_100", "length")
"""Per-trace measures of `efficiency_measures`, in report order."""

VARIANT_METRICS = ("final", "tokens_to_90", "stay_to_90")
"""What `compare_variants` compares by default: final L̂, tokens to 90% (first reach) and tokens
until L̂ stays within 90% of its drop (robust to transient dips)."""


def tokens_to_fraction(y: np.ndarray, fraction: float, *, stay: bool = False) -> float:
    """The first t at which the curve has covered `fraction` of its final drop.

    `min{t : y[0] − y[t] ≥ fraction · (y[0] − y[T])}`; with `stay`, the first t from which it
    stays covered (`min{t : y[0] − y[s] ≥ fraction · drop for every s ≥ t}`), which a transient dip
    does not trigger. NaN when the curve does not fall (`y[T] ≥ y[0]`). With `fraction` in (0, 1]
    the answer is at most T.
    """
    y = _as_curve(y)
    drop = y[0] - y[-1]
    if not drop > 0:
        return float("nan")
    # a tiny relative slack so a curve that lands exactly on the threshold counts (float rounding)
    ok = y[0] - y >= fraction * drop * (1 - 1e-12)
    if stay:
        bad = np.flatnonzero(~ok)
        return float(bad[-1] + 1) if bad.size else 0.0
    return float(np.flatnonzero(ok)[0])


def efficiency_measures(y: np.ndarray | Sequence[float]) -> dict[str, float]:
    """Every measure of `MEASURES` for one L̂ curve (definitions in the module docstring)."""
    y = _as_curve(y)
    T = y.size - 1
    drop = float(y[0] - y[-1])
    t50, t90 = tokens_to_fraction(y, 0.5), tokens_to_fraction(y, 0.9)
    s90 = tokens_to_fraction(y, 0.9, stay=True)
    if T == 0 or not drop > 0:
        auc = float("nan")
    else:
        r = (y - y[-1]) / drop
        auc = float(np.sum(r[:-1] + r[1:]) / (2.0 * T))
    return {
        "final": float(y[-1]),
        "drop": drop,
        "tokens_to_50": t50,
        "tokens_to_90": t90,
        "stay_to_90": s90,
        "frac_to_50": t50 / T if T else float("nan"),
        "frac_to_90": t90 / T if T else float("nan"),
        "auc_remaining": auc,
        "drop_per_100": 100.0 * drop / T if T else float("nan"),
        "length": float(T),
    }


def measure_table(curves: Sequence[np.ndarray | Sequence[float]]) -> dict[str, np.ndarray]:
    """`efficiency_measures` of every curve as columns: {measure: float64 [n]}."""
    rows = [efficiency_measures(c) for c in curves]
    return {m: np.array([r[m] for r in rows], dtype=np.float64) for m in MEASURES}


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    if x.size < 3 or np.all(x == x[0]) or np.all(y == y[0]):
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(stats.spearmanr(x, y).statistic)


def _spearman_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman correlation of each row pair of x, y [n_boot, n] (average ranks for ties; NaN
    for a constant row), vectorised over rows."""
    rx = stats.rankdata(x, axis=1)
    ry = stats.rankdata(y, axis=1)
    rx -= rx.mean(axis=1, keepdims=True)
    ry -= ry.mean(axis=1, keepdims=True)
    den = np.sqrt((rx * rx).sum(axis=1) * (ry * ry).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (rx * ry).sum(axis=1) / np.where(den > 0, den, 1.0), np.nan)


def length_relation(
    table: Mapping[str, np.ndarray],
    *,
    measures: Sequence[str] = ("drop", "tokens_to_90", "frac_to_90", "auc_remaining", "drop_per_100",
                               "final"),
    n_boot: int = 2000,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Spearman correlation of each measure with trajectory length T across traces.

    Traces are the units: the CI is a percentile bootstrap over traces (pairs (T, measure)
    resampled together; resamples where the correlation is undefined are dropped), the p-value
    scipy's two-sided test, Holm-adjusted over `measures`. NaN measures drop that trace.

    Returns:
        One dict per measure: `measure`, `n`, `spearman`, `ci` [low, high], `p`, `p_holm`.
    """
    length = np.asarray(table["length"], np.float64)
    rng = np.random.default_rng(seed)
    out = []
    for m in measures:
        v = np.asarray(table[m], np.float64)
        ok = ~(np.isnan(v) | np.isnan(length))
        x, y = length[ok], v[ok]
        rho = _spearman(x, y)
        ci = [float("nan"), float("nan")]
        p = float("nan")
        if not np.isnan(rho):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                p = float(stats.spearmanr(x, y).pvalue)
            idx = rng.integers(0, x.size, size=(n_boot, x.size))
            boots = _spearman_rows(x[idx], y[idx])
            boots = boots[~np.isnan(boots)]
            if boots.size:
                ci = [float(q) for q in np.quantile(boots, [0.025, 0.975])]
        out.append({"measure": m, "n": int(x.size), "spearman": rho, "ci": ci, "p": p})
    for r, q in zip(out, holm([r["p"] for r in out]), strict=True):
        r["p_holm"] = float(q)
    return out


def _by_group(
    table: Mapping[str, np.ndarray], groups: Sequence[str], variants: Sequence[str | None],
    metric: str, a: str, b: str,
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Per group holding both variants (the first trace of each): values of A and of B."""
    where: dict[tuple[str, str], int] = {}
    for i, (g, v) in enumerate(zip(groups, variants, strict=True)):
        if g is not None and v is not None:
            where.setdefault((g, v), i)
    names = sorted({g for g, v in where if v == a} & {g for g, v in where if v == b})
    col = np.asarray(table[metric], np.float64)
    return (names, np.array([col[where[(g, a)]] for g in names]),
            np.array([col[where[(g, b)]] for g in names]))


def compare_variants(
    table: Mapping[str, np.ndarray],
    groups: Sequence[str | None],
    variants: Sequence[str | None],
    pairs: Sequence[tuple[str, str]],
    *,
    metrics: Sequence[str] = VARIANT_METRICS,
    n_boot: int = 2000,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Compare variants of the same questions, paired by group (docs/methods.md#efficiency).

    Args:
        table: Per-trace measures (`measure_table`), aligned with `groups` and `variants`.
        groups: The trace's group (question) or None.
        variants: The trace's variant or None.
        pairs: (A, B) variant names; each row is A − B within a group.
        metrics: Measures compared.
        n_boot: Bootstrap resamples.
        seed: Seed.

    Returns:
        One flat dict per (pair, metric): `a`, `b`, `metric`, `n_groups` (groups with both; pairs
        with a NaN value, e.g. tokens-to-90% of a curve that does not fall, drop out: `n_pairs`),
        the `analyses.stats.PairedComparison` fields (`median_a`, `median_b`, `median_diff`,
        `ci_median_diff`, `cliffs_delta`, `wilcoxon_p`), `mean_diff`, `share_a_lower` (share of
        pairs with A < B), and `p_holm` over every row.
    """
    rows: list[dict[str, Any]] = []
    k = 0
    for a, b in pairs:
        for metric in metrics:
            names, va, vb = _by_group(table, groups, variants, metric, a, b)
            (r,) = compare_paired({a: va, b: vb}, [(a, b)], n_boot=n_boot, seed=seed + 10 * k)
            k += 1
            ok = ~(np.isnan(va) | np.isnan(vb))
            d = va[ok] - vb[ok]
            row = r.to_dict()
            row.pop("p_holm")
            row.pop("n_traces")
            rows.append({"metric": metric, "n_groups": len(names), "n_pairs": int(d.size), **row,
                         "mean_diff": float(d.mean()) if d.size else float("nan"),
                         "share_a_lower": float(np.mean(d < 0)) if d.size else float("nan")})
    for r, q in zip(rows, holm([r["wilcoxon_p"] for r in rows]), strict=True):
        r["p_holm"] = float(q)
    return rows


def verdict(row: Mapping[str, Any], *, alpha: float = 0.05) -> str:
    """"lower" / "higher" (A against B, Holm p < alpha and the CI of the median difference
    excludes 0), else "no clear difference"."""
    lo, hi = row["ci_median_diff"]
    p = row["p_holm"]
    if p is None or lo is None or hi is None or p != p or not p < alpha:
        return "no clear difference"
    if hi < 0:
        return "lower"
    if lo > 0:
        return "higher"
    return "no clear difference"
