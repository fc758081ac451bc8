"""PNG plots of the sentence-level anchors (`anchors` command; docs/methods.md#receiver-heads).

Matplotlib (Agg, no pyplot), no torch. Each `plot_*` writes one PNG and returns its path; the
`*_figure` functions return the unsaved Figure (testable without writing):

* `plot_kurtosis_heatmap`: mean receiver-head kurtosis per layer × head, the top-k receiver heads
  outlined.
* `plot_suppression_matrix`: one trace's chunk × chunk suppression KL (log10), with the chunk
  categories on both axes.
* `plot_chunk_importance`: chunk measures along one trace (x = chunk index), each chunk's marker
  coloured by its category.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from analyses.token_sets import CATEGORY_NAMES

CATEGORY_COLOURS = {"ordinary": "0.55", "reflection": "tab:red", "delimiter": "tab:blue"}
"""Marker colour of each chunk category (others: black)."""


def _save(fig: Figure, path: str | Path, dpi: int) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(out, format="png", dpi=dpi)
    return out


def _colour(code: int) -> str:
    return CATEGORY_COLOURS.get(CATEGORY_NAMES.get(int(code), ""), "black")


def kurtosis_figure(mean_kurtosis: np.ndarray, heads: np.ndarray | None = None) -> Figure:
    """Heatmap of the mean kurtosis [L, H]; `heads` (int [k, 2] layer, head) outlined."""
    k = np.asarray(mean_kurtosis, dtype=float)
    fig = Figure(figsize=(max(4.0, 0.35 * k.shape[1] + 2), max(3.0, 0.3 * k.shape[0] + 1.5)))
    ax = fig.add_subplot()
    im = ax.imshow(np.ma.masked_invalid(k), aspect="auto", cmap="viridis", origin="lower")
    fig.colorbar(im, ax=ax, label="mean kurtosis of vertical scores")
    for layer, head in (np.asarray(heads).reshape(-1, 2) if heads is not None else []):
        ax.add_patch(Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="red", lw=1.5))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title("receiver heads (outlined: top-k)")
    return fig


def plot_kurtosis_heatmap(mean_kurtosis: np.ndarray, path: str | Path, *,
                          heads: np.ndarray | None = None, dpi: int = 110) -> Path:
    """Write `kurtosis_figure` to `path`."""
    return _save(kurtosis_figure(mean_kurtosis, heads), path, dpi)


def suppression_figure(kl: np.ndarray, categories: Sequence[int] | np.ndarray, *,
                       title: str = "") -> Figure:
    """Heatmap of log10 KL [C, C] (row j: affected chunk, column i: suppressed chunk)."""
    m = np.asarray(kl, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        logm = np.log10(np.where(m > 0, m, np.nan))
    c = m.shape[0]
    fig = Figure(figsize=(5.5, 4.8))
    ax = fig.add_subplot()
    im = ax.imshow(np.ma.masked_invalid(logm), cmap="magma", origin="upper")
    fig.colorbar(im, ax=ax, label="log10 mean KL (nats)")
    cats = np.asarray(categories)
    for i in range(c):
        ax.plot(i, -1.0, "s", color=_colour(cats[i]), ms=4, clip_on=False)
        ax.plot(-1.0, i, "s", color=_colour(cats[i]), ms=4, clip_on=False)
    ax.set_xlim(-1.5, c - 0.5)
    ax.set_ylim(c - 0.5, -1.5)
    ax.set_xlabel("suppressed chunk i")
    ax.set_ylabel("affected chunk j")
    ax.set_title(title or "attention suppression")
    return fig


def plot_suppression_matrix(kl: np.ndarray, categories: Sequence[int] | np.ndarray,
                            path: str | Path, *, title: str = "", dpi: int = 110) -> Path:
    """Write `suppression_figure` to `path`."""
    return _save(suppression_figure(kl, categories, title=title), path, dpi)


def chunk_importance_figure(measures: Mapping[str, np.ndarray], categories: Sequence[int] | np.ndarray,
                            *, title: str = "") -> Figure:
    """One panel per measure (name → [C] values) along the chunks; markers by category."""
    cats = np.asarray(categories)
    names = list(measures)
    fig = Figure(figsize=(7.0, 1.9 * max(1, len(names)) + 0.6))
    axes = fig.subplots(max(1, len(names)), 1, sharex=True, squeeze=False)[:, 0]
    x = np.arange(len(cats))
    for ax, name in zip(axes, names):
        y = np.asarray(measures[name], dtype=float)[: len(cats)]
        ax.plot(x[: len(y)], y, color="0.7", lw=1)
        ax.scatter(x[: len(y)], y, c=[_colour(c) for c in cats[: len(y)]], s=18, zorder=3)
        ax.axhline(0, color="0.85", lw=0.8)
        ax.set_ylabel(name, fontsize=8)
    axes[-1].set_xlabel("chunk")
    handles = [axes[0].scatter([], [], c=col, s=18, label=n) for n, col in CATEGORY_COLOURS.items()]
    axes[0].legend(handles=handles, fontsize=7, loc="best")
    axes[0].set_title(title or "chunk importance along the trace")
    return fig


def plot_chunk_importance(measures: Mapping[str, np.ndarray], categories: Sequence[int] | np.ndarray,
                          path: str | Path, *, title: str = "", dpi: int = 110) -> Path:
    """Write `chunk_importance_figure` to `path`."""
    return _save(chunk_importance_figure(measures, categories, title=title), path, dpi)
