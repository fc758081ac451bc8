"""PNG plots of L̂ curves, per-category effect distributions and implicit-update magnitudes.

Matplotlib (Agg, no pyplot). Plot functions, each writing one PNG and returning its path:

* `plot_lhat_curve`: L̂ against the normalised trajectory position, raw and EMA-smoothed as RaML's
  notebook draws it, with vertical markers at reflection and delimiter occurrences. RaML's
  α = 0.01 suits its traces of thousands of tokens; by default α is chosen for the trace's length
  (`ema_alpha_for`: a time constant of 5% of the trace), so a short trace's bold line falls when
  L̂ does instead of lagging at its start value.
* `plot_category_distributions`: box (or violin) plots of a metric such as |ΔL̂| per category, on
  a log scale.
* `plot_update_heatmap`: a per-category × per-layer heatmap of an implicit-update magnitude (e.g.
  the median Dherin MLP step size σ, `upd_sigma_gate`, or the leave-one-out context-vector norm,
  `upd_loo`), optionally as ratios to a reference row such as "ordinary".
* `plot_step_curve`: an update magnitude along one trace (x = trajectory token index), one or
  more lines (e.g. σ at a few layers), with reflection/delimiter markers.

Pure helpers, used by the plots and testable without drawing:

* `heatmap_matrix`: the (row names, matrix) a heatmap draws (row order, ratios, NaN = missing).
* `marker_occurrences`: markers (Occurrences or a per-token category array) as Occurrences.
* `lhat_curve_figure`, `category_distributions_figure`, `update_heatmap_figure`,
  `step_curve_figure`: the unsaved Figures of the four plots (the CLI saves them through
  `probes.safe_output.save_figure`).

Figures are built with `matplotlib.figure.Figure` and the Agg canvas directly, so no global
pyplot state or backend switch is touched. The only I/O of the `analyses` package is the PNG
writing of the `plot_*` functions (for library use).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import CenteredNorm, LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, NullFormatter

from analyses.lhat_effects import ema
from analyses.token_sets import DELIMITER, REFLECTION, Occurrence, phrase_occurrences

__all__ = [
    "HEATMAP_ROW_ORDER",
    "LAYER_COLOURS",
    "MARKER_COLOURS",
    "category_distributions_figure",
    "ema_alpha_for",
    "heatmap_matrix",
    "lhat_curve_figure",
    "marker_occurrences",
    "plot_category_distributions",
    "plot_lhat_curve",
    "plot_step_curve",
    "plot_update_heatmap",
    "step_curve_figure",
    "update_heatmap_figure",
]

MARKER_COLOURS = {REFLECTION: "tab:red", DELIMITER: "tab:green"}

LAYER_COLOURS: tuple[str, ...] = ("tab:blue", "tab:orange", "tab:purple", "tab:brown", "tab:pink",
                                  "tab:gray", "tab:cyan", "navy", "goldenrod", "black")
"""Line colours of per-layer curves (`step_curve_figure`): never the markers' red (reflection) or
green (delimiter), nor near them; beyond 10 layers the colours repeat dashed, then dotted."""

EMA_SPAN = 0.05
"""The EMA's time constant 1/α as a share of the trace (`ema_alpha_for`)."""
RAML_ALPHA = 0.01
"""RaML's EMA factor (its traces: thousands of tokens); the smallest α `ema_alpha_for` gives."""


def ema_alpha_for(n_tokens: int) -> float:
    """The EMA factor of an L̂ curve of `n_tokens` tokens: 1 / (`EMA_SPAN` · n), at least RaML's
    0.01 and at most 1 (a 200-token trace: 0.1; 2000 tokens and more: 0.01)."""
    return float(min(1.0, max(RAML_ALPHA, 1.0 / (EMA_SPAN * max(n_tokens, 1)))))
"""Marker colour per category code."""

