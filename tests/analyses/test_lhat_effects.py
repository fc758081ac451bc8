"""Behavioural L̂ effects, controls and category statistics on synthetic data with known answers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from analyses.curves import compare_curves, curve_summaries, lhat_trend
from analyses.lhat_effects import (
    DEFAULT_PAIRS,
    category_comparison,
    ema,
    format_comparison_table,
    occurrence_effects,
    per_trace_aggregates,
    pooled_values,
    token_effects,
    token_metrics,
)
from analyses.stats import PERMUTATIONS
from analyses.token_sets import (
    RAML_NOTEBOOK_WORDS,
    Occurrence,
    paragraph_starts,
    phrase_occurrences,
    position_matched_ordinary,
    raml_notebook_occurrences,
    shuffled_labels,
)

# --------------------------------------------------------------------------------------------------
# Per-token and per-phrase metrics


def test_category_codes_match_probes():
    from analyses import lhat_effects as le
    from probes.traces.categories import CATEGORY_CODES

    codes = (CATEGORY_CODES["ordinary"], CATEGORY_CODES["reflection"], CATEGORY_CODES["delimiter"])
    assert codes == (le.ORDINARY, le.REFLECTION, le.DELIMITER)


def test_token_metrics_match_probes_lhat_and_hand_values():
    from probes.measures.lhat.fast import delta_lhat, log_ratio, relative_change

    lhat = np.array([4.0, 2.0, 2.5, 0.0, 1.0])
    m = token_metrics(lhat)
    np.testing.assert_allclose(m["delta"], [-2.0, 0.5, -2.5, 1.0])
    np.testing.assert_allclose(m["abs_delta"], [2.0, 0.5, 2.5, 1.0])
    np.testing.assert_allclose(m["rho"][:3], [0.5, 0.25, 1.0])
    assert np.isnan(m["rho"][3])  # L̂_{t-1} = 0: skipped (NaN)
    assert m["lam"][0] == pytest.approx(np.log(0.5))
    assert np.isnan(m["lam"][2]) and np.isnan(m["lam"][3])
    rng = np.random.default_rng(0)
    curve = rng.gamma(2.0, 1.0, 50)
    m = token_metrics(curve)
    np.testing.assert_allclose(m["delta"], delta_lhat(curve))
    np.testing.assert_allclose(m["rho"], relative_change(curve))
    np.testing.assert_allclose(m["lam"], log_ratio(curve))


def test_phrase_delta_is_the_sum_of_its_token_deltas():
    rng = np.random.default_rng(1)
    lhat = rng.gamma(2.0, 1.0, 101)  # T = 100
    occs = [Occurrence(3, 4, 1, 0), Occurrence(10, 13, 1, 1), Occurrence(40, 47, 2, 5),
            Occurrence(90, 100, 2, 6)]
    tok = token_metrics(lhat)["delta"]
    occ = occurrence_effects(lhat, occs)
    for o, d in zip(occs, occ["delta"]):
        assert d == pytest.approx(tok[o.start:o.end].sum(), abs=1e-12)
    # ρ and λ across the whole phrase
    assert occ["rho"][1] == pytest.approx(abs(lhat[13] - lhat[10]) / lhat[10])
    assert occ["lam"][2] == pytest.approx(np.log(lhat[47]) - np.log(lhat[40]))
    # a one-token phrase equals the token's own values
    for k in ("delta", "rho", "lam"):
        assert occ[k][0] == pytest.approx(token_metrics(lhat)[k][3])


def test_notebook_window_is_one_token_past_the_word():
    lhat = np.array([4.0, 2.0, 1.0, 0.5, 0.25, 0.2])  # T = 5
    occs = [Occurrence(1, 3, 1, 0), Occurrence(3, 5, 1, 0)]
    ours = occurrence_effects(lhat, occs)
    nb = occurrence_effects(lhat, occs, raml_notebook=True)
    # ours: lhat[1] -> lhat[3]; notebook: lhat[1] -> lhat[4] (|L̂_{i+|w|} − L̂_{i−1}| / L̂_{i−1})
    assert ours["rho"][0] == pytest.approx(abs(0.5 - 2.0) / 2.0)
    assert nb["rho"][0] == pytest.approx(abs(0.25 - 2.0) / 2.0)
    assert nb["delta"][0] == pytest.approx(0.25 - 2.0)
    # a word ending at T has no point past it
    assert ours["rho"][1] == pytest.approx(abs(0.2 - 0.5) / 0.5)
    assert np.isnan(nb["rho"][1])
    with pytest.raises(ValueError):
        occurrence_effects(lhat, [Occurrence(4, 7, 1, 0)])


def test_ema_matches_the_loop_definition():
    x = np.random.default_rng(2).normal(size=30)
    s = [x[0]]
    for v in x[1:]:
        s.append(0.1 * v + 0.9 * s[-1])
    np.testing.assert_allclose(ema(x, 0.1), s)
    np.testing.assert_allclose(ema(x, 1.0), x)


# --------------------------------------------------------------------------------------------------
# Occurrences


def test_phrase_occurrences_from_whole_sequence_arrays():
    # prompt (3) | trajectory (10) | scaffold (2)
    category = np.array([3, 3, 3, 0, 1, 1, 0, 2, 1, 1, 1, 0, 0, 4, 4], dtype=np.uint8)
    phrase_id = np.array([-1, -1, -1, -1, 0, 0, -1, 7, 0, 0, 2, -1, -1, -1, -1], dtype=np.int16)
    is_first = np.zeros(15, bool)
    is_first[[4, 7, 8, 10]] = True
    occs = phrase_occurrences(category, phrase_id, is_first, (3, 13))
    assert occs == [Occurrence(1, 3, 1, 0), Occurrence(4, 5, 2, 7), Occurrence(5, 7, 1, 0),
                    Occurrence(7, 8, 1, 2)]
    # two adjacent occurrences of the same phrase are split by is_first
    is_first2 = is_first.copy()
    is_first2[9] = True
    occs2 = phrase_occurrences(category, phrase_id, is_first2, (3, 13))
    assert Occurrence(5, 6, 1, 0) in occs2 and Occurrence(6, 7, 1, 0) in occs2
    # without phrase ids / first flags: runs of one category
    assert phrase_occurrences(category[3:13]) == [Occurrence(1, 3, 1, -1), Occurrence(4, 5, 2, -1),
                                                  Occurrence(5, 8, 1, -1)]


def _fake_encode(word: str) -> list[int]:
    vocab = {"wait": [12], "Wait": [10], "retry": [40], "Retry": [41], "recheck": [42, 43],
             "Recheck": [44, 43], "however": [45], "However": [46], "alternatively": [47],
             "Alternatively": [20, 21]}
    return vocab[word]


def test_notebook_matching_finds_line_initial_wait_but_not_space_wait():
    # ids: 1 "\n\n", 10 "Wait", 11 " wait", 2 ",", 3 " the", 20 21 "Altern"+"atively", 99 </think>
    ids = [5, 1, 10, 2, 3, 11, 3, 1, 20, 21, 3, 99, 1, 10]
    occs = raml_notebook_occurrences(ids, _fake_encode, think_close_id=99)
    assert occs == [Occurrence(2, 3, 1, RAML_NOTEBOOK_WORDS.index("Wait")),
                    Occurrence(8, 10, 1, RAML_NOTEBOOK_WORDS.index("Alternatively"))]
    # nothing after </think>; without it the last "Wait" is found too
    everything = raml_notebook_occurrences(ids, _fake_encode, think_close_id=None)
    assert [o.start for o in everything] == [2, 8, 13]
    # a multi-token </think> and a match straddling it
    occs = raml_notebook_occurrences([1, 20, 21, 20, 77, 21], _fake_encode,
                                     think_close_id=[77, 21])
    assert [o.start for o in occs] == [1]


# --------------------------------------------------------------------------------------------------
# Controls


def test_paragraph_starts_from_token_strings():
    toks = ["Okay", ",", " so", "\n\n", "Wait", ",", " no", ".\n\n", "Hmm", "\n", "\n", "So",
            "\n\nBut", " x", "\n"]
    starts = paragraph_starts(toks)
    assert np.flatnonzero(starts).tolist() == [4, 8, 11, 12]
    assert np.flatnonzero(paragraph_starts(toks, include_first=True)).tolist() == [0, 4, 8, 11, 12]
    assert not paragraph_starts(["a", "\n", "b"]).any()  # one newline is not a paragraph


def test_position_matched_picks_the_nearest_ordinary_tokens():
    ordinary = np.ones(20, bool)
    ordinary[[5, 6, 12]] = False  # phrase tokens
    # start 5: token 4 (distance 1) is nearest; next are 3 and 7 (distance 2)
    assert position_matched_ordinary([5], ordinary, 0, k=1).tolist() == [[4]]
    assert position_matched_ordinary([5], ordinary, 0, k=3).tolist() == [[3, 4, 7]]
    # start 12: 11 and 13 tie; the tie is broken at random, both occur
    picks = {int(position_matched_ordinary([12], ordinary, s, k=1)[0, 0]) for s in range(20)}
    assert picks == {11, 13}
    # within a window: sampled from the ordinary tokens within ±2
    got = position_matched_ordinary([12], ordinary, 1, k=2, window=2)[0]
    assert set(got.tolist()) <= {10, 11, 13, 14} and len(set(got.tolist())) == 2
    # nothing eligible -> -1
    assert position_matched_ordinary([3], np.zeros(10, bool), 0, k=2).tolist() == [[-1, -1]]
    assert position_matched_ordinary([3], ordinary[:10], 0, k=2, window=0).tolist() == [[3, -1]]


def test_shuffled_labels_preserve_counts():
    labels = np.array([0] * 30 + [1] * 5 + [2] * 3, dtype=np.uint8)
    sh = shuffled_labels(labels, 0)
    assert sh.dtype == labels.dtype
    assert np.bincount(sh).tolist() == np.bincount(labels).tolist()
    assert not np.array_equal(sh, labels)


def test_token_effects_table_and_controls():
    lhat = np.linspace(3.0, 1.0, 11)  # T = 10
    category = np.array([0, 1, 1, 0, 0, 2, 0, 0, 1, 0], dtype=np.uint8)
    pid = np.array([-1, 0, 0, -1, -1, 3, -1, -1, 0, -1])
    first = np.array([0, 1, 0, 0, 0, 1, 0, 0, 1, 0], bool)
    para = np.zeros(10, bool)
    para[[1, 3, 6]] = True  # token 1 is a reflection token: not an ordinary control
    fx = token_effects(lhat, category, pid, first, paragraph_start=para, rng=0)
    assert fx.occurrences == (Occurrence(1, 3, 1, 0), Occurrence(5, 6, 2, 3),
                              Occurrence(8, 9, 1, 0))
    assert np.flatnonzero(fx.paragraph_initial).tolist() == [3, 6]
    assert fx.position_matched.shape == (2, 1) and fx.position_matched[1, 0] in (7, 9)
    assert fx.position_matched[0, 0] == 0  # nearest ordinary to start 1
    np.testing.assert_allclose(fx.unit_values("reflection", "delta"), [-0.4, -0.2])
    np.testing.assert_allclose(fx.unit_values("reflection", "delta", "first_token"), [-0.2, -0.2])
    assert fx.unit_values("reflection", "delta", "token").size == 3
    assert fx.unit_values("ordinary", "abs_delta").size == 6
    assert fx.unit_values("phrase:3", "abs_delta").tolist() == pytest.approx([0.2])
    assert np.bincount(fx.shuffled, minlength=3).tolist() == [6, 3, 1]
    with pytest.raises(ValueError):
        token_effects(lhat[:-1], category)
    # whole-sequence arrays with the trajectory span
    whole = np.concatenate([[3, 3], category, [4]]).astype(np.uint8)
    fx2 = token_effects(lhat, whole, np.concatenate([[-1, -1], pid, [-1]]),
                        np.concatenate([[0, 0], first, [0]]).astype(bool), traj_span=(2, 12))
    assert fx2.occurrences == fx.occurrences
    # notebook occurrences override the lexicon ones; lexicon phrases they miss become ordinary
    fx3 = token_effects(lhat, category, pid, first, occurrences=[Occurrence(4, 5, 1, 1)],
                        raml_notebook=True)
    assert fx3.labels.tolist() == [0, 0, 0, 0, 1, 0, 0, 0, 0, 0]
    assert fx3.unit_values("reflection", "delta").tolist() == pytest.approx([-0.4])


# --------------------------------------------------------------------------------------------------
# Planted effect and the null


def _synthetic_traces(n_traces: int, seed: int, planted: bool):
    """Traces whose reflection tokens (if `planted`) make log-L̂ jumps ~30x the ordinary ones."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_traces):
        t = int(rng.integers(150, 250))
        category = np.zeros(t, np.uint8)
        pid = np.full(t, -1)
        first = np.zeros(t, bool)
        for s in rng.choice(np.arange(5, t - 3), size=8, replace=False):
            if category[s - 1 : s + 3].any():
                continue
            length = int(rng.integers(1, 3))
            code = 1 if rng.random() < 0.75 else 2
            category[s : s + length] = code
            pid[s : s + length] = (0 if rng.random() < 0.5 else 1) if code == 1 else 5
            first[s] = True
        steps = rng.normal(-0.003, 0.01, t)
        refl = category == 1
        if planted:
            steps[refl] = rng.normal(0.0, 0.3, refl.sum())
        lhat = 3.0 * np.exp(np.concatenate([[0.0], np.cumsum(steps)]))
        para = rng.random(t) < 0.1
        out.append((lhat, category, pid, first, para))
    return out


