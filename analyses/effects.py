"""Causal edits of single tokens' updates, from the cached `eff_*` arrays (docs/methods.md#effects).

* `agreement`: V7 figures of real ΔL against a first-order prediction: Pearson r, Spearman ρ, the
  median relative error |real − pred| / |real| and the sign agreement.
* `v7_table`: those figures for both edits (attention knockout vs M7, MLP-step removal vs M6),
  pooled and per category.
* `headline`: per category, the mean real effect on the answer loss of removing one token's update,
  with a bootstrap CI over traces (per-trace means first, §7.5).
* `scatter_plot` (`scatter_figure`: unsaved): predicted vs real ΔL by category.

No model, no torch: everything reads numpy arrays (e.g. from `cache.open_cache`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from scipy import stats as sps

from analyses.stats import bootstrap_ci

if TYPE_CHECKING:
    from matplotlib.figure import Figure

CATEGORIES = ("reflection", "delimiter", "ordinary")
EDITS: dict[str, tuple[str, str, str]] = {
    "attn": ("eff_dl_attn", "eff_pred_m7", "attention knockout vs M7"),
    "mlp": ("eff_dl_mlp", "eff_pred_m6", "MLP-step removal vs M6"),
}
"""Edit → (real array, prediction array, label)."""


@dataclass
class TraceEffects:
    """The `eff_*` arrays of one trace with each pair's token category (name)."""

    trace_id: str
    arrays: dict[str, np.ndarray]
    category: np.ndarray  # str [n]


