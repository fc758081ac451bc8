"""RePro scores on hand-made L̂ curves with known values."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats

from analyses.repro import (
    kendall_tau,
    magnitude_score,
    repro_scores,
    segment_boundaries,
    stability_score,
    top_entropy_segments,
)


def test_magnitude_score_reference_values():
    # J̃ = 0 (answer certain) -> 1; J̃ = J_b (no progress) -> 1 - tanh 1
    lhat = np.array([2.0, 2.0, 1.0, 0.0])
    res = repro_scores(lhat, [1, 2, 3])
    assert res.j_b == -2.0
    assert res.s_magn[0] == pytest.approx(1 - math.tanh(1.0))
    assert res.s_magn[0] == pytest.approx(0.2384, abs=1e-4)
    assert res.s_magn[1] == pytest.approx(1 - math.tanh(0.5))
    assert res.s_magn[2] == 1.0
    # the printed (unverified) form: tanh(Δ+1)+1 with Δ = (J̃ − J_b)/J_b
    printed = magnitude_score(np.array([-2.0, 0.0]), -2.0, "printed")
    np.testing.assert_allclose(printed, [math.tanh(1.0) + 1, 1.0])
    assert np.isnan(magnitude_score(-1.0, 0.0)).all()  # J_b = 0: undefined


def test_kendall_tau_a_matches_the_pair_sum_and_b_matches_scipy():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 25).astype(float)  # many ties
    n = y.size
    pair_sum = sum(np.sign(y[j] - y[i]) for i in range(n) for j in range(i + 1, n))
    assert kendall_tau(y, "a") == pytest.approx(2 * pair_sum / (n * (n - 1)))
    assert kendall_tau(y, "b") == pytest.approx(stats.kendalltau(np.arange(n), y).statistic)
    assert kendall_tau([3.0, 3.0, 3.0]) == 0.0
    assert math.isnan(kendall_tau([1.0]))


def test_stability_is_one_for_improving_and_zero_for_worsening_curves():
    improving = np.linspace(5.0, 0.5, 21)  # L̂ falls, J̃ rises
    worsening = improving[::-1].copy()
    ends = [5, 10, 15, 20]
    for points in ("tokens", "segments"):
        up = repro_scores(improving, ends, stability_points=points)
        down = repro_scores(worsening, ends, stability_points=points)
        np.testing.assert_allclose(up.s_stab, 1.0, atol=1e-12)
        np.testing.assert_allclose(down.s_stab, 0.0, atol=1e-12)
    assert stability_score([1.0, 2.0, 3.0]) == pytest.approx(1.0)
    # without the baseline point, the first segment end alone has no τ
    res = repro_scores(improving, ends, stability_points="segments", include_baseline=False)
    assert math.isnan(res.s_stab[0]) and res.s_stab[1] == pytest.approx(1.0)


def test_stability_points_and_ema_on_a_zigzag():
    lhat = np.array([4.0, 3.0, 3.2, 2.0, 2.2, 1.0])
    # tokens: J̃ = [-4, -3, -3.2, -2, -2.2, -1]: two discordant pairs, pair sum 15 - 4 = 11
    y = -lhat
    pair_sum = sum(np.sign(y[j] - y[i]) for i in range(6) for j in range(i + 1, 6))
    res = repro_scores(lhat, [5])
    assert res.s_stab[0] == pytest.approx((2 * pair_sum / 30 + 1) / 2)
    seg = repro_scores(lhat, [1, 3, 5], stability_points="segments")
    np.testing.assert_allclose(seg.s_stab, [1.0, 1.0, 1.0])  # -4, -3, -2, -1
    smooth = repro_scores(lhat, [5], ema_alpha=0.5)
    assert smooth.s_stab[0] == pytest.approx(1.0)  # the EMA removes the zigzag
    np.testing.assert_allclose(repro_scores(lhat, [5], ema_alpha=1.0).s_stab, res.s_stab)
    np.testing.assert_allclose(smooth.s_magn, res.s_magn)  # magnitude uses the raw J̃


def test_composite_and_rewards_telescope():
    rng = np.random.default_rng(3)
    lhat = 3.0 * np.exp(np.cumsum(np.concatenate([[0.0], rng.normal(-0.02, 0.05, 60)])))
    ends = [7, 19, 33, 48, 60]
    res = repro_scores(lhat, ends, w=0.3)
    np.testing.assert_allclose(res.score, 0.7 * res.s_magn + 0.3 * res.s_stab)
    assert res.reward[0] == res.score[0]
    np.testing.assert_allclose(np.cumsum(res.reward), res.score)
    np.testing.assert_allclose(res.j_tilde, -lhat[ends])
    sw = repro_scores(lhat, ends, w=0.3, weight_form="swapped")
    np.testing.assert_allclose(sw.score, 0.3 * sw.s_magn + 0.7 * sw.s_stab)
    assert any("swapped" in u for u in sw.unverified)
    printed = repro_scores(lhat, ends, magnitude_form="printed")
    assert any("UNVERIFIED" in u for u in printed.unverified)
    d = res.to_dict()
    json.dumps(d)
    assert d["config"]["w"] == 0.3 and d["config"]["tau_variant"] == "a"
    with pytest.raises(ValueError):
        repro_scores(lhat, [5, 3])
    with pytest.raises(ValueError):
        repro_scores(lhat, [61])
    assert repro_scores(lhat, []).score.size == 0


def test_segment_boundaries_split_on_blank_lines():
    toks = ["\n", "Okay", ",", " so", "\n\n", "Wait", ",", " no", ".\n\n", "Hmm", "\n", "\n",
            "So", "\n\nBut", " x", "\n\n"]
    assert segment_boundaries(toks) == [5, 9, 12, 13, 16]
    assert segment_boundaries(["\n\n", "A", "\n\n"]) == [3]  # leading blank lines: no empty segment
    assert segment_boundaries([]) == []


def test_top_entropy_segments():
    h = np.array([0.1, 2.0, np.nan, 1.5, 0.3])
    assert top_entropy_segments(h, 2).tolist() == [1, 3]
    assert top_entropy_segments(h, 10).tolist() == [0, 1, 2, 3, 4]
