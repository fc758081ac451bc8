"""Contour plots of the answer-loss landscape with the implicit-update path (docs/methods.md#landscape).

`landscape_figure` draws one plane: filled contours of the trajectory-free answer NLL, the path
(index 0 = no trajectory, index i+1 = after trajectory token i) as a line, and the steps made by
reflection and delimiter tokens (category codes of `analyses.token_sets`) as markers.
No torch: the inputs are plain arrays (from a cache or from the `landscape` command).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from analyses.token_sets import DELIMITER, REFLECTION


def step_markers(step_category: np.ndarray) -> dict[str, np.ndarray]:
    """Path indices of the steps made by reflection / delimiter tokens.

    Args:
        step_category: Category code of each trajectory token [T].

    Returns:
        {"reflection": indices, "delimiter": indices}, indices into a [T+1] path (token i's step
        ends at index i + 1).
    """
    cat = np.asarray(step_category)
    return {"reflection": np.flatnonzero(cat == REFLECTION) + 1,
            "delimiter": np.flatnonzero(cat == DELIMITER) + 1}


def landscape_figure(grid: np.ndarray, xs: np.ndarray, ys: np.ndarray, path: np.ndarray,
                     step_category: np.ndarray | None = None, *, title: str = "",
                     axis_labels: Sequence[str] = ("δ₁", "δ₂"), levels: int = 20) -> Figure:
    """One landscape panel.

    Args:
        grid: NLL [len(ys), len(xs)] (row = y).
        xs, ys: Grid coordinates.
        path: Path coordinates [T+1, 2].
        step_category: Category code of each trajectory token [T] (None: no markers).
        title: Panel title.
        axis_labels: Names of the two directions.
        levels: Contour levels.

    Returns:
        The figure (Agg canvas attached).
    """
    fig = Figure(figsize=(5.6, 4.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    cs = ax.contourf(xs, ys, grid, levels=levels, cmap="viridis")
    ax.contour(xs, ys, grid, levels=levels, colors="white", linewidths=0.3, alpha=0.5)
    fig.colorbar(cs, ax=ax, label="answer NLL without the trajectory (nats/token)")
    path = np.asarray(path, dtype=float)
    ax.plot(path[:, 0], path[:, 1], color="tab:red", lw=1.2, label="implicit-update path")
    ax.scatter(path[:1, 0], path[:1, 1], color="white", edgecolor="black", zorder=5, s=30,
               label="no trajectory")
    ax.scatter(path[-1:, 0], path[-1:, 1], color="tab:red", edgecolor="black", zorder=5, s=40,
               marker="*", label="full trajectory")
    if step_category is not None:
        marks = step_markers(step_category)
        for name, style in (("reflection", dict(color="tab:orange", marker="o")),
                            ("delimiter", dict(color="tab:cyan", marker="s"))):
            idx = marks[name]
            if len(idx):
                ax.scatter(path[idx, 0], path[idx, 1], s=18, zorder=6, edgecolor="black",
                           linewidths=0.4, label=f"{name} steps ({len(idx)})", **style)
    ax.set_xlabel(axis_labels[0])
    ax.set_ylabel(axis_labels[1])
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper right", framealpha=0.7)
    fig.tight_layout()
    return fig


def path_loss_figure(path_nll: np.ndarray, step_category: np.ndarray | None = None, *,
                     title: str = "") -> Figure:
    """The answer NLL along the exact implicit-update path [T+1] against the prefix length, with
    reflection / delimiter steps marked."""
    fig = Figure(figsize=(6.0, 3.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    y = np.asarray(path_nll, dtype=float)
    ax.plot(np.arange(len(y)), y, color="tab:red", lw=1.2, label="exact per-row path")
    if step_category is not None:
        marks = step_markers(step_category)
        for name, style in (("reflection", dict(color="tab:orange", marker="o")),
                            ("delimiter", dict(color="tab:cyan", marker="s"))):
            idx = marks[name]
            if len(idx):
                ax.scatter(idx, y[idx], s=16, zorder=5, edgecolor="black", linewidths=0.4,
                           label=f"{name} steps", **style)
    ax.set_xlabel("trajectory tokens absorbed (prefix t)")
    ax.set_ylabel("answer NLL (nats/token)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_landscape(out: str | Path, *args, dpi: int = 110, figure=None, **kwargs) -> Path:
    """`landscape_figure(*args, **kwargs)` (or `figure(*args, **kwargs)`, e.g. `path_loss_figure`)
    saved as a PNG at `out` (folders created)."""
    fig = (figure or landscape_figure)(*args, **kwargs)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=dpi)
    return out
