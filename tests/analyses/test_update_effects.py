"""Per-layer category comparisons of update arrays, on synthetic data with planted effects."""

from __future__ import annotations

import numpy as np
import pytest

from analyses.lhat_effects import DEFAULT_PAIRS, token_effects
from analyses.token_sets import Occurrence, token_sets
from analyses.update_effects import (
    POOLED,
    effect_direction,
    format_update_table,
    heatmap_values,
    per_trace_layer_aggregates,
    update_comparison,
)

N_LAYERS = 3


def _traces(n_traces=30, T=60, seed=0):
    """Per trace: category array with 2 reflection words (2 tokens) and 1 delimiter, and sets."""
    rng = np.random.default_rng(seed)
    cats, sets = [], []
    gen = np.random.default_rng(seed + 1)
    for _ in range(n_traces):
        cat = np.zeros(T, np.uint8)
        starts = np.sort(rng.choice(np.arange(2, T - 4, 5), size=3, replace=False))
        cat[starts[0]:starts[0] + 2] = 1
        cat[starts[1]:starts[1] + 2] = 1
        cat[starts[2]] = 2
        para = np.zeros(T, bool)
        para[rng.choice(np.flatnonzero(cat == 0), size=3, replace=False)] = True
        cats.append(cat)
        sets.append(token_sets(cat, paragraph_start=para, rng=gen))
    return cats, sets


def _values(cats, *, layer=1, factor=3.0, seed=2):
    """Log-normal magnitudes [L, T]; reflection tokens at `layer` multiplied by `factor`."""
    rng = np.random.default_rng(seed)
    out = []
    for cat in cats:
        v = rng.lognormal(0.0, 0.3, size=(N_LAYERS, cat.size))
        if layer is not None:
            v[layer, cat == 1] *= factor
        out.append(v)
    return out


def test_token_sets_equal_token_effects_sets():
    """The refactored sets are exactly those token_effects builds (same rng draws)."""
    cat = np.zeros(40, np.uint8)
    cat[[5, 6]] = 1
    cat[[20]] = 2
    cat[[30, 31]] = 1
    para = np.zeros(40, bool)
    para[[0, 12, 25]] = True
    fx = token_effects(np.linspace(5, 1, 41), cat, paragraph_start=para, rng=7)
    ts = token_sets(cat, paragraph_start=para, rng=7)
    assert fx.occurrences == ts.occurrences
    np.testing.assert_array_equal(fx.labels, ts.labels)
    np.testing.assert_array_equal(fx.shuffled, ts.shuffled)
    np.testing.assert_array_equal(fx.position_matched, ts.position_matched)
    np.testing.assert_array_equal(fx.shuffled_ordinary, ts.shuffled_ordinary)
    # indices agree with TraceEffects.unit_values on the token metric
    for name in ("reflection", "delimiter", "ordinary", "paragraph_initial", "shuffled_reflection",
                 "shuffled_ordinary"):
        np.testing.assert_array_equal(
            np.sort(fx.token["delta"][ts.indices(name)]),
            np.sort(fx.unit_values(name, "delta", unit="token")))
    np.testing.assert_array_equal(ts.indices("reflection"), [5, 6, 30, 31])
    np.testing.assert_array_equal(ts.indices("reflection", "first_token"), [5, 30])
    with pytest.raises(ValueError, match="unit must be 'token' or 'first_token'"):
        ts.indices("reflection", "phrase")


def test_aggregates_match_a_direct_computation():
    cats, sets = _traces(n_traces=4)
    vals = _values(cats)
    agg = per_trace_layer_aggregates(vals, sets, statistic="median")
    for i, (v, ts) in enumerate(zip(vals, sets)):
        idx = ts.indices("reflection")
        np.testing.assert_allclose(agg["reflection"][i, :N_LAYERS], np.median(v[:, idx], axis=1))
        np.testing.assert_allclose(agg["reflection"][i, N_LAYERS], np.median(v.mean(0)[idx]))
        idx = ts.indices("ordinary")
        np.testing.assert_allclose(agg["ordinary"][i, :N_LAYERS], np.median(v[:, idx], axis=1))
    absolute = per_trace_layer_aggregates([-v for v in vals], sets, absolute=True)
    plain = per_trace_layer_aggregates(vals, sets)
    np.testing.assert_allclose(absolute["delimiter"], plain["delimiter"])