HEATMAP_ROW_ORDER = ("reflection", "delimiter", "ordinary")
"""Rows a heatmap draws first (those present), before the other rows in their given order."""

_MARKER_NAMES = {REFLECTION: "reflection", DELIMITER: "delimiter"}
_MISSING_COLOUR = "0.85"
"""Cell colour of missing (NaN) heatmap values."""
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


def marker_occurrences(
    markers: Sequence[Occurrence] | Sequence[Sequence[int]] | np.ndarray | None,
    n_tokens: int,
) -> list[Occurrence]:
    """Markers as a list of Occurrences (trajectory token coordinates).

    Args:
        markers: None (no markers); a 1-D per-trajectory-token category array [n_tokens] (runs of
            reflection/delimiter codes become occurrences, `phrase_occurrences`); or occurrences
            `(start, end, category[, phrase_id])` (Occurrences, tuples, or an int array [k, 3|4]).
        n_tokens: Number of trajectory tokens T (the length a category array must have).

    Returns:
        The occurrences (phrase_id -1 where not given).

    Raises:
        ValueError: A category array whose length is not `n_tokens`, or an occurrence with fewer
            than 3 fields.
    """
    if markers is None or len(markers) == 0:
        return []
    if (isinstance(markers, np.ndarray) and markers.ndim == 1) or (
            not isinstance(markers, np.ndarray) and np.isscalar(markers[0])):
        cats = np.asarray(markers)
        if cats.size != n_tokens:
            raise ValueError(
                f"A category-array marker needs one code per trajectory token ({n_tokens}), "
                f"got {cats.size}.")
        return phrase_occurrences(cats)
    out = []
    for o in markers:
        vals = [int(v) for v in o[:4]]
        if len(vals) < 3:
            raise ValueError(f"An occurrence needs (start, end, category[, phrase_id]), got {o!r}.")
        out.append(Occurrence(*vals, *([-1] if len(vals) == 3 else [])))
    return out


def _draw_markers(ax: Axes, occs: Sequence[Occurrence], scale: float, shift: float) -> tuple[
        list[Line2D], list[str]]:
    """Vertical lines at `(start + shift) * scale` per marked category; legend handles/labels."""
    handles: list[Line2D] = []
    labels: list[str] = []
    for code, colour in MARKER_COLOURS.items():
        pos = np.array([(o[0] + shift) * scale for o in occs if o[2] == code], dtype=np.float64)
        if pos.size:
            ax.vlines(pos, 0, 1, transform=ax.get_xaxis_transform(), colors=colour, alpha=0.5,
                      lw=0.8, zorder=0)
            handles.append(Line2D([], [], color=colour, lw=1.5))
            labels.append(f"{_MARKER_NAMES[code]} (n={pos.size})")
    return handles, labels


def plot_lhat_curve(
    lhat: np.ndarray | Sequence[float],
    markers: Sequence[Occurrence] | Sequence[tuple[int, int, int, int]] | np.ndarray | None,
    path: str | Path,
    *,
    ema_alpha: float | str | None = "auto",
    title: str | None = None,
    logy: bool = False,
    drop_zeros: bool = False,
    dpi: int = 120,
) -> Path:
    """Plot one L̂ curve with reflection/delimiter markers.

    x is the normalised position `t / T` of prefix t (t = 0: no trajectory, 1: full); the raw
    curve is drawn thin on top of the bold EMA (`s_t = α L̂_t + (1−α) s_{t−1}`; α for the trace's
    length, `ema_alpha_for`, unless given; RaML's notebook uses 0.01).
    A marker is drawn at the prefix that first includes an occurrence, `x = (start + 1) / T`:
    reflection in red, delimiter in green.

    Args:
        lhat: float [T+1] L̂ curve.
        markers: Occurrences `(start, end, category, phrase_id)` in trajectory coordinates, or a
            per-trajectory-token category array [T] (runs of reflection/delimiter codes become
            occurrences), or None.
        path: Output PNG path (parent folders are created).
        ema_alpha: EMA factor; "auto" (`ema_alpha_for` the trace's length); None to draw the
            raw curve only.
        title: Figure title.
        logy: Log-scale y axis (non-positive points are not drawn).
        drop_zeros: Drop points with L̂ = 0 before smoothing, as the RaML notebook does.
        dpi: Resolution.

    Returns:
        The PNG path.
    """
    fig = lhat_curve_figure(lhat, markers, ema_alpha=ema_alpha, title=title, logy=logy,
                            drop_zeros=drop_zeros)
    return _save(fig, path, dpi)


