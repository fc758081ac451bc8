"""The floor on inference, the noise floor of "L̂ falls", BCa / binomial intervals, confound matching."""

from __future__ import annotations

import numpy as np
import pytest

from analyses.curves import lhat_trend
from analyses.inference import MIN_TRACES, bca_ci, falls_beyond_noise, rate_ci, too_few
from analyses.lhat_effects import format_comparison_table
from analyses.matching import corpus_log_frequency, match_balance, matched_windows
from analyses.stats import compare_paired
from analyses.token_sets import DELIMITER, ORDINARY, REFLECTION, token_sets


def test_too_few_names_n():
    assert MIN_TRACES == 8
    assert too_few(2) == "n = 2: too few traces for inference"
    assert too_few(8) is None


@pytest.mark.parametrize("n", [2, 7])
def test_below_the_floor_no_ci_no_p_but_raw_values(n):
    a = np.arange(1.0, n + 1) * 10.0
    b = np.arange(1.0, n + 1)
    (r,) = compare_paired({"a": a, "b": b}, [("a", "b")], n_boot=200)
    assert r.n_traces == n and not r.testable
    assert r.note == f"n = {n}: too few traces for inference"
    assert np.isnan(r.wilcoxon_p) and np.isnan(r.p) and np.isnan(r.p_holm)
    assert all(np.isnan(x) for x in (*r.ci_median_a, *r.ci_median_b, *r.ci_median_diff))
    assert r.values_a == tuple(a) and r.values_b == tuple(b)
    assert r.median_diff == pytest.approx(np.median(a - b))
    text = format_comparison_table([r])
    assert f"n = {n}: too few traces for inference: A = [10" in text
    row = next(line for line in text.splitlines() if line.startswith("a vs b"))
    assert row.split()[-3:] == ["-", "-", "-"] and "[" not in row


def test_at_the_floor_a_consistent_effect_is_tested_and_holm_skips_untestable_rows():
    rng = np.random.default_rng(0)
    a8, b8 = rng.normal(5, 1, 8), rng.normal(0, 1, 8)
    two = {"a": np.r_[a8[:2], [np.nan] * 6], "b": np.r_[b8[:2], [np.nan] * 6]}
    (r8, r2) = compare_paired({"a8": a8, "b8": b8, **two}, [("a8", "b8"), ("a", "b")], n_boot=300)
    # exact sign-flip enumeration at n = 8: only all-plus and all-minus are as extreme
    assert r8.testable and r8.p == pytest.approx(2 / 2**8)
    # the untestable row is not in the Holm family: one test, so p_holm == p
    assert r8.p_holm == pytest.approx(r8.p)
    assert not r2.testable and np.isnan(r2.p_holm)
    lo, hi = r8.ci_median_diff
    assert 0 < lo < np.median(a8 - b8) < hi


def test_noise_floor_of_lhat_falls():
    # a random-init-like curve: L̂_0 = log(5000) nats, a -0.005-nat drift
    flat = np.linspace(np.log(5000), np.log(5000) - 0.005, 40)
    assert falls_beyond_noise(flat) == (False, pytest.approx(0.02 * np.log(5000)))
    assert falls_beyond_noise(np.linspace(8.0, 0.1, 40))[0]
    # a baseline's change raises the floor
    assert not falls_beyond_noise(np.linspace(1.0, 0.5, 10), noise_change=-0.6)[0]
    res = lhat_trend([flat] * 10 + [np.linspace(8.0, 0.1, 40)] * 10, n_boot=200)
    assert res["share_falling_raw"] == 1.0 and res["share_falling"] == 0.5
    assert res["note"] == ""


def test_lhat_trend_on_two_traces_has_no_ci_no_p():
    res = lhat_trend([np.linspace(5.0, 1.0, 20), np.linspace(4.0, 1.5, 20)], n_boot=200)
    assert res["note"] == "n = 2: too few traces for inference"
    assert np.isnan(res["wilcoxon_p"])
    assert all(np.isnan(x) for x in res["share_falling_ci"] + res["median_change_ci"])
    assert res["median_change"] == pytest.approx(-3.25)


