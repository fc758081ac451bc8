"""The PNG plots are written as real PNGs of the expected size, and draw the expected data."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.colors import CenteredNorm, LogNorm

from analyses.plots import (
    MARKER_COLOURS,
    heatmap_matrix,
    marker_occurrences,
    plot_category_distributions,
    plot_lhat_curve,
    plot_step_curve,
    plot_update_heatmap,
    step_curve_figure,
    update_heatmap_figure,
)
from analyses.token_sets import Occurrence

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


# --------------------------------------------------------------------------------------------------
# Implicit-update magnitudes: heatmap and step curve


def _image(path):
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    return imread(path)


def _assert_not_uniform(img):
    rgb = img[..., :3].reshape(-1, 3)
    assert np.unique(rgb, axis=0).shape[0] > 10
    assert rgb.std() > 0.05


def _grey_pixels(img):
    """Pixels of the missing-cell colour (0.85 grey = 217/255)."""
    return int(np.sum(np.all(np.abs(img[..., :3] - 217 / 255) < 1 / 255, axis=-1)))


def _update_values():
    return {
        "ordinary": np.array([0.01, 0.02, 0.04, 0.0], np.float32),
        "shuffled": np.array([0.01, 0.01, 0.01, 0.01], np.float32),
        "reflection": np.array([0.03, np.nan, 0.02, 0.05], np.float32),
        "delimiter": np.array([0.02, 0.04, np.inf, 0.01], np.float32),
    }


def test_heatmap_matrix_default_order_and_nan():
    names, mat = heatmap_matrix(_update_values())
    assert names == ["reflection", "delimiter", "ordinary", "shuffled"]
    assert mat.shape == (4, 4) and mat.dtype == np.float64
    np.testing.assert_allclose(mat[0], [0.03, np.nan, 0.02, 0.05], rtol=1e-6)
    np.testing.assert_allclose(mat[1], [0.02, 0.04, np.nan, 0.01], rtol=1e-6)  # inf -> missing
    np.testing.assert_allclose(mat[3], [0.01] * 4, rtol=1e-6)
    # Others keep their given order; the preferred names that are absent are skipped.
    names, _ = heatmap_matrix({"b": [1.0], "ordinary": [2.0], "a": [3.0]})
    assert names == ["ordinary", "b", "a"]


def test_heatmap_matrix_explicit_row_order_selects_rows():
    names, mat = heatmap_matrix(_update_values(), row_order=["shuffled", "ordinary"])
    assert names == ["shuffled", "ordinary"]
    np.testing.assert_allclose(mat[1], [0.01, 0.02, 0.04, 0.0], rtol=1e-6)


def test_heatmap_matrix_ratio_to_reference_row():
    vals = _update_values()
    names, mat = heatmap_matrix(vals, ratio_to="ordinary")
    ref = mat[names.index("ordinary")]
    # 1 where the reference is finite and non-zero; its 0 at layer 3 makes every ratio missing.
    np.testing.assert_array_equal(ref, [1.0, 1.0, 1.0, np.nan])
    assert np.all(np.isnan(mat[:, 3]))
    np.testing.assert_allclose(mat[names.index("reflection")], [3.0, np.nan, 0.5, np.nan],
                               rtol=1e-6)
    np.testing.assert_allclose(mat[names.index("delimiter")], [2.0, 2.0, np.nan, np.nan],
                               rtol=1e-6)
    # The reference row need not be drawn.
    names, mat = heatmap_matrix(vals, row_order=["shuffled"], ratio_to="reflection")
    np.testing.assert_allclose(mat, [[1 / 3, np.nan, 0.5, 0.2]], rtol=1e-6)


@pytest.mark.parametrize(
    ("values", "kwargs", "message"),
    [
        ({}, {}, "at least one row"),
        ({"a": [1.0, 2.0], "b": [1.0]}, {}, "same number of layers"),
        ({"a": [[1.0, 2.0]]}, {}, "non-empty 1-D"),
        ({"a": []}, {}, "non-empty 1-D"),
        ({"a": [1.0]}, {"ratio_to": "ordinary"}, "ratio_to row 'ordinary'"),
        ({"a": [1.0]}, {"row_order": ["a", "zz"]}, r"row_order names \['zz'\]"),
        ({"a": [1.0]}, {"row_order": ["a", "a"]}, "repeats"),
        ({"a": [1.0]}, {"row_order": []}, "row_order is empty"),
    ],
)
def test_heatmap_matrix_errors(values, kwargs, message):
    with pytest.raises(ValueError, match=message):
        heatmap_matrix(values, **kwargs)


def test_plot_update_heatmap_errors_by_message(tmp_path):
    with pytest.raises(ValueError, match="same number of layers"):
        plot_update_heatmap({"a": [1.0, 2.0], "b": [1.0]}, tmp_path / "x.png", metric="σ")
    with pytest.raises(ValueError, match="at least one row"):
        plot_update_heatmap({}, tmp_path / "x.png", metric="σ")
    with pytest.raises(ValueError, match="ratio_to row 'ordinary'"):
        plot_update_heatmap({"a": [1.0]}, tmp_path / "x.png", metric="σ", ratio_to="ordinary")
    assert not (tmp_path / "x.png").exists()


def test_update_heatmap_figure_draws_the_matrix():
    vals = {k: v for k, v in _update_values().items() if k != "ordinary"}  # all finite > 0
    names, mat = heatmap_matrix(vals)
    fig = update_heatmap_figure(vals, metric="upd_sigma_gate", title="σ")
    ax = fig.axes[0]
    arr = ax.images[0].get_array()
    np.testing.assert_allclose(arr.filled(np.nan), mat)
    np.testing.assert_array_equal(np.ma.getmaskarray(arr), np.isnan(mat))
    norm = ax.images[0].norm
    assert isinstance(norm, LogNorm)
    assert norm.vmin == pytest.approx(np.nanmin(mat)) and norm.vmax == pytest.approx(np.nanmax(mat))
    assert [t.get_text() for t in ax.get_yticklabels()] == names
    np.testing.assert_array_equal(ax.get_xticks(), np.arange(4))
    assert ax.get_xlabel() == "layer"
    assert fig.axes[1].get_ylabel() == "upd_sigma_gate"  # colour bar
    texts = sorted(t.get_text() for t in ax.texts)
    assert texts == sorted(f"{v:.3g}" for v in mat[~np.isnan(mat)])
    assert "0.03" in texts and "0.01" in texts
    assert len(update_heatmap_figure(vals, metric="σ", annotate=False).axes[0].texts) == 0


def test_update_heatmap_figure_norms():
    vals = _update_values()  # "ordinary" has a 0: linear fallback
    norm = update_heatmap_figure(vals, metric="σ").axes[0].images[0].norm
    assert not isinstance(norm, LogNorm)
    assert (norm.vmin, norm.vmax) == pytest.approx((0.0, 0.05))
    norm = update_heatmap_figure(vals, metric="σ", log=False, row_order=["shuffled"]
                                 ).axes[0].images[0].norm
    assert not isinstance(norm, LogNorm)
    assert norm.vmin < 0.01 < norm.vmax  # a constant matrix still gets a colour range
    # Ratios: diverging, centred at 1 (log-symmetric on a log scale).
    fig = update_heatmap_figure(vals, metric="σ", ratio_to="ordinary")
    norm = fig.axes[0].images[0].norm
    assert isinstance(norm, LogNorm)
    assert norm.vmin * norm.vmax == pytest.approx(1.0)
    assert norm.vmax == pytest.approx(4.0)  # shuffled / ordinary = 1/4 at layer 2
    assert fig.axes[1].get_ylabel() == "σ / ordinary"
    assert fig.axes[0].images[0].get_cmap().name.startswith("RdBu_r")
    lin = {"a": [1.0, -1.0], "b": [1.0, 2.0]}
    norm = update_heatmap_figure(lin, metric="σ", ratio_to="b").axes[0].images[0].norm
    assert isinstance(norm, CenteredNorm)
    assert norm.vcenter == 1.0 and norm.halfrange == pytest.approx(1.5)  # -0.5 is 1.5 below 1


def test_plot_update_heatmap_png(tmp_path):
    vals = _update_values()
    out = plot_update_heatmap(vals, tmp_path / "sub" / "hm.png", metric="upd_sigma_gate",
                              title="σ", dpi=100, figsize=(6, 3))
    assert out == tmp_path / "sub" / "hm.png"
    img = _image(out)
    assert img.shape == (300, 600, 4)
    _assert_not_uniform(img)
    # Missing cells are drawn light grey.
    full = {k: np.where(np.isfinite(v), v, 0.02) for k, v in vals.items()}
    img_full = _image(plot_update_heatmap(full, tmp_path / "full.png", metric="σ", dpi=100,
                                          figsize=(6, 3), annotate=False))
    assert _grey_pixels(img) > _grey_pixels(img_full) + 500
    img_ratio = _image(plot_update_heatmap(vals, tmp_path / "ratio.png", metric="σ",
                                           ratio_to="ordinary", dpi=100, figsize=(6, 3)))
    assert img_ratio.shape == (300, 600, 4)
    _assert_not_uniform(img_ratio)
    # Default size grows with the number of layers.
    few = _image(plot_update_heatmap({"a": [1.0, 2.0]}, tmp_path / "few.png", metric="σ", dpi=50))
    many = _image(plot_update_heatmap({"a": np.arange(1.0, 41.0)}, tmp_path / "many.png",
                                      metric="σ", dpi=50))
    assert many.shape[1] > few.shape[1] and many.shape[0] == few.shape[0]


def test_marker_occurrences_category_array_equals_occurrences():
    cats = np.zeros(50, np.uint8)
    cats[[3, 4, 20]] = 1
    cats[[30]] = 2
    occs = [Occurrence(3, 5, 1, -1), Occurrence(20, 21, 1, -1), Occurrence(30, 31, 2, -1)]
    assert marker_occurrences(cats, 50) == occs
    assert marker_occurrences(list(cats), 50) == occs
    assert marker_occurrences(occs, 50) == occs
    assert marker_occurrences([(3, 5, 1), (30, 31, 2, 7)], 50) == [
        Occurrence(3, 5, 1, -1), Occurrence(30, 31, 2, 7)]
    assert marker_occurrences(np.array([[3, 5, 1, 0]]), 50) == [Occurrence(3, 5, 1, 0)]
    assert marker_occurrences(None, 50) == [] and marker_occurrences([], 50) == []
    with pytest.raises(ValueError, match=r"one code per trajectory token \(49\), got 50"):
        marker_occurrences(cats, 49)
    with pytest.raises(ValueError, match="needs \\(start, end, category"):
        marker_occurrences([(3, 5)], 50)


def _marker_lines(fig):
    """{colour: sorted x positions} of the vertical marker lines of a figure's axes."""
    out = {}
    for coll in fig.axes[0].collections:
        xs = sorted(float(seg[0][0]) for seg in coll.get_segments())
        out[tuple(np.round(coll.get_colors()[0][:3], 3))] = xs
    return out


