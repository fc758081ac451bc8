"""Stability measures of L̂ curves (known values, smoothing against a convolution) and the paired
comparison of models on the same traces."""

from __future__ import annotations

import math

import numpy as np
import pytest

from analyses.stability import (
    STABILITY,
    compare_models,
    model_summary,
    smooth,
    stability_measures,
)


def test_monotone_curves_are_stable():
    for y in (np.linspace(5, 0, 50), 5 * np.exp(-np.arange(50) / 7), np.linspace(0, 3, 20)):
        m = stability_measures(y)
        assert m["frac_nonmonotone"] == 0.0 and m["osc_energy"] == 0.0
    assert stability_measures(np.linspace(5, 0, 50))["var_delta"] == pytest.approx(0.0, abs=1e-20)
    assert all(math.isnan(v) for v in stability_measures([1.0]).values())
    assert list(stability_measures([1.0, 0.5])) == list(STABILITY)


def test_zigzag_known_values():
    T, a = 40, 0.2
    t = np.arange(T + 1)
    y = 5 - 0.1 * t + a * (-1.0) ** t  # steps alternate −0.1 − 2a and −0.1 + 2a
    m = stability_measures(y, window=1)
    assert m["frac_nonmonotone"] == 0.5
    assert m["var_delta"] == pytest.approx((2 * a) ** 2)
    assert m["osc_energy"] == pytest.approx((T / 2) * (0.1 - 2 * a) ** 2 / T)
    # a 3-token average shrinks the zigzag to a third: interior rising steps of 2a/3 − 0.1
    m3 = stability_measures(y, window=3)
    assert 0 < m3["osc_energy"] < m["osc_energy"]
    # a ripple shorter than the window: token-level non-monotone, smoothed away
    ripple = np.linspace(5, 0, 101) + 0.05 * (-1.0) ** np.arange(101)
    mr = stability_measures(ripple, window=9)
    assert mr["frac_nonmonotone"] == 0.5 and mr["osc_energy"] < 1e-8


def test_rising_curves_use_their_own_direction():
    m = stability_measures([0.0, 1.0, 0.5, 2.0], window=1)
    assert m["frac_nonmonotone"] == pytest.approx(1 / 3)
    assert m["osc_energy"] == pytest.approx(0.25 / 3)


@pytest.mark.parametrize("w", [1, 3, 4, 9, 15])
def test_smooth_matches_a_convolution(w):
    rng = np.random.default_rng(w)
    y = rng.random(30)
    k = w | 1
    want = np.convolve(np.pad(y, k // 2, mode="edge"), np.ones(k) / k, mode="valid")
    np.testing.assert_allclose(smooth(y, w), want, rtol=1e-12)
    assert smooth(y[:4], 9).shape == (4,)  # window capped at the (odd-trimmed) length
    np.testing.assert_allclose(smooth(y[:4], 9), smooth(y[:4], 3))
    with pytest.raises(ValueError, match="window"):
        smooth(y, 0)


def test_models_compared_on_the_same_traces():
    rng = np.random.default_rng(0)
    n = 20
    base = rng.random(n)
    per_model = {
        "early": {("var_delta", "all"): base + 1.0, ("abs_dlhat", "reflection"): base},
        "late": {("var_delta", "all"): base, ("abs_dlhat", "reflection"): base},
    }
    per_model["early"][("abs_dlhat", "reflection")] = np.where(np.arange(n) < 3, np.nan, base)
    summ = model_summary(per_model, n_boot=200)
    assert {(r["model"], r["measure"], r["category"]) for r in summ} == {
        (m, k[0], k[1]) for m in per_model for k in per_model[m]}
    r = next(r for r in summ if r["model"] == "early" and r["category"] == "reflection")
    assert r["n"] == n - 3 and r["ci_low"] <= r["median"] <= r["ci_high"]
    rows = compare_models(per_model, [("early", "late")], n_boot=200)
    by = {(r["measure"], r["category"]): r for r in rows}
    v = by[("var_delta", "all")]
    assert v["median_diff"] == pytest.approx(1.0) and v["ci_low"] == pytest.approx(1.0)
    assert v["mean_diff"] == pytest.approx(1.0) and v["p_holm"] < 1e-3 and v["n"] == n
    same = by[("abs_dlhat", "reflection")]
    assert same["n"] == n - 3 and same["median_diff"] == 0.0 and math.isnan(same["wilcoxon_p"])
    import pandas as pd

    df = pd.DataFrame(summ + rows)  # the flat rows make one table
    assert set(df["kind"]) == {"model", "paired"} and len(df) == len(summ) + len(rows)