def test_aggregates_reject_mismatched_shapes():
    cats, sets = _traces(n_traces=2)
    vals = _values(cats)
    vals[1] = vals[1][:, :-1]
    with pytest.raises(ValueError, match=r"trace 1: values have shape \(3, 59\), expected \(3, 60\)"):
        per_trace_layer_aggregates(vals, sets)


def test_planted_layer_effect_is_found_only_there_and_the_null_is_quiet():
    cats, sets = _traces()
    cmp = update_comparison({"upd_x": _values(cats), "upd_y": _values(cats, layer=None, seed=5)},
                            sets, n_boot=500)
    assert len(cmp.rows) == 2 * (N_LAYERS + 1) * len(DEFAULT_PAIRS)
    assert cmp.meta["n_tests"] == len(cmp.rows)
    hit = cmp.row("upd_x", 1, "reflection", "ordinary")
    assert hit.effect == "more"
    assert hit.comparison.ci_median_diff[0] > 0.5       # planted ×3 on values around 1
    assert hit.comparison.cliffs_delta > 0.9
    assert cmp.row("upd_x", POOLED, "reflection", "ordinary").effect == "more"
    for layer in (0, 2):
        assert cmp.row("upd_x", layer, "reflection", "ordinary").effect == "n.s."
    for r in cmp.rows:
        if r.metric == "upd_y" or (r.comparison.a, r.comparison.b) == (
                "shuffled_reflection", "shuffled_ordinary"):
            assert r.effect in ("n.s.", "n/a"), r
    assert all(r.control is None and r.reproduced_by_random_init is None for r in cmp.rows)
    heat = heatmap_values(cmp, "upd_x")
    assert heat["reflection"].shape == (N_LAYERS,)
    assert heat["reflection"][1] > 2 * heat["ordinary"][1]
    text = format_update_table(cmp, layers="all")
    assert "upd_x" in text and "reflection vs ordinary" in text


def test_random_init_control_flags_reproduced_effects():
    cats, sets = _traces()
    trained = {"upd_x": _values(cats, layer=1), "upd_z": _values(cats, layer=2, seed=3)}
    control = {"upd_x": _values(cats, layer=1, seed=9),                # the same effect
               "upd_z": _values(cats, layer=None, seed=4)}             # no effect
    cmp = update_comparison(trained, sets, control_values=control, n_boot=500)
    x = cmp.row("upd_x", 1, "reflection", "ordinary")
    z = cmp.row("upd_z", 2, "reflection", "ordinary")
    assert x.effect == "more" and x.control_effect == "more" and x.reproduced_by_random_init is True
    assert z.effect == "more" and z.control_effect == "n.s." and z.reproduced_by_random_init is False
    quiet = cmp.row("upd_z", 0, "reflection", "ordinary")
    assert quiet.effect == "n.s." and quiet.reproduced_by_random_init is False
    d = x.to_dict()
    assert d["control"]["a"] == "reflection" and d["reproduced_by_random_init"] is True
    assert cmp.control_medians is not None
    assert heatmap_values(cmp, "upd_x", control=True)["reflection"][1] > 2.0
    with pytest.raises(ValueError, match=r"the random-init control has no \['upd_z'\]"):
        update_comparison(trained, sets, control_values={"upd_x": control["upd_x"]}, n_boot=10)


def test_effect_direction():
    base = {"p_holm": 0.01, "ci_median_diff": (0.1, 0.3)}
    assert effect_direction(base) == "more"
    assert effect_direction({**base, "ci_median_diff": (-0.3, -0.1)}) == "less"
    assert effect_direction({**base, "ci_median_diff": (-0.1, 0.3)}) == "n.s."
    assert effect_direction({**base, "p_holm": 0.2}) == "n.s."
    assert effect_direction({**base, "p_holm": float("nan")}) == "n/a"


def test_explicit_occurrences_drive_the_sets():
    cat = np.zeros(20, np.uint8)
    ts = token_sets(cat, occurrences=[Occurrence(3, 5, 1, 0), Occurrence(10, 11, 2, 1)], rng=0)
    np.testing.assert_array_equal(ts.indices("reflection"), [3, 4])
    np.testing.assert_array_equal(ts.indices("delimiter"), [10])
    np.testing.assert_array_equal(ts.indices("phrase:1"), [10])
