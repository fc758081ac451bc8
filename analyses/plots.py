"""PNG plots of L̂ curves and per-category effect distributions (matplotlib, Agg, no pyplot).

* `plot_lhat_curve`: L̂ against the normalised trajectory position, raw and EMA-smoothed as RaML's
  notebook draws it (α = 0.01), with vertical markers at reflection and delimiter occurrences.
* `plot_category_distributions`: box (or violin) plots of a metric such as |ΔL̂| per category, on
  a log scale.

Figures are built with `matplotlib.figure.Figure` and the Agg canvas directly, so no global
pyplot state or backend switch is touched. The only I/O of the `analyses` package: each function
writes one PNG and returns its path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from analyses.lhat_effects import DELIMITER, REFLECTION, Occurrence, ema, phrase_occurrences

__all__ = ["MARKER_COLOURS", "plot_category_distributions", "plot_lhat_curve"]

MARKER_COLOURS = {REFLECTION: "tab:red", DELIMITER: "tab:green"}
"""Marker colour per category code."""

_MARKER_NAMES = {REFLECTION: "reflection", DELIMITER: "delimiter"}
_METRIC_LABELS = {
    "delta": "ΔL̂", "abs_delta": "|ΔL̂|", "rho": "ρ = |ΔL̂| / L̂", "lam": "λ = Δ log L̂",
    "abs_lam": "|λ|",
}


def _save(fig: Figure, path: str | Path, dpi: int) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(out, format="png", dpi=dpi)
    return out


def plot_lhat_curve(
    lhat: np.ndarray | Sequence[float],
    markers: Sequence[Occurrence] | Sequence[tuple[int, int, int, int]] | np.ndarray | None,
    path: str | Path,
    *,
    ema_alpha: float | None = 0.01,
    title: str | None = None,
    logy: bool = False,
    drop_zeros: bool = False,
    dpi: int = 120,
) -> Path:
    """Plot one L̂ curve with reflection/delimiter markers.

    x is the normalised position `t / T` of prefix t (t = 0: no trajectory, 1: full); the raw
    curve is drawn thin and light, the EMA (`s_t = α L̂_t + (1−α) s_{t−1}`, RaML's α = 0.01) bold.
    A marker is drawn at the prefix that first includes an occurrence, `x = (start + 1) / T`:
    reflection in red, delimiter in green.

    Args:
        lhat: float [T+1] L̂ curve.
        markers: Occurrences `(start, end, category, phrase_id)` in trajectory coordinates, or a
            per-trajectory-token category array [T] (runs of reflection/delimiter codes become
            occurrences), or None.
        path: Output PNG path (parent folders are created).
        ema_alpha: EMA factor; None to draw the raw curve only.
        title: Figure title.
        logy: Log-scale y axis (non-positive points are not drawn).
        drop_zeros: Drop points with L̂ = 0 before smoothing, as the RaML notebook does.
        dpi: Resolution.

    Returns:
        The PNG path.
    """
    y = np.asarray(lhat, dtype=np.float64)
    n_tok = max(y.size - 1, 1)
    x = np.arange(y.size) / n_tok
    keep = ~np.isnan(y)
    if drop_zeros:
        keep &= y != 0
    xs, ys = x[keep], y[keep]

    if markers is None:
        occs: list[tuple[int, int, int, int]] = []
    elif isinstance(markers, np.ndarray) and markers.ndim == 1 and markers.size == y.size - 1:
        occs = list(phrase_occurrences(markers))
    else:
        occs = [tuple(int(v) for v in o[:4]) for o in markers]  # type: ignore[misc]

    fig = Figure(figsize=(9, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(xs, ys, color="tab:blue", alpha=0.35, lw=0.8, label="L̂ (raw)")
    if ema_alpha is not None and ys.size:
        ax.plot(xs, ema(ys, ema_alpha), color="navy", lw=2.0, label=f"EMA (α={ema_alpha:g})")
    handles, labels = ax.get_legend_handles_labels()
    for code, colour in MARKER_COLOURS.items():
        pos = np.array([(o[0] + 1) / n_tok for o in occs if o[2] == code], dtype=np.float64)
        if pos.size:
            ax.vlines(pos, 0, 1, transform=ax.get_xaxis_transform(), colors=colour, alpha=0.5,
                      lw=0.8, zorder=0)
            handles.append(Line2D([], [], color=colour, lw=1.5))
            labels.append(f"{_MARKER_NAMES[code]} (n={pos.size})")
    if logy:
        ax.set_yscale("log")
    ax.set_xlim(0, 1)
    ax.set_xlabel("normalised trajectory position t / T")
    ax.set_ylabel("L̂ (answer NLL, nats/token)")
    if title:
        ax.set_title(title)
    ax.legend(handles, labels, loc="upper right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path, dpi)


def plot_category_distributions(
    values_by_category: Mapping[str, np.ndarray | Sequence[float]],
    path: str | Path,
    metric: str = "abs_delta",
    *,
    log: bool = True,
    kind: str = "box",
    title: str | None = None,
    dpi: int = 120,
) -> Path:
    """Distributions of a per-token (or per-phrase) metric per category.

    Args:
        values_by_category: {category or control name: values}, e.g. from
            `analyses.lhat_effects.pooled_values`. NaNs are dropped; on a log scale non-positive
            values are dropped too (the tick labels give the counts drawn).
        path: Output PNG path.
        metric: Metric name, for the axis label.
        log: Log scale (box: log y axis; violin: densities of log10 values).
        kind: `"box"` or `"violin"`.
        title: Figure title.
        dpi: Resolution.

    Returns:
        The PNG path.
    """
    if kind not in ("box", "violin"):
        raise ValueError(f"kind must be 'box' or 'violin', got {kind!r}.")
    names, data = [], []
    for name, vals in values_by_category.items():
        v = np.asarray(vals, dtype=np.float64)
        v = v[~np.isnan(v)]
        if log:
            v = v[v > 0]
        names.append(f"{name}\n(n={v.size})")
        data.append(v)

    label = _METRIC_LABELS.get(metric, metric)
    fig = Figure(figsize=(max(5.0, 1.4 * len(names) + 2), 4.5))
    ax = fig.add_subplot(1, 1, 1)
    present = [i for i, v in enumerate(data) if v.size]
    if not present:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    elif kind == "box":
        ax.boxplot([data[i] for i in present], positions=[i + 1 for i in present], widths=0.6,
                   showfliers=True, flierprops={"markersize": 2, "alpha": 0.4})
        if log:
            ax.set_yscale("log")
        ax.set_ylabel(label)
    else:
        vals = [np.log10(data[i]) if log else data[i] for i in present]
        vio = [i for i, v in zip(present, vals) if np.unique(v).size > 1]
        if vio:
            ax.violinplot([vals[present.index(i)] for i in vio], positions=[i + 1 for i in vio],
                          showmedians=True)
        for i, v in zip(present, vals):
            if i not in vio:
                ax.scatter(np.full(v.size, i + 1), v, s=8)
        ax.set_ylabel(f"log10 {label}" if log else label)
    ax.set_xticks(range(1, len(names) + 1))
    ax.set_xticklabels(names, fontsize=8)
    ax.set_xlim(0.4, len(names) + 0.6)
    ax.grid(alpha=0.3, axis="y")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path, dpi)
