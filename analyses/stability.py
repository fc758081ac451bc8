"""Stability of the inner loop along a trajectory, and several models compared on the same traces.

Per trace, from its L̂ curve `y` [T+1] with steps `Δ_t = y[t+1] − y[t]` (docs/methods.md#stability):

* `var_delta`: the variance of the steps, `mean((Δ − mean Δ)²)` (nats²; 0 for a straight line);
* `frac_nonmonotone`: the share of steps against the curve's net direction `s = sign(y[T] − y[0])`
  (s = −1, descent, for a flat curve): `mean(s · Δ_t < 0)`; 0 for a monotone curve;
* `osc_energy`: the oscillation energy after smoothing: with `ỹ` the centred moving average of `y`
  over `window` tokens (edges padded with the end values) and `Δ̃` its steps,
  `(1/T) Σ_t min(0, s · Δ̃_t)²`, the mean squared smoothed step against the net direction
  (nats² per token); 0 when the smoothed curve is monotone.

Models are compared with traces as units (`model_summary`, `compare_models`): the per-trace values
of model A and model B on the same trace are paired (Wilcoxon signed-rank, bootstrap CI of the
median within-trace difference, Cliff's δ; `analyses.stats.compare_paired`), Holm over every row.
Pure numpy/scipy; no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from analyses.lhat_effects import _as_curve
from analyses.stats import bootstrap_ci, compare_paired, holm

__all__ = [
    "DEFAULT_WINDOW",
    "STABILITY",
    "compare_models",
    "model_summary",
    "smooth",
    "stability_measures",
]

STABILITY = ("var_delta", "frac_nonmonotone", "osc_energy")
"""Per-trace stability measures of `stability_measures`."""

DEFAULT_WINDOW = 9
"""Tokens of the centred moving average before the oscillation energy (about one reasoning line
of the built-in reasoner)."""


def smooth(y: np.ndarray | Sequence[float], window: int = DEFAULT_WINDOW) -> np.ndarray:
    """Centred moving average over `window` points (odd; an even window is made odd by adding 1,
    and it is capped at the curve's length), the ends padded with the end values; same length."""
    y = _as_curve(y)
    if window < 1:
        raise ValueError(f"smoothing window must be >= 1, got {window}")
    w = min(window | 1, y.size if y.size % 2 else y.size - 1)
    if w <= 1:
        return y.copy()
    h = w // 2
    padded = np.pad(y, h, mode="edge")
    c = np.concatenate([[0.0], np.cumsum(padded)])
    return (c[w:] - c[:-w]) / w


def stability_measures(y: np.ndarray | Sequence[float], *, window: int = DEFAULT_WINDOW) -> dict[str, float]:
    """`var_delta`, `frac_nonmonotone` and `osc_energy` of one L̂ curve (NaN when T = 0)."""
    y = _as_curve(y)
    T = y.size - 1
    if T == 0:
        return {m: float("nan") for m in STABILITY}
    d = np.diff(y)
    s = 1.0 if y[-1] > y[0] else -1.0
    ds = np.diff(smooth(y, window))
    against = np.minimum(0.0, s * ds)
    return {
        "var_delta": float(np.var(d)),
        "frac_nonmonotone": float(np.mean(s * d < 0)),
        "osc_energy": float(np.sum(against * against) / T),
    }


def model_summary(
    per_model: Mapping[str, Mapping[tuple[str, str], np.ndarray]], *, n_boot: int = 2000, seed: int = 0
) -> list[dict[str, Any]]:
    """Per model and (measure, category): `n` (finite traces), `median` with bootstrap `ci_low`,
    `ci_high` (traces resampled), `mean`. One flat dict per row (pandas-friendly)."""
    rows = []
    for model, cols in per_model.items():
        for k, ((measure, category), v) in enumerate(cols.items()):
            v = np.asarray(v, np.float64)
            v = v[~np.isnan(v)]
            lo, hi = bootstrap_ci(v, n_boot=n_boot, seed=seed + k) if v.size else (np.nan, np.nan)
            rows.append({"kind": "model", "model": model, "measure": measure, "category": category,
                         "n": int(v.size), "median": float(np.median(v)) if v.size else float("nan"),
                         "ci_low": float(lo), "ci_high": float(hi),
                         "mean": float(v.mean()) if v.size else float("nan")})
    return rows


def compare_models(
    per_model: Mapping[str, Mapping[tuple[str, str], np.ndarray]],
    pairs: Sequence[tuple[str, str]],
    *,
    n_boot: int = 2000,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Model A against model B on every (measure, category) both have, paired by trace.

    Args:
        per_model: Model → {(measure, category): per-trace values}, every array aligned on the
            same traces (NaN where a trace has no value, e.g. no reflection token).
        pairs: (A, B) model names; differences are A − B.
        n_boot: Bootstrap resamples.
        seed: Seed.

    Returns:
        One flat dict per (pair, measure, category): `kind` "paired", `a`, `b`, `measure`,
        `category`, `n` (traces with both values), `median_a`, `median_b`, `median_diff`,
        `ci_low`, `ci_high` (bootstrap CI of the median within-trace difference), `mean_diff`,
        `cliffs_delta`, `wilcoxon_p`, `p_holm` (Holm over the testable rows), `testable` and `note`
        (below `analyses.inference.MIN_TRACES` traces a row has no CI or p-value: NaN, and `note`
        says why).
    """
    rows: list[dict[str, Any]] = []
    k = 0
    for a, b in pairs:
        for key in (key for key in per_model[a] if key in per_model[b]):
            va = np.asarray(per_model[a][key], np.float64)
            vb = np.asarray(per_model[b][key], np.float64)
            (r,) = compare_paired({"a": va, "b": vb}, [("a", "b")], n_boot=n_boot, seed=seed + 10 * k)
            k += 1
            ok = ~(np.isnan(va) | np.isnan(vb))
            d = va[ok] - vb[ok]
            rows.append({"kind": "paired", "a": a, "b": b, "measure": key[0], "category": key[1],
                         "n": r.n_traces, "median_a": r.median_a, "median_b": r.median_b,
                         "median_diff": r.median_diff, "ci_low": r.ci_median_diff[0],
                         "ci_high": r.ci_median_diff[1],
                         "mean_diff": float(d.mean()) if d.size else float("nan"),
                         "cliffs_delta": r.cliffs_delta, "wilcoxon_p": r.wilcoxon_p,
                         "testable": r.testable, "note": r.note})
    for r, q in zip(rows, holm([r["wilcoxon_p"] for r in rows]), strict=True):
        r["p_holm"] = float(q)
    return rows
