"""The PNG plots are written, non-empty and real PNGs."""

from __future__ import annotations

import numpy as np
import pytest

from analyses.lhat_effects import Occurrence
from analyses.plots import plot_category_distributions, plot_lhat_curve

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _check_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 5000


def test_plot_lhat_curve_with_occurrences_and_category_array(tmp_path):
    rng = np.random.default_rng(0)
    lhat = 3.0 * np.exp(np.cumsum(np.concatenate([[0.0], rng.normal(-0.01, 0.05, 300)])))
    occs = [Occurrence(20, 21, 1, 0), Occurrence(150, 152, 1, 1), Occurrence(290, 292, 2, 5)]
    out = plot_lhat_curve(lhat, occs, tmp_path / "sub" / "curve.png", title="trace 0")
    assert out == tmp_path / "sub" / "curve.png"
    _check_png(out)
    cats = np.zeros(300, np.uint8)
    cats[[20, 150, 151]] = 1
    cats[[290, 291]] = 2
    _check_png(plot_lhat_curve(lhat, cats, tmp_path / "curve_cats.png", logy=True,
                               drop_zeros=True))
    _check_png(plot_lhat_curve(lhat, None, tmp_path / "bare.png", ema_alpha=None))


@pytest.mark.parametrize("kind", ["box", "violin"])
def test_plot_category_distributions(tmp_path, kind):
    rng = np.random.default_rng(1)
    values = {
        "reflection": rng.lognormal(0.0, 1.0, 40),
        "delimiter": rng.lognormal(-1.0, 1.0, 15),
        "ordinary": np.concatenate([rng.lognormal(-3.0, 1.0, 500), [0.0, np.nan]]),
        "paragraph_initial": np.array([0.5]),
        "position_matched": np.array([]),
    }
    out = plot_category_distributions(values, tmp_path / f"dist_{kind}.png", "abs_delta",
                                      kind=kind, title="|ΔL̂| per category")
    _check_png(out)


def test_plot_category_distributions_without_data(tmp_path):
    out = plot_category_distributions({"reflection": []}, tmp_path / "empty.png")
    assert out.read_bytes()[:8] == PNG_SIGNATURE