def agreement(real: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """V7 figures of `pred` as a predictor of `real` (finite pairs only).

    Returns:
        n, pearson, spearman, median_rel_err (|real − pred|/|real| over pairs with real ≠ 0),
        sign_agree (share of pairs with the same sign, both non-zero).
    """
    real, pred = np.asarray(real, float), np.asarray(pred, float)
    ok = np.isfinite(real) & np.isfinite(pred)
    real, pred = real[ok], pred[ok]
    out = {"n": int(real.size), "pearson": float("nan"), "spearman": float("nan"),
           "median_rel_err": float("nan"), "sign_agree": float("nan")}
    if real.size >= 3 and np.ptp(real) > 0 and np.ptp(pred) > 0:
        out["pearson"] = float(sps.pearsonr(real, pred)[0])
        out["spearman"] = float(sps.spearmanr(real, pred)[0])
    nz = real != 0
    if nz.any():
        out["median_rel_err"] = float(np.median(np.abs(real[nz] - pred[nz]) / np.abs(real[nz])))
    both = nz & (pred != 0)
    if both.any():
        out["sign_agree"] = float(np.mean(np.sign(real[both]) == np.sign(pred[both])))
    return out


def _pool(traces: Sequence[TraceEffects], name: str) -> tuple[np.ndarray, np.ndarray]:
    if not traces:
        return np.zeros(0), np.zeros(0, dtype=object)
    return (np.concatenate([t.arrays[name].astype(float) for t in traces]),
            np.concatenate([t.category for t in traces]))


def v7_table(traces: Sequence[TraceEffects]) -> dict[str, dict[str, dict[str, float]]]:
    """`agreement` per edit, pooled ("all") and per category."""
    table: dict[str, dict[str, dict[str, float]]] = {}
    for edit, (real_name, pred_name, _) in EDITS.items():
        real, cat = _pool(traces, real_name)
        pred, _ = _pool(traces, pred_name)
        rows = {"all": agreement(real, pred)}
        for c in CATEGORIES:
            rows[c] = agreement(real[cat == c], pred[cat == c])
        table[edit] = rows
    return table


def headline(traces: Sequence[TraceEffects], *, n_boot: int = 2000, seed: int = 0
             ) -> dict[str, dict[str, dict[str, float]]]:
    """Per edit and category: the mean real ΔL of removing one token's update, with a 95% CI.

    Unit: the trace (mean over its pairs of that category first), CI by bootstrap over traces.
    Also the mean |ΔL| (size regardless of sign) and the number of pairs.
    """
    out: dict[str, dict[str, dict[str, float]]] = {}
    for edit, (real_name, _, _) in EDITS.items():
        rows = {}
        for c in CATEGORIES:
            per_trace, per_trace_abs, n_pairs = [], [], 0
            for t in traces:
                v = t.arrays[real_name].astype(float)[t.category == c]
                v = v[np.isfinite(v)]
                if v.size:
                    per_trace.append(v.mean())
                    per_trace_abs.append(np.abs(v).mean())
                    n_pairs += v.size
            x, xa = np.asarray(per_trace), np.asarray(per_trace_abs)
            lo, hi = bootstrap_ci(x, np.mean, n_boot=n_boot, seed=seed)
            alo, ahi = bootstrap_ci(xa, np.mean, n_boot=n_boot, seed=seed)
            rows[c] = {"n_traces": int(x.size), "n_pairs": n_pairs,
                       "mean": float(x.mean()) if x.size else float("nan"), "ci_low": lo,
                       "ci_high": hi, "mean_abs": float(xa.mean()) if xa.size else float("nan"),
                       "abs_ci_low": alo, "abs_ci_high": ahi}
        out[edit] = rows
    return out


def format_v7(table: Mapping[str, Mapping[str, Mapping[str, float]]], title: str = "") -> list[str]:
    """Text lines of a `v7_table`."""
    lines = [f"V7 {title}".rstrip()] if title else []
    for edit, rows in table.items():
        lines.append(f"  {EDITS[edit][2]}:")
        for c, r in rows.items():
            lines.append(f"    {c:<10} n={r['n']:<5} pearson {r['pearson']:.3f}  spearman "
                         f"{r['spearman']:.3f}  median rel err {r['median_rel_err']:.3g}  "
                         f"sign agree {r['sign_agree']:.2f}")
    return lines


def format_headline(tables: Mapping[str, Mapping[str, Mapping[str, Mapping[str, float]]]]
                    ) -> list[str]:
    """Text lines of one or more `headline` results (label → table), side by side per row."""
    lines = []
    for edit in EDITS:
        lines.append(f"  real ΔL of removing one token's update ({EDITS[edit][2].split(' vs')[0]}),"
                     " mean over traces [95% CI], nats:")
        for c in CATEGORIES:
            cells = []
            for label, table in tables.items():
                r = table[edit][c]
                cells.append(f"{label}: {r['mean']:+.3g} [{r['ci_low']:+.3g}, {r['ci_high']:+.3g}]"
                             f" |ΔL| {r['mean_abs']:.3g} (n={r['n_traces']})")
            lines.append(f"    {c:<10} " + "   ".join(cells))
    return lines


def scatter_plot(traces: Iterable[TraceEffects], path: str | Path, *, title: str = "") -> Path:
    """Write `scatter_figure(traces, title=title)` to the PNG `path` (folders created)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = scatter_figure(traces, title=title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110)
    return path


def scatter_figure(traces: Iterable[TraceEffects], *, title: str = "") -> Figure:
    """Predicted vs real ΔL, one panel per edit, coloured by category (symlog axes, linear below
    the 10th percentile of the nonzero |values|); the unsaved Figure (Matplotlib's object API, no
    pyplot state)."""
    from matplotlib.figure import Figure

    traces = list(traces)
    colors = {"reflection": "tab:red", "delimiter": "tab:blue", "ordinary": "0.6"}
    fig = Figure(figsize=(10, 4.5))
    axes = fig.subplots(1, 2)
    for ax, (real_name, pred_name, label) in zip(axes, EDITS.values()):
        real, cat = _pool(traces, real_name)
        pred, _ = _pool(traces, pred_name)
        for c in ("ordinary", "delimiter", "reflection"):
            m = cat == c
            ax.scatter(pred[m], real[m], s=8, alpha=0.6, color=colors[c], label=f"{c} ({m.sum()})")
        finite = np.isfinite(real) & np.isfinite(pred)
        if finite.any():
            lim = [min(real[finite].min(), pred[finite].min()),
                   max(real[finite].max(), pred[finite].max())]
            ax.plot(lim, lim, color="k", lw=0.8, ls="--")
            both = np.abs(np.concatenate([real[finite], pred[finite]]))
            both = both[both > 0]
            if both.size:  # symlog: the bulk near 0 and the rare large effects both visible
                lt = float(max(np.quantile(both, 0.1), 1e-12))
                ax.set_xscale("symlog", linthresh=lt)
                ax.set_yscale("symlog", linthresh=lt)
        r = agreement(real, pred)
        ax.set_title(f"{label}\nr {r['pearson']:.2f}, ρ {r['spearman']:.2f}, n {r['n']}", fontsize=9)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("first-order prediction of ΔL (nats)")
        ax.set_ylabel("real ΔL (nats)")
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