def test_planted_reflection_effect_is_found_and_controls_behave():
    gen = np.random.default_rng(7)
    effects = [token_effects(*tr[:4], paragraph_start=tr[4], rng=gen)
               for tr in _synthetic_traces(40, seed=3, planted=True)]
    per_trace = per_trace_aggregates(effects, "abs_delta", "mean",
                                     phrase_names={0: "wait", 1: "alternatively", 5: "therefore"})
    assert set(per_trace) >= {"reflection", "delimiter", "ordinary", "paragraph_initial",
                              "position_matched", "shuffled_reflection", "shuffled_ordinary",
                              "phrase:wait", "phrase:alternatively", "phrase:therefore"}
    assert all(v.shape == (40,) for v in per_trace.values())
    table = category_comparison(per_trace, n_boot=500, meta={"metric": "abs_delta"})
    assert len(table.rows) == len(DEFAULT_PAIRS) + 3  # + wait, alternatively, therefore vs ordinary

    for control in ("ordinary", "paragraph_initial"):
        r = table.row("reflection", control)
        assert r.n_traces >= 35
        assert r.p == 1 / (PERMUTATIONS + 1), control  # no random sign flip as extreme
        assert r.p_holm < 0.01, control
        assert r.cliffs_delta > 0.5
        assert r.ci_median_diff[0] > 0
    for phrase in ("phrase:wait", "phrase:alternatively"):
        assert table.row(phrase, "ordinary").ci_median_diff[0] > 0
    null = table.row("shuffled_reflection", "shuffled_ordinary")
    assert null.ci_median_diff[0] < 0 < null.ci_median_diff[1]
    assert null.wilcoxon_p > 0.05 and null.p > 0.05
    # the delimiter tokens carry no planted effect
    delim = table.row("delimiter", "ordinary")
    assert delim.ci_median_diff[0] < 0 < delim.ci_median_diff[1]
    # Holm over all rows: adjusted >= raw, and the family size counts every row
    for r in table.rows:
        assert r.p_holm >= r.p - 1e-15

    text = format_comparison_table(table)
    lines = text.splitlines()
    assert lines[0] == "metric=abs_delta"
    assert lines[1].startswith("comparison") and "cliff δ" in lines[1] and "p_holm" in lines[1]
    assert len(lines) == 3 + len(table.rows)
    assert any(line.startswith("reflection vs ordinary") for line in lines)
    json.dumps(table.to_dict())


