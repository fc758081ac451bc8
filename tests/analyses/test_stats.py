"""Statistics on synthetic data where the answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from analyses.stats import PERMUTATIONS, bootstrap_ci, cliffs_delta, compare_paired, holm


def test_cliffs_delta_extremes_and_brute_force():
    assert cliffs_delta(np.array([5, 6, 7]), np.array([1, 2])) == 1.0
    assert cliffs_delta(np.array([1, 2]), np.array([5, 6, 7])) == -1.0
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 5, 40), rng.integers(0, 5, 30)  # many ties
    brute = np.mean(np.sign(x[:, None] - y[None, :]))
    assert cliffs_delta(x, y) == pytest.approx(brute, abs=1e-12)


def test_holm_matches_hand_computation():
    p = [0.01, 0.04, 0.03, float("nan"), 0.5]
    adj = holm(p)
    # sorted: 0.01*4=0.04, 0.03*3=0.09, 0.04*2=0.08 -> monotone 0.09, 0.5*1=0.5
    np.testing.assert_allclose(adj[[0, 2, 1, 4]], [0.04, 0.09, 0.09, 0.5])
    assert np.isnan(adj[3])


def test_bootstrap_ci_covers_true_median_and_narrows():
    rng = np.random.default_rng(1)
    small = bootstrap_ci(rng.normal(3.0, 1.0, 50), seed=2)
    large = bootstrap_ci(rng.normal(3.0, 1.0, 2000), seed=2)
    assert small[0] < 3.0 < small[1]
    assert large[0] < 3.0 < large[1]
    assert large[1] - large[0] < small[1] - small[0]


def test_planted_effect_is_found_and_null_is_not():
    rng = np.random.default_rng(3)
    n = 80
    base = rng.gamma(2.0, 1.0, n)  # per-trace level shared by both categories
    planted = {"reflection": base * 2.0 + rng.normal(0, 0.1, n), "ordinary": base}
    null = {"reflection": base + rng.normal(0, 0.3, n), "ordinary": base + rng.normal(0, 0.3, n)}
    (eff,) = compare_paired(planted, [("reflection", "ordinary")], n_boot=1000)
    assert eff.n_traces == n
    assert eff.wilcoxon_p < 1e-6
    # no random sign flip is as extreme: the smallest permutation p-value
    assert eff.p == eff.p_holm == 1 / (PERMUTATIONS + 1)
    assert eff.ci_median_diff[0] > 0
    assert eff.cliffs_delta > 0.3
    (no,) = compare_paired(null, [("reflection", "ordinary")], n_boot=1000)
    assert no.ci_median_diff[0] < 0 < no.ci_median_diff[1]
    assert no.wilcoxon_p > 0.05 and no.p > 0.05


def test_traces_missing_a_category_are_dropped_from_the_pair():
    a = np.array([1.0, 2.0, np.nan, 4.0])
    b = np.array([0.5, np.nan, 1.0, 2.0])
    (r,) = compare_paired({"a": a, "b": b}, [("a", "b")], n_boot=200)
    assert r.n_traces == 2
    assert r.median_diff == pytest.approx(np.median([0.5, 2.0]))