def lhat_curve_figure(
    lhat: np.ndarray | Sequence[float],
    markers: Sequence[Occurrence] | Sequence[tuple[int, int, int, int]] | np.ndarray | None,
    *,
    ema_alpha: float | str | None = "auto",
    title: str | None = None,
    logy: bool = False,
    drop_zeros: bool = False,
) -> Figure:
    """The Figure of `plot_lhat_curve` (same arguments), not saved."""
    y = np.asarray(lhat, dtype=np.float64)
    n_tok = max(y.size - 1, 1)
    x = np.arange(y.size) / n_tok
    keep = ~np.isnan(y)
    if drop_zeros:
        keep &= y != 0
    xs, ys = x[keep], y[keep]

    occs = marker_occurrences(markers, y.size - 1)

    fig = Figure(figsize=(9, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    alpha = ema_alpha_for(ys.size - 1) if ema_alpha == "auto" else ema_alpha
    if alpha is not None and ys.size:
        ax.plot(xs, ema(ys, float(alpha)), color="navy", lw=2.0, alpha=0.8, zorder=2,
                label=f"EMA (α={float(alpha):.2g})")
    ax.plot(xs, ys, color="tab:blue", alpha=0.7, lw=0.8, zorder=3, label="L̂ (raw)")
    handles, labels = ax.get_legend_handles_labels()
    mh, ml = _draw_markers(ax, occs, 1.0 / n_tok, 1.0)
    handles += mh
    labels += ml
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
    return fig


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
    fig = category_distributions_figure(values_by_category, metric, log=log, kind=kind,
                                        title=title)
    return _save(fig, path, dpi)


def category_distributions_figure(
    values_by_category: Mapping[str, np.ndarray | Sequence[float]],
    metric: str = "abs_delta",
    *,
    log: bool = True,
    kind: str = "box",
    title: str | None = None,
) -> Figure:
    """The Figure of `plot_category_distributions` (same arguments), not saved.

    Raises:
        ValueError: An unknown `kind`.
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
    return fig


# --------------------------------------------------------------------------------------------------
# Implicit-update magnitudes: per-category × per-layer heatmap, per-token step curve


def heatmap_matrix(
    values: Mapping[str, np.ndarray | Sequence[float]],
    row_order: Sequence[str] | None = None,
    ratio_to: str | None = None,
) -> tuple[list[str], np.ndarray]:
    """The rows and matrix a per-category × per-layer heatmap draws.

    Args:
        values: {row (category) name: float [n_layers]}; NaN = missing.
        row_order: The rows to draw, in order (a subset is allowed). None: the names of
            `HEATMAP_ROW_ORDER` that are present, then the other rows in their given order.
        ratio_to: A row name (of `values`, drawn or not) to divide every row by, layer by layer;
            None for the values themselves.

    Returns:
        `(row_names, matrix)`: float64 [n_rows, n_layers]. Non-finite entries (NaN, ±inf, and
        ratios whose reference is 0 or missing) are NaN. With `ratio_to`, the reference row is 1
        wherever its value is finite and non-zero.

    Raises:
        ValueError: No rows, rows that are not 1-D or have no layers, rows of different lengths,
            unknown or repeated names in `row_order`, or an unknown `ratio_to` row.
    """
    if len(values) == 0:
        raise ValueError("A heatmap needs at least one row; got no values.")
    rows = {str(k): np.asarray(v, dtype=np.float64) for k, v in values.items()}
    bad = {k: v.shape for k, v in rows.items() if v.ndim != 1 or v.size == 0}
    if bad:
        raise ValueError(f"Every heatmap row must be a non-empty 1-D array [n_layers]; got {bad}.")
    lengths = {k: v.size for k, v in rows.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"All heatmap rows must have the same number of layers; got {lengths}.")
    if row_order is None:
        names = [n for n in HEATMAP_ROW_ORDER if n in rows]
        names += [n for n in rows if n not in names]
    else:
        names = [str(n) for n in row_order]
        unknown = [n for n in names if n not in rows]
        if unknown:
            raise ValueError(f"row_order names {unknown} are not rows of values ({list(rows)}).")
        if len(set(names)) != len(names):
            raise ValueError(f"row_order repeats rows: {names}.")
        if not names:
            raise ValueError("row_order is empty; a heatmap needs at least one row.")
    mat = np.stack([rows[n] for n in names])
    if ratio_to is not None:
        if ratio_to not in rows:
            raise ValueError(f"ratio_to row {ratio_to!r} is not a row of values ({list(rows)}).")
        with np.errstate(divide="ignore", invalid="ignore"):
            mat = mat / rows[ratio_to][None, :]
    mat[~np.isfinite(mat)] = np.nan
    return names, mat


def _widened(lo: float, hi: float, log: bool) -> tuple[float, float]:
    """Colour limits that are not equal (a constant matrix still gets a usable colour bar)."""
    if lo < hi:
        return lo, hi
    if log:
        return lo / 2.0, hi * 2.0
    d = abs(lo) * 0.1 or 1.0
    return lo - d, hi + d


def _heatmap_norm(mat: np.ndarray, log: bool, ratio: bool) -> Normalize:
    """LogNorm when `log` and every finite value is > 0, else linear; ratios are centred at 1."""
    fin = mat[np.isfinite(mat)]
    if fin.size == 0:
        return Normalize(0.0, 1.0)
    use_log = log and bool(np.all(fin > 0))
    if ratio:
        if use_log:
            r = float(np.max(np.abs(np.log10(fin)))) or float(np.log10(2.0))
            return LogNorm(10.0 ** -r, 10.0 ** r)
        return CenteredNorm(vcenter=1.0, halfrange=float(np.max(np.abs(fin - 1.0))) or 1.0)
    lo, hi = _widened(float(fin.min()), float(fin.max()), use_log)
    return LogNorm(lo, hi) if use_log else Normalize(lo, hi)


def update_heatmap_figure(
    values: Mapping[str, np.ndarray | Sequence[float]],
    *,
    metric: str,
    title: str | None = None,
    row_order: Sequence[str] | None = None,
    ratio_to: str | None = None,
    log: bool = True,
    annotate: bool = True,
    figsize: tuple[float, float] | None = None,
    layer_ids: Sequence[int] | None = None,
) -> Figure:
    """The Figure of `plot_update_heatmap` (same arguments), not saved."""
    names, mat = heatmap_matrix(values, row_order, ratio_to)
    if layer_ids is not None and len(layer_ids) != mat.shape[1]:
        raise ValueError(f"layer_ids has {len(layer_ids)} entries for {mat.shape[1]} layer columns.")
    n_rows, n_layers = mat.shape
    ratio = ratio_to is not None
    norm = _heatmap_norm(mat, log, ratio)
    cmap = colormaps["RdBu_r" if ratio else "viridis"].with_extremes(bad=_MISSING_COLOUR)
    if figsize is None:
        figsize = (max(6.0, 0.55 * n_layers + 3.0), max(2.5, 0.45 * n_rows + 1.6))
    fig = Figure(figsize=figsize)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(np.ma.masked_invalid(mat), cmap=cmap, norm=norm, aspect="auto",
                   interpolation="nearest")
    small = n_layers > 20
    ax.set_xticks(np.arange(n_layers))
    ax.set_xticklabels([str(i) for i in (range(n_layers) if layer_ids is None else layer_ids)],
                       fontsize=6 if small else 8)
    ax.set_yticks(np.arange(n_rows))
    ax.set_yticklabels(names, fontsize=8)
    ax.set_xlabel("layer")
    if annotate:
        for (i, j), v in np.ndenumerate(mat):
            if np.isnan(v):
                continue
            r, g, b, _ = cmap(norm(v))
            ax.text(j, i, f"{v:.3g}", ha="center", va="center", fontsize=6 if small else 7,
                    color="white" if 0.299 * r + 0.587 * g + 0.114 * b < 0.5 else "black")
    label = _METRIC_LABELS.get(metric, metric)
    cbar = fig.colorbar(im, ax=ax, label=f"{label} / {ratio_to}" if ratio else label,
                        fraction=min(0.15, 0.6 / figsize[0]), pad=min(0.05, 0.25 / figsize[0]))
    if ratio and isinstance(norm, LogNorm):
        k = int(np.floor(np.log2(norm.vmax) + 1e-9))
        if 1 <= k <= 6:
            cbar.set_ticks(2.0 ** np.arange(-k, k + 1))
            cbar.ax.yaxis.set_minor_formatter(NullFormatter())
        else:
            cbar.ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:.2g}"))
        cbar.ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_update_heatmap(
    values: Mapping[str, np.ndarray | Sequence[float]],
    path: str | Path,
    *,
    metric: str,
    title: str | None = None,
    row_order: Sequence[str] | None = None,
    ratio_to: str | None = None,
    log: bool = True,
    annotate: bool = True,
    dpi: int = 120,
    figsize: tuple[float, float] | None = None,
    layer_ids: Sequence[int] | None = None,
) -> Path:
    """Heatmap of an update magnitude per category (rows) and layer (columns).

    Colour is the magnitude: a log colour scale when `log` and every finite value is > 0, else
    linear (viridis). With `ratio_to` every row is divided by that row, layer by layer, and drawn
    with a diverging colormap (RdBu_r) centred at 1 (log-symmetric, 1/r..r, on a log scale).
    Missing (NaN) cells are light grey and not annotated.

    Args:
        values: {category name: float [n_layers]}, e.g. the median over traces of each trace's
            median `upd_sigma_gate` of that category at each layer; NaN = missing.
        path: Output PNG path (parent folders are created).
        metric: Metric name, for the colour-bar label.
        title: Figure title.
        row_order: Rows to draw, in order; None: reflection, delimiter, ordinary (those present),
            then the others as given (see `heatmap_matrix`).
        ratio_to: Row to divide every row by (e.g. "ordinary"), or None.
        log: Log colour scale (falls back to linear when some finite value is <= 0).
        annotate: Write each value (3 significant digits) in its cell.
        dpi: Resolution.
        figsize: Figure size in inches; None: grows with the numbers of layers and rows.
        layer_ids: The model layer of each column (tick labels); None: 0..n_layers−1.

    Returns:
        The PNG path.

    Raises:
        ValueError: As `heatmap_matrix` (no rows, ragged rows, unknown row names), or
            `layer_ids` of the wrong length.
    """
    fig = update_heatmap_figure(values, metric=metric, title=title, row_order=row_order,
                                ratio_to=ratio_to, log=log, annotate=annotate, figsize=figsize,
                                layer_ids=layer_ids)
    return _save(fig, path, dpi)


def step_curve_figure(
    values: np.ndarray | Sequence[float] | Sequence[Sequence[float]],
    markers: Sequence[Occurrence] | Sequence[Sequence[int]] | np.ndarray | None,
    *,
    layer_labels: Sequence[int | str] | None = None,
    metric: str = "σ",
    title: str | None = None,
    logy: bool = True,
    figsize: tuple[float, float] = (9.0, 4.5),
) -> Figure:
    """The Figure of `plot_step_curve` (same arguments), not saved."""
    y = np.asarray(values, dtype=np.float64)
    if y.ndim == 1:
        y = y[None, :]
    if y.ndim != 2 or y.shape[1] == 0:
        raise ValueError(f"values must be float [T] or [n_lines, T] with T >= 1, got shape "
                         f"{np.shape(values)}.")
    n_lines, n_tok = y.shape
    if layer_labels is None:
        labels = [metric] if n_lines == 1 else [f"{metric} [{i}]" for i in range(n_lines)]
    else:
        if len(layer_labels) != n_lines:
            raise ValueError(f"layer_labels has {len(layer_labels)} labels for {n_lines} lines.")
        labels = [f"layer {v}" if isinstance(v, (int, np.integer)) else str(v)
                  for v in layer_labels]
    occs = marker_occurrences(markers, n_tok)
    y = np.where(np.isfinite(y), y, np.nan)
    if logy:
        with np.errstate(invalid="ignore"):
            y = np.where(y > 0, y, np.nan)
        logy = bool(np.any(np.isfinite(y)))

    fig = Figure(figsize=figsize)
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(n_tok)
    for k, (row, label) in enumerate(zip(y, labels)):
        ax.plot(x, row, lw=0.9, label=label, marker="." if n_tok == 1 else None,
                color=LAYER_COLOURS[k % len(LAYER_COLOURS)],
                linestyle=("-", "--", ":")[(k // len(LAYER_COLOURS)) % 3])
    handles, leg_labels = ax.get_legend_handles_labels()
    mh, ml = _draw_markers(ax, occs, 1.0, 0.0)
    handles += mh
    leg_labels += ml
    if logy:
        ax.set_yscale("log")
    ax.set_xlim(-0.5, n_tok - 0.5)
    ax.set_xlabel("trajectory token index")
    ax.set_ylabel(_METRIC_LABELS.get(metric, metric))
    if title:
        ax.set_title(title)
    ax.legend(handles, leg_labels, loc="upper right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_step_curve(
    values: np.ndarray | Sequence[float] | Sequence[Sequence[float]],
    markers: Sequence[Occurrence] | Sequence[Sequence[int]] | np.ndarray | None,
    path: str | Path,
    *,
    layer_labels: Sequence[int | str] | None = None,
    metric: str = "σ",
    title: str | None = None,
    logy: bool = True,
    dpi: int = 120,
    figsize: tuple[float, float] = (9.0, 4.5),
) -> Path:
    """An update magnitude (e.g. the MLP step size σ) along one trace, with phrase markers.

    x is the trajectory token index 0..T−1, one line per row of `values`; a vertical line marks
    each occurrence at its start token: reflection in red, delimiter in green (legend with counts).
    NaN values leave gaps; on a log y axis non-positive values are not drawn (and the axis is
    linear if nothing positive is left).

    Args:
        values: float [T] or [n_lines, T], e.g. `upd_sigma_gate[layers]` of one trace, or its sum
            over layers.
        markers: As in `plot_lhat_curve` (see `marker_occurrences`): Occurrences, a per-token
            category array [T], or None.
        path: Output PNG path (parent folders are created).
        layer_labels: One legend label per line; ints are shown as "layer k". None: `metric`
            (one line) or `metric [i]`.
        metric: Metric name, for the y label.
        title: Figure title.
        logy: Log-scale y axis.
        dpi: Resolution.
        figsize: Figure size in inches.

    Returns:
        The PNG path.

    Raises:
        ValueError: values not [T] / [n_lines, T], a layer_labels length that is not n_lines, or
            a category array whose length is not T.
    """
    fig = step_curve_figure(values, markers, layer_labels=layer_labels, metric=metric,
                            title=title, logy=logy, figsize=figsize)
    return _save(fig, path, dpi)
