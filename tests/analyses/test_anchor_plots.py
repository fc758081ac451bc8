"""Tests for analyses.anchor_plots: each plot writes a PNG; figures carry the data they are given."""

from __future__ import annotations

import numpy as np

from analyses.anchor_plots import (
    chunk_importance_figure,
    kurtosis_figure,
    plot_chunk_importance,
    plot_kurtosis_heatmap,
    plot_suppression_matrix,
    suppression_figure,
)


def test_plots_write_pngs(tmp_path):
    rng = np.random.default_rng(0)
    kurt = rng.normal(size=(4, 4))
    heads = np.array([[1, 2], [3, 0]])
    kl = np.tril(rng.random((6, 6)), -1)
    kl[np.triu_indices(6)] = np.nan
    cats = np.array([0, 1, 0, 2, 0, 2], dtype=np.uint8)
    paths = [
        plot_kurtosis_heatmap(kurt, tmp_path / "k.png", heads=heads),
        plot_suppression_matrix(kl, cats, tmp_path / "s.png"),
        plot_chunk_importance({"dL": rng.normal(size=6), "CI": rng.normal(size=6)}, cats,
                              tmp_path / "c.png"),
    ]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_figures_hold_the_data():
    kurt = np.arange(12.0).reshape(3, 4)
    fig = kurtosis_figure(kurt, np.array([[2, 3]]))
    ax = fig.axes[0]
    np.testing.assert_array_equal(ax.images[0].get_array(), kurt)
    assert len(ax.patches) == 1 and ax.patches[0].get_xy() == (2.5, 1.5)
    kl = np.full((3, 3), np.nan)
    kl[1, 0], kl[2, 0], kl[2, 1] = 1.0, 10.0, 0.0
    img = suppression_figure(kl, [0, 1, 2]).axes[0].images[0].get_array()
    assert img[1, 0] == 0.0 and img[2, 0] == 1.0 and np.ma.is_masked(img[2, 1])
    fig = chunk_importance_figure({"a": np.array([1.0, 2.0, 3.0])}, [0, 1, 2])
    np.testing.assert_array_equal(fig.axes[0].lines[0].get_ydata(), [1.0, 2.0, 3.0])