def test_bca_and_rate_intervals():
    assert bca_ci(np.full(10, 2.5)) == (2.5, 2.5)
    assert all(np.isnan(bca_ci(np.array([1.0]))))
    lo, hi = bca_ci(np.random.default_rng(1).normal(3.0, 1.0, 200), np.mean, n_boot=500)
    assert 2.6 < lo < 3.0 < hi < 3.4
    # Clopper-Pearson: 0 of 200 -> upper bound 1 - 0.025^(1/200)
    assert rate_ci(0, 200) == (0.0, pytest.approx(1 - 0.025 ** (1 / 200)))
    lo, hi = rate_ci(10, 200)
    assert lo < 0.05 < hi


def test_matched_window_follows_position_frequency_and_paragraph():
    T = 100
    ordinary = np.ones(T, bool)
    ordinary[50:52] = False                    # the occurrence itself
    lf = np.full(T, 10.0)
    lf[50] = 3.0                               # a rare first token
    lf[20] = 3.0                               # the only ordinary token as rare, far away
    lf[55] = 3.5                               # nearly as rare, close by
    (m,) = matched_windows([50], [2], ordinary, log_freq=lf)
    assert m == 55                              # cost 5/5 + 0.5 beats 30/5 + 0
    ps = np.zeros(T, bool)
    ps[50] = ps[54] = True
    (m,) = matched_windows([50], [2], ordinary, log_freq=np.zeros(T), paragraph_start=ps)
    assert m == 54                              # 4/5 < 2/5 + 1 (a different paragraph status)
    # position only: the nearest all-ordinary window of the same length
    (m,) = matched_windows([50], [2], ordinary)
    assert m in (48, 52)
    ordinary[::2] = False                       # no two adjacent ordinary tokens
    assert matched_windows([50], [2], ordinary)[0] == -1


def test_matched_sets_are_ordinary_windows_of_the_occurrence_length():
    T = 60
    cat = np.zeros(T, np.uint8)
    cat[10:13] = REFLECTION
    cat[40:41] = DELIMITER
    ts = token_sets(cat, rng=0, matched=True, log_freq=np.zeros(T))
    (w,) = ts.matched_windows("matched_to_reflection")
    assert w[0] == 10 and w[2] == 3 and np.all(ts.labels[w[1]:w[1] + 3] == ORDINARY)
    assert ts.indices("matched_to_reflection").size == 3
    assert ts.indices("matched_to_reflection", "first_token").tolist() == [w[1]]
    (d,) = ts.matched_windows("matched_to_delimiter")
    assert d[0] == 40 and ts.labels[d[1]] == ORDINARY and abs(d[1] - 40) == 1
    # without matching the same generator gives the same other sets
    plain = token_sets(cat, rng=0)
    assert np.array_equal(plain.shuffled, ts.shuffled) and plain.matched == {}


def test_corpus_frequency_and_balance():
    lf = corpus_log_frequency([np.array([1, 2, 2]), np.array([2, 3])])
    assert lf[0].tolist() == [0.0, np.log2(3), np.log2(3)] and lf[1].tolist() == [np.log2(3), 0.0]
    b = match_balance([(np.array([10, 20]), np.array([12, -1]), 100)], [np.arange(100.0)], [None])
    assert b["n_occurrences"] == 2 and b["n_matched"] == 1
    assert b["mean_abs_relative_position"] == pytest.approx(0.02)
    assert b["mean_abs_log2_frequency"] == pytest.approx(2.0)
    assert np.isnan(b["share_same_paragraph_status"])


