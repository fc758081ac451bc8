"""PNG plots of trajectory efficiency and of models compared on the same traces.

* `plot_variant_curves`: L̂ against the trajectory token index, one colour per variant (each trace
  faint, the per-token median over traces bold), so a faster variant's curve falls earlier.
* `plot_model_curves`: per model, the median L̂ over traces against the normalised position t/T
  (curves resampled on a common grid) with the interquartile band, and beside it the per-model
  medians (95% CI) of the stability measures.

`variant_curves_figure` and `model_curves_figure` return the unsaved Figures (the CLI saves them
through `probes.safe_output.save_figure`). Matplotlib's object API and the Agg canvas only (no
pyplot state), as in `analyses.plots`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["model_curves_figure", "plot_model_curves", "plot_variant_curves", "resample_curve",
           "variant_curves_figure"]

_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink",
            "tab:gray")


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110)
    return path


def resample_curve(y: np.ndarray, n: int = 101) -> np.ndarray:
    """The curve on `n` equally spaced points of the normalised position t/T ∈ [0, 1] (linear
    interpolation; a one-point curve is constant)."""
    y = np.asarray(y, np.float64)
    if y.size == 1:
        return np.full(n, y[0])
    return np.interp(np.linspace(0, 1, n), np.linspace(0, 1, y.size), y)


def _median_by_token(curves: Sequence[np.ndarray]) -> np.ndarray:
    """Per token index, the median over the curves that reach it."""
    n = max(c.size for c in curves)
    stack = np.full((len(curves), n), np.nan)
    for i, c in enumerate(curves):
        stack[i, : c.size] = c
    return np.nanmedian(stack, axis=0)


def plot_variant_curves(curves_by_variant: Mapping[str, Sequence[np.ndarray]], path: str | Path, *,
                        marks: Mapping[str, float] | None = None,
                        title: str = "L̂ along the trajectory, by variant") -> Path:
    """One PNG: every curve faint, the per-token median over the curves that reach that token bold,
    a colour per variant (log y); `marks[variant]` (e.g. the median tokens until L̂ stays within
    90% of its drop) as a dashed vertical line."""
    return _save(variant_curves_figure(curves_by_variant, marks=marks, title=title), path)


def variant_curves_figure(curves_by_variant: Mapping[str, Sequence[np.ndarray]], *,
                          marks: Mapping[str, float] | None = None,
                          title: str = "L̂ along the trajectory, by variant") -> Figure:
    """The Figure of `plot_variant_curves` (same arguments), not saved."""
    fig = Figure(figsize=(7, 4.2))
    ax = fig.add_subplot()
    for k, (name, curves) in enumerate(curves_by_variant.items()):
        colour = _COLOURS[k % len(_COLOURS)]
        curves = [np.asarray(c, np.float64) for c in curves]
        for c in curves:
            ax.plot(np.arange(c.size), np.maximum(c, 1e-6), color=colour, alpha=0.15, lw=0.8)
        if curves:
            med = _median_by_token(curves)
            ax.plot(np.arange(med.size), np.maximum(med, 1e-6), color=colour, lw=2,
                    label=f"{name} (n={len(curves)})")
        x = (marks or {}).get(name)
        if x is not None and np.isfinite(x):
            ax.axvline(x, color=colour, ls="--", lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("trajectory tokens t")
    ax.set_ylabel("L̂_t (nats per answer token)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return fig


def plot_model_curves(curves_by_model: Mapping[str, Sequence[np.ndarray]],
                      stability: Mapping[str, Mapping[str, tuple[float, float, float]]],
                      path: str | Path) -> Path:
    """One PNG: left, median L̂ per model on the normalised position with the IQR band; right,
    per stability measure the per-model median and 95% CI (`stability[model][measure] =
    (median, low, high)`), each measure scaled by its largest |median| so they share an axis."""
    return _save(model_curves_figure(curves_by_model, stability), path)


def model_curves_figure(curves_by_model: Mapping[str, Sequence[np.ndarray]],
                        stability: Mapping[str, Mapping[str, tuple[float, float, float]]]) -> Figure:
    """The Figure of `plot_model_curves` (same arguments), not saved."""
    fig = Figure(figsize=(11, 4.2))
    ax, bx = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    x = np.linspace(0, 1, 101)
    for k, (name, curves) in enumerate(curves_by_model.items()):
        colour = _COLOURS[k % len(_COLOURS)]
        stack = np.array([resample_curve(c) for c in curves])
        q1, med, q3 = np.quantile(stack, [0.25, 0.5, 0.75], axis=0)
        ax.plot(x, med, color=colour, lw=2, label=f"{name} (n={len(curves)})")
        ax.fill_between(x, q1, q3, color=colour, alpha=0.2)
    ax.set_xlabel("normalised trajectory position t/T")
    ax.set_ylabel("L̂ (median, IQR band)")
    ax.set_title("L̂ along the trajectory, by model")
    ax.legend()
    measures = sorted({m for per in stability.values() for m in per})
    width = 0.8 / max(len(stability), 1)
    for k, (name, per) in enumerate(stability.items()):
        for j, m in enumerate(measures):
            if m not in per:
                continue
            scale = max(abs(stability[o][m][0]) for o in stability if m in stability[o]) or 1.0
            med, lo, hi = (v / scale for v in per[m])
            pos = j + (k - (len(stability) - 1) / 2) * width
            bx.bar(pos, med, width, color=_COLOURS[k % len(_COLOURS)], label=name if j == 0 else None)
            if np.isfinite(lo) and np.isfinite(hi):
                bx.errorbar(pos, med, yerr=[[med - lo], [hi - med]], color="black", capsize=3, lw=1)
    bx.set_xticks(range(len(measures)), measures)
    bx.set_ylabel("median / largest median (95% CI)")
    bx.set_title("stability measures")
    bx.legend()
    fig.tight_layout()
    return fig