def test_step_curve_markers_from_category_array_and_occurrences(tmp_path):
    from matplotlib.colors import to_rgb

    rng = np.random.default_rng(2)
    sigma = rng.lognormal(-3.0, 0.5, (2, 200))
    cats = np.zeros(200, np.uint8)
    cats[[10, 11, 150]] = 1
    cats[[90]] = 2
    occs = [Occurrence(10, 12, 1, 4), Occurrence(150, 151, 1, 4), Occurrence(90, 91, 2, 0)]
    lines = _marker_lines(step_curve_figure(sigma, cats, layer_labels=[4, 12]))
    assert lines == _marker_lines(step_curve_figure(sigma, occs, layer_labels=[4, 12]))
    red, green = (tuple(np.round(to_rgb(MARKER_COLOURS[c]), 3)) for c in (1, 2))
    assert lines == {red: [10.0, 150.0], green: [90.0]}
    fig = step_curve_figure(sigma, cats, layer_labels=[4, "sum"])
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend == ["layer 4", "sum", "reflection (n=2)", "delimiter (n=1)"]
    # The PNGs are identical pixel for pixel.
    a = _image(plot_step_curve(sigma, cats, tmp_path / "cats.png", layer_labels=[4, 12]))
    b = _image(plot_step_curve(sigma, occs, tmp_path / "occs.png", layer_labels=[4, 12]))
    np.testing.assert_array_equal(a, b)