def test_shifted_labels_keep_runs_and_planting_is_exact():
    from analyses.calibration import min_detectable_effect, plant, rate_rows, shift_labels

    cat = np.zeros(30, np.uint8)
    cat[3:6] = REFLECTION
    cat[20] = DELIMITER
    pid = np.where(cat > 0, 7, -1)
    first = np.zeros(30, bool)
    first[[3, 20]] = True
    rng = np.random.default_rng(5)
    c2, p2, f2 = shift_labels(cat, pid, first, rng)
    (k,) = [s for s in range(1, 30) if np.array_equal(np.roll(cat, s), c2)]
    assert np.array_equal(np.roll(pid, k), p2) and np.array_equal(np.roll(first, k), f2)
    v = np.arange(60.0).reshape(2, 30)
    out = plant(v, c2, 0.5)
    assert np.array_equal(out[:, c2 == REFLECTION], 1.5 * v[:, c2 == REFLECTION])
    assert np.array_equal(out[:, c2 != REFLECTION], v[:, c2 != REFLECTION])
    (row,) = rate_rows({"t": [True] * 10 + [False] * 190})
    assert row["rate"] == 0.05 and row["ci"][0] < 0.05 < row["ci"][1]
    assert min_detectable_effect([0.1, 0.2, 0.4], [0.3, 0.6, 1.0]) == pytest.approx(0.3)
    assert np.isnan(min_detectable_effect([0.1, 0.2], [0.1, 0.2]))


def _shifted_null_differences(draws: int, *, n: int = 40, T: int = 100, effect: float = 0.0,
                              seed: int = 0) -> list[np.ndarray]:
    """Per draw, one within-trace difference per trace: the mean of a log-normal per-token value
    at a one-token "reflection" minus its mean over the trace's other tokens, with the labels
    rolled by `analyses.calibration.shift_labels` (the calibration's null) and the reflection's
    value scaled by 1 + effect (`analyses.calibration.plant`). The difference has mean 0 under the
    null but is right-skewed: its median is below 0."""
    from analyses.calibration import plant, shift_labels

    rng = np.random.default_rng(seed)
    values = [rng.lognormal(0.0, 0.5, T) for _ in range(n)]
    cat = np.zeros(T, np.uint8)
    cat[T // 2] = REFLECTION
    out = []
    for _ in range(draws):
        d = []
        for v in values:
            c, _, _ = shift_labels(cat, None, None, rng)
            w = plant(v, c, effect)
            d.append(w[c == REFLECTION].mean() - w[c == ORDINARY].mean())
        out.append(np.asarray(d))
    return out


def test_signflip_p_is_calibrated_on_a_skewed_label_shift_null_where_wilcoxon_is_not():
    from scipy import stats

    from analyses.inference import signflip_pvalues

    diffs = _shifted_null_differences(200)
    p = signflip_pvalues(diffs, seed=1)
    k = int(np.sum(p < 0.05))
    lo, hi = rate_ci(k, 200)
    assert lo <= 0.05 <= hi, (k, lo, hi)
    # the signed-rank test on the same draws rejects far more often than 5%
    kw = sum(stats.wilcoxon(d).pvalue < 0.05 for d in diffs)
    assert rate_ci(kw, 200)[0] > 0.05, kw


def test_signflip_p_detects_a_planted_effect_and_is_deterministic():
    from analyses.inference import signflip_p, signflip_pvalues

    planted = _shifted_null_differences(20, effect=0.5, seed=2)
    p = signflip_pvalues(planted, seed=3)
    assert np.all(p < 0.05)
    assert np.all(p == signflip_pvalues(planted, seed=3))  # same seed, same p, batch or not
    assert [signflip_p(d, seed=3) for d in planted] == list(p)
    assert not np.array_equal(signflip_pvalues(_shifted_null_differences(20, seed=2), seed=3),
                              signflip_pvalues(_shifted_null_differences(20, seed=2), seed=4))
    # exact below 2^n <= n_perm + 1; the Monte-Carlo p never reaches 0
    assert signflip_p(np.ones(8)) == 2 / 2**8
    assert signflip_p(np.ones(40), n_perm=999) == 1 / 1000
    assert np.isnan(signflip_p(np.zeros(10)))
