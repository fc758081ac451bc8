"""The headline findings of the demo and the report: n, matched and random-init baselines, the
calibrated p and the MDE read from the stored power grid; "not testable at this n" below the floor."""

from __future__ import annotations

import math

import pytest

from analyses.calibration import mde_at
from probes.readouts.calibration import mde_text, power_table

GRID = [{"n_traces": n, "effect": e, "power": p}
        for n, cells in {50: [(0.5, 0.3), (1.0, 0.9)], 100: [(0.5, 0.6), (1.0, 1.0)]}.items()
        for e, p in cells]


def test_mde_at_uses_the_largest_measured_size_not_above_n():
    assert mde_at(GRID, 10)["n_measured"] is None
    m = mde_at(GRID, 70)
    assert m["n_measured"] == 50 and m["mde"] == pytest.approx(0.5 + 0.5 * 0.5 / 0.6)
    assert mde_at(GRID, 100)["mde"] == pytest.approx(0.5 + 0.5 * 0.2 / 0.4)
    low = mde_at([g for g in GRID if g["effect"] == 0.5], 60)
    assert math.isnan(low["mde"]) and low["max_effect"] == 0.5


def test_mde_text_reads_the_stored_power_grid():
    t = power_table()
    assert t["test"] == "upd_sigma_gate pooled reflection vs matched_to_reflection"
    want = mde_at(t["grid"], 200)["mde"]
    assert mde_text(200) == (f"MDE at 80% power: +{want:.0%} at 200 traces (planted-effect power "
                             "of upd_sigma_gate, docs/statistics.md)")
    assert mde_text(3).startswith("power not measured below 10 traces")
    assert "(the largest measured size ≤ 70)" in mde_text(70)


def _row(**kw):
    row = {"a": "reflection", "b": "matched_to_reflection", "n_traces": 30, "median_a": 2.0,
           "median_b": 1.0, "median_diff": 1.0, "ci_median_diff": [0.5, 1.5], "cliffs_delta": 0.4,
           "p": 0.001, "p_holm": 0.004, "testable": True, "note": ""}
    return {**row, **kw}


def test_demo_headline_states_n_baselines_p_and_mde():
    from probes.demo.run import _headline_lines, _verdict

    lh = {"n_traces": 50, "wilcoxon_p": 0.01, "median_change": -1.0,
          "median_change_ci": [-2.0, -0.5], "share_falling": 0.9, "naive_max_abs_diff": 1e-6}
    row = _row()
    rv = {"metric": "mean |dL|", "n_traces": 30, "median_reflection": 2.0, "median_ordinary": 1.0,
          "median_diff": 1.0, "median_diff_ci": [0.5, 1.5], "cliffs_delta": 0.4, "p_holm": 0.004,
          "reflections_move_lhat": _verdict(row)}
    upd = {"n_traces": 50, "headline": [{
        "metric": "upd_sigma_gate", "a": "reflection", "b": "matched_to_reflection", "n_traces": 30,
        "median_a": 3.0, "median_b": 2.0, "median_diff": 1.0, "ci_median_diff": [0.2, 1.2],
        "cliffs_delta": 0.3, "p_holm": 0.02, "effect": "more", "control_effect": "n.s.",
        "reproduced_by_random_init": False}]}
    lines = _headline_lines(lh, rv, {"rows": [row]}, upd)
    assert len(lines) == 3
    assert ("n = 30 traces): 2 vs 1 (matched baseline)" in lines[1]
            and "p 0.001 (sign-flip permutation; Holm 0.004): reflections move L̂ more" in lines[1]
            and "random-init baseline: not measured for L̂; " + mde_text(50) in lines[1])
    assert ("(pooled layers, n = 30 traces): 3 vs 2 (matched baseline)" in lines[2]
            and "Holm p 0.02 (sign-flip permutation): more; random-init baseline: random-init "
            "model n.s.; " + mde_text(50) in lines[2])
    below = _row(n_traces=5, testable=False, note="n = 5: too few traces for inference",
                 ci_median_diff=[None, None], p=None, p_holm=None)
    rv5 = {**rv, "n_traces": 5, "reflections_move_lhat": _verdict(below)}
    upd5 = {"n_traces": 50, "headline": [{**upd["headline"][0], "n_traces": 5,
                                          "effect": "not testable"}]}
    lines = _headline_lines(lh, rv5, {"rows": [below]}, upd5)
    assert lines[1].endswith(": not testable at this n (n = 5: too few traces for inference)")
    assert lines[2].endswith(": not testable at this n (n = 5: too few traces for inference)")
    assert not any("MDE" in x or "p 0" in x for x in lines[1:])


def test_report_headline_states_n_baselines_p_and_mde():
    from probes.readouts.report.sections import headline_lines

    counts = {"n_traces": 50, "model": "m", "tokens": 1000, "reflection": 40, "delimiter": 20,
              "with_reflection": 30}
    upd_row = {**_row(), "metric": "upd_sigma_gate", "layer": "pooled", "effect": "more",
               "control": {**_row(median_diff=0.25)}, "control_effect": "more",
               "reproduced_by_random_init": True}
    low = {**_row(n_traces=4, testable=False, note="n = 4: too few traces for inference"),
           "metric": "upd_loo", "layer": "pooled", "effect": "not testable", "control": None,
           "control_effect": None, "reproduced_by_random_init": None}
    compare = {"n_traces": 50,
               "trend": {"share_falling": 0.9, "median_change": -1.0},
               "table": {"rows": [_row()], "meta": {"metric": "abs_delta", "statistic": "mean"}},
               "updates": {"control": "rand.h5", "comparison": {"rows": [upd_row, low]}}}
    lines = headline_lines(counts, compare)
    assert lines[2] == ("reflection vs matched_to_reflection tokens, per-trace mean |ΔL̂| (30 "
                        "traces): 2 vs 1 (matched_to_reflection, the matched baseline): difference "
                        "1 [0.5, 1.5], p 0.001 (sign-flip permutation), Holm p 0.004; random-init "
                        "baseline: not measured for L̂; " + mde_text(50))
    assert ("random-init baseline: difference 0.25, more; " + mde_text(50)) in lines[4]
    assert lines[4].startswith("  upd_sigma_gate: reflection tokens more than ordinary; ")
    assert lines[5] == ("  not testable at this n: upd_loo (reflection vs matched_to_reflection, "
                        "pooled: below the floor on inference)")