def test_no_planted_effect_gives_no_significant_reflection_difference():
    gen = np.random.default_rng(11)
    effects = [token_effects(*tr[:4], paragraph_start=tr[4], rng=gen)
               for tr in _synthetic_traces(40, seed=5, planted=False)]
    per_trace = per_trace_aggregates(effects, "abs_delta", "median", unit="first_token")
    (r,) = category_comparison(per_trace, pairs=[("reflection", "ordinary")], phrases=False,
                               n_boot=500).rows
    assert r.ci_median_diff[0] < 0 < r.ci_median_diff[1]


def test_aggregates_are_nan_for_absent_sets_and_pooled_values_concatenate():
    lhat = np.linspace(2.0, 1.0, 6)
    fx_a = token_effects(lhat, np.array([0, 1, 0, 0, 0], np.uint8), rng=0)
    fx_b = token_effects(lhat, np.zeros(5, np.uint8), rng=0)
    agg = per_trace_aggregates([fx_a, fx_b], "abs_delta")
    assert agg["reflection"][0] == pytest.approx(0.2) and np.isnan(agg["reflection"][1])
    assert np.isnan(agg["paragraph_initial"]).all()  # no paragraph starts given
    assert np.isnan(agg["delimiter"]).all()
    pooled = pooled_values([fx_a, fx_b], "abs_delta")
    assert pooled["ordinary"].size == 9 and pooled["reflection"].size == 1
    with pytest.raises(KeyError):
        category_comparison(agg, pairs=[("reflection", "nope")])


