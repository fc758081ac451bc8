"""Trajectory efficiency measures on planted L̂ curves: known values, a slow reference, planted
variants (a known faster variant is found faster) and the relation to length."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from analyses.efficiency import (
    MEASURES,
    compare_variants,
    efficiency_measures,
    length_relation,
    measure_table,
    tokens_to_fraction,
    verdict,
)


def test_linear_curve_known_values():
    m = efficiency_measures(10.0 - np.arange(11.0))  # T = 10, falls 1 nat per token
    assert m["drop"] == 10.0 and m["final"] == 0.0 and m["length"] == 10.0
    assert m["tokens_to_50"] == 5.0 and m["tokens_to_90"] == 9.0 == m["stay_to_90"]
    assert m["frac_to_50"] == 0.5 and m["frac_to_90"] == pytest.approx(0.9)
    assert m["auc_remaining"] == pytest.approx(0.5)
    assert m["drop_per_100"] == pytest.approx(100.0)
    assert list(m) == list(MEASURES)


@pytest.mark.parametrize("k", [1, 3, 7, 20])
def test_step_curve_known_values(k):
    T = 20
    y = np.where(np.arange(T + 1) < k, 5.0, 1.0)  # the whole drop at token k
    m = efficiency_measures(y)
    assert m["tokens_to_50"] == m["tokens_to_90"] == m["stay_to_90"] == k
    assert m["auc_remaining"] == pytest.approx((k - 0.5) / T)
    assert m["drop"] == 4.0 and m["drop_per_100"] == pytest.approx(400.0 / T)


def test_a_transient_dip_reaches_but_does_not_stay():
    y = np.array([5.0, 5.0, 0.1, 5.0, 4.0, 3.0, 0.2, 0.0, 0.0])  # dips at t = 2, settles at t = 6
    m = efficiency_measures(y)
    assert m["tokens_to_50"] == m["tokens_to_90"] == 2.0
    assert m["stay_to_90"] == 6.0
    assert tokens_to_fraction(y, 0.5, stay=True) == 6.0
    assert tokens_to_fraction(np.array([5.0, 1.0, 1.0]), 0.9, stay=True) == 1.0


def test_curves_that_do_not_fall_have_no_convergence_time():
    for y in ([1.0, 2.0, 3.0], [2.0, 1.0, 2.0], [4.0]):
        m = efficiency_measures(y)
        assert math.isnan(m["tokens_to_90"]) and math.isnan(m["auc_remaining"])
    assert efficiency_measures([2.0, 1.0, 2.0])["drop"] == 0.0
    with pytest.raises(ValueError, match="1-D"):
        efficiency_measures(np.zeros((2, 2)))


def _slow_tokens_to(y, f, stay=False):
    drop = y[0] - y[-1]
    if drop <= 0:
        return math.nan
    for t in range(len(y)):
        window = y[t:] if stay else y[t:t + 1]
        if all(y[0] - v >= f * drop * (1 - 1e-12) for v in window):
            return float(t)
    raise AssertionError("unreachable: t = T always qualifies")


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(0.0, 10.0, allow_nan=False), min_size=2, max_size=40),
       st.sampled_from([0.1, 0.5, 0.9, 1.0]))
def test_tokens_to_fraction_matches_a_loop(values, f):
    y = np.asarray(values)
    for stay in (False, True):
        got, want = tokens_to_fraction(y, f, stay=stay), _slow_tokens_to(y, f, stay)
        assert (math.isnan(got) and math.isnan(want)) or got == want
    m = efficiency_measures(y)
    if y[0] > y[-1]:
        r = (y - y[-1]) / (y[0] - y[-1])
        assert m["auc_remaining"] == pytest.approx(np.trapezoid(r, np.linspace(0, 1, y.size)))
        assert m["tokens_to_50"] <= m["tokens_to_90"] <= m["stay_to_90"] <= y.size - 1


def _planted(rng, n_groups=15):
    """Per group: a fast variant (time constant 4 tokens) and a slow one (16), same start and
    length, the slow one ending 0.3 nats higher; small noise."""
    curves, groups, variants = [], [], []
    for g in range(n_groups):
        T, start = int(rng.integers(120, 160)), 5.0 + rng.random()
        t = np.arange(T + 1)
        for name, tau, floor in (("fast", 4.0, 0.1), ("slow", 16.0, 0.4)):
            y = floor + (start - floor) * np.exp(-t / tau) + rng.normal(0, 0.01, T + 1)
            y[0] = start
            curves.append(y)
            groups.append(f"q{g}")
            variants.append(name)
    return curves, groups, variants


def test_known_faster_variant_is_found_faster():
    rng = np.random.default_rng(0)
    curves, groups, variants = _planted(rng)
    # an unpaired trace, a group with one variant only: both ignored
    curves.append(np.linspace(5, 0, 30))
    groups.append("lonely")
    variants.append("fast")
    curves.append(np.linspace(5, 0, 30))
    groups.append(None)
    variants.append(None)
    table = measure_table(curves)
    rows = compare_variants(table, groups, variants, [("fast", "slow")], n_boot=500)
    by = {r["metric"]: r for r in rows}
    assert set(by) == {"final", "tokens_to_90", "stay_to_90"}
    t90 = by["tokens_to_90"]
    assert t90["n_groups"] == t90["n_pairs"] == 15
    assert t90["share_a_lower"] == 1.0 and t90["ci_median_diff"][1] < 0
    assert verdict(t90) == "lower"
    # exponential: tokens to 90% ≈ τ ln 10 → ≈ 9.2 vs ≈ 36.8 (up to noise and the floor)
    assert 7 <= t90["median_a"] <= 12 and 30 <= t90["median_b"] <= 40
    fin = by["final"]
    assert fin["median_diff"] == pytest.approx(-0.3, abs=0.05) and verdict(fin) == "lower"
    assert all(0 <= r["p_holm"] <= 1 and r["p_holm"] >= r["wilcoxon_p"] for r in rows)
    # the reverse pairing flips the sign
    rev = {r["metric"]: r for r in compare_variants(table, groups, variants, [("slow", "fast")],
                                                     n_boot=500)}
    assert rev["tokens_to_90"]["median_diff"] == -t90["median_diff"]
    assert verdict(rev["tokens_to_90"]) == "higher"


def test_identical_variants_show_no_difference():
    rng = np.random.default_rng(1)
    curves, groups, variants = [], [], []
    for g in range(12):
        y = np.cumsum(np.r_[5.0, -rng.random(30) * 0.3])
        for v in ("a", "b"):
            curves.append(y)
            groups.append(str(g))
            variants.append(v)
    rows = compare_variants(measure_table(curves), groups, variants, [("a", "b")], n_boot=200)
    for r in rows:
        assert r["median_diff"] == 0.0 and math.isnan(r["wilcoxon_p"])
        assert verdict(r) == "no clear difference"


def test_length_relation_finds_a_planted_trend():
    rng = np.random.default_rng(2)
    # every trace falls by the same 4 nats, linearly: the drop per 100 tokens falls with length,
    # tokens-to-90% grows with it, the normalised shape (auc, frac) does not depend on it
    lengths = rng.integers(10, 200, 40)
    curves = [5.0 - 4.0 * np.arange(T + 1) / T for T in lengths]
    rel = {r["measure"]: r for r in length_relation(measure_table(curves), n_boot=500)}
    assert rel["drop_per_100"]["spearman"] == pytest.approx(-1.0)
    assert rel["drop_per_100"]["ci"][1] <= -0.99 and rel["drop_per_100"]["p_holm"] < 1e-6
    assert rel["tokens_to_90"]["spearman"] == pytest.approx(1.0)
    assert math.isnan(rel["drop"]["spearman"])  # constant: undefined, not a fake 0
    assert rel["drop"]["n"] == 40
    # the vectorised bootstrap equals scipy's Spearman on one resample
    from scipy import stats

    from analyses.efficiency import _spearman_rows
    x, y = rng.random((3, 25)), rng.integers(0, 5, (3, 25)).astype(float)  # ties in y
    want = [stats.spearmanr(a, b).statistic for a, b in zip(x, y, strict=True)]
    np.testing.assert_allclose(_spearman_rows(x, y), want, rtol=1e-12)