def test_step_curve_data_log_and_linear():
    vals = np.array([0.1, 0.0, np.nan, -0.2, 0.3], np.float32)
    ax = step_curve_figure(vals, None).axes[0]
    assert ax.get_yscale() == "log"
    (line,) = ax.get_lines()
    np.testing.assert_array_equal(line.get_xdata(), np.arange(5))
    np.testing.assert_allclose(line.get_ydata(), [0.1, np.nan, np.nan, np.nan, 0.3], rtol=1e-6)
    assert line.get_label() == "σ"
    assert ax.get_xlabel() == "trajectory token index"
    ax = step_curve_figure(vals, None, logy=False, metric="LOO").axes[0]
    assert ax.get_yscale() == "linear" and ax.get_ylabel() == "LOO"
    np.testing.assert_allclose(ax.get_lines()[0].get_ydata(), [0.1, 0.0, np.nan, -0.2, 0.3],
                               rtol=1e-6)
    # Nothing positive: a linear axis rather than an empty log one.
    assert step_curve_figure([0.0, -1.0], None).axes[0].get_yscale() == "linear"
    labels = [ln.get_label() for ln in step_curve_figure(np.ones((3, 4)), None).axes[0].get_lines()]
    assert labels == ["σ [0]", "σ [1]", "σ [2]"]