# --------------------------------------------------------------------------------------------------
# Trend and curve comparisons


def test_lhat_trend_on_falling_and_flat_curves():
    rng = np.random.default_rng(4)
    falling = [np.linspace(5.0, 1.0, 50) + rng.normal(0, 0.01, 50) for _ in range(20)]
    res = lhat_trend(falling, n_boot=300)
    assert res["n_traces"] == 20 and res["share_falling"] == 1.0
    assert res["median_change"] == pytest.approx(-4.0, abs=0.1)
    assert res["median_change_ci"][1] < 0
    assert res["wilcoxon_p"] < 1e-3
    assert res["median_spearman"] < -0.95
    json.dumps(res)
    noise = [3.0 + rng.normal(0, 0.1, 60) for _ in range(30)]
    res = lhat_trend(noise, n_boot=300)
    assert res["median_change_ci"][0] < 0 < res["median_change_ci"][1]
    assert np.isnan(lhat_trend([np.ones(5)])["per_trace"]["spearman"][0])


def test_compare_curves_thinking_vs_no_thinking():
    rng = np.random.default_rng(5)
    x = np.linspace(0, 1, 101)
    thinking = [4.0 * (1 - x) + 0.1 + rng.normal(0, 0.02, 101) ** 2 for _ in range(25)]
    no_thinking = [np.concatenate([[4.1], 1.5 + rng.normal(0, 0.05, 10) ** 2]) for _ in range(25)]
    s = curve_summaries([np.linspace(4.0, 0.0, 5)])
    assert s["final"][0] == 0.0
    assert s["auc"][0] == pytest.approx(0.5)  # straight line from 1 to 0
    assert s["half_time"][0] == pytest.approx(0.5)
    res = compare_curves(thinking, no_thinking, n_boot=300)
    assert set(res) == {"final", "auc", "half_time"}
    fin = res["final"]
    assert fin.paired and fin.test == "wilcoxon" and fin.n_a == 25
    assert fin.median_diff < 0 and fin.ci_median_diff[1] < 0 and fin.p_holm < 1e-3
    assert fin.cliffs_delta == -1.0
    assert res["half_time"].median_diff > 0  # no-thinking converges earlier
    un = compare_curves(thinking, no_thinking[:20], paired=False, n_boot=300)
    assert un["final"].test == "mannwhitneyu" and un["final"].n_b == 20
    assert un["final"].p < 1e-3 and un["final"].ci_median_diff[1] < 0
    json.dumps({k: v.to_dict() for k, v in un.items()})
    with pytest.raises(ValueError):
        compare_curves(thinking, no_thinking[:3])