def test_step_curve_errors():
    with pytest.raises(ValueError, match="2 labels for 3 lines"):
        step_curve_figure(np.ones((3, 10)), None, layer_labels=[1, 2])
    with pytest.raises(ValueError, match="one code per trajectory token"):
        step_curve_figure(np.ones(10), np.zeros(9, np.uint8))
    with pytest.raises(ValueError, match=r"float \[T\] or \[n_lines, T\]"):
        step_curve_figure(np.ones((2, 2, 2)), None)


def test_plot_step_curve_png(tmp_path):
    rng = np.random.default_rng(3)
    sigma = rng.lognormal(-3.0, 0.5, 300)
    sigma[50:60] = np.nan
    out = plot_step_curve(sigma, [Occurrence(20, 21, 1, 0)], tmp_path / "sub" / "step.png",
                          title="trace 0", dpi=100)
    assert out == tmp_path / "sub" / "step.png"
    img = _image(out)
    assert img.shape == (450, 900, 4)
    _assert_not_uniform(img)
    img = _image(plot_step_curve(sigma, None, tmp_path / "small.png", dpi=40, figsize=(5, 2)))
    assert img.shape == (80, 200, 4)


def test_heatmap_layer_ids_label_the_columns():
    from analyses.plots import update_heatmap_figure

    values = {"reflection": [1.0, 2.0], "ordinary": [1.0, 1.0]}
    fig = update_heatmap_figure(values, metric="σ", layer_ids=[3, 7])
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert labels == ["3", "7"]
    with pytest.raises(ValueError, match="layer_ids has 3 entries for 2 layer columns"):
        update_heatmap_figure(values, metric="σ", layer_ids=[1, 2, 3])


def test_ema_alpha_follows_the_trace_length_so_the_bold_line_falls_when_lhat_does():
    from analyses.lhat_effects import ema
    from analyses.plots import ema_alpha_for, lhat_curve_figure

    assert ema_alpha_for(200) == pytest.approx(0.1)
    assert ema_alpha_for(2000) == pytest.approx(0.01)
    assert ema_alpha_for(50_000) == pytest.approx(0.01)  # never below RaML's 0.01
    assert ema_alpha_for(3) == 1.0
    lhat = np.linspace(3.0, 0.5, 201)  # falls by 2.5 nats over 200 tokens
    fig = lhat_curve_figure(lhat, None)
    ax = fig.axes[0]
    bold = next(line for line in ax.get_lines() if line.get_label().startswith("EMA"))
    assert bold.get_label() == "EMA (α=0.1)"
    drop = bold.get_ydata()[0] - bold.get_ydata()[-1]
    assert drop == pytest.approx(3.0 - ema(lhat, 0.1)[-1])
    assert drop > 0.9 * 2.5  # RaML's α = 0.01 shows under 60% of it
    assert 3.0 - ema(lhat, 0.01)[-1] < 0.6 * 2.5
    raw = next(line for line in ax.get_lines() if line.get_label() == "L̂ (raw)")
    assert raw.get_zorder() > bold.get_zorder()  # the raw curve is drawn on top


def test_layer_lines_never_take_the_category_marker_colours():
    from matplotlib.colors import to_rgb

    from analyses.plots import LAYER_COLOURS, MARKER_COLOURS, step_curve_figure

    markers = {to_rgb(c) for c in MARKER_COLOURS.values()}
    values = np.random.default_rng(0).random((12, 40))
    cats = np.zeros(40, np.uint8)
    cats[[5, 6]] = 1
    cats[20] = 2
    fig = step_curve_figure(values, cats, metric="upd_sigma_gate")
    lines = [ln for ln in fig.axes[0].get_lines() if ln.get_label().startswith("upd_sigma_gate [")]
    assert len(lines) == 12
    styles = {(to_rgb(ln.get_color()), ln.get_linestyle()) for ln in lines}
    assert len(styles) == 12  # every layer told apart
    assert not {c for c, _ in styles} & markers
    assert not {to_rgb(c) for c in LAYER_COLOURS} & markers
