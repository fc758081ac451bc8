"""`compare` on update arrays end to end on tiny-reasoner: per-layer table, controls, fit, plots."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cache import open_cache
from probes.reasoner.train import SAMPLES_PATH
from probes.run import main

MODEL = ["--model", "tiny-reasoner", "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    """The first 16 sample traces of tiny-reasoner."""
    path = tmp_path_factory.mktemp("cmpupd") / "t.jsonl"
    path.write_text("".join(SAMPLES_PATH.read_text().splitlines(keepends=True)[:16]))
    return path


def _updates(traces, out, *extra) -> None:
    assert main(["updates", *MODEL, "--traces", str(traces), "--resume", "--out", str(out),
                 *extra]) == 0


@pytest.fixture(scope="module")
def caches(traces):
    """`only`: updates of the trained model on 8 traces; `rand`: the random-init control's on 2
    (enough to be refused as the main cache)."""
    only, rand = traces.parent / "only.h5", traces.parent / "rand2.h5"
    _updates(traces, only, "--limit", "8")
    _updates(traces, rand, "--limit", "2", "--control", "random-init")
    return {"only": only, "rand": rand}


@pytest.fixture(scope="module")
def full(traces):
    """All 16 traces: L̂ + updates of the trained model in run.h5, the random-init control in
    rand.h5 (the fit of ΔL̂ needs them all: the slow tests only)."""
    run, rand = traces.parent / "run.h5", traces.parent / "rand.h5"
    assert main(["lhat", *MODEL, "--traces", str(traces), "--resume", "--out", str(run)]) == 0
    _updates(traces, run)
    _updates(traces, rand, "--control", "random-init")
    return {"run": run, "rand": rand}


def _report(capsys, *argv) -> dict:
    capsys.readouterr()
    assert main(["compare", *argv, "--json", "--n-boot", "200"]) == 0
    return json.loads(capsys.readouterr().out)


def test_updates_store_the_labels_compare_needs(caches):
    with open_cache(caches["only"]) as reader:
        tr = next(iter(reader))
        names = tr.names()
        a, b = tr.spans["trajectory"]
        assert {"phrase_id", "phrase_first", "paragraph_start"} <= set(names)
        assert tr["paragraph_start"].shape == (b - a,)
        assert tr["phrase_id"].shape == tr.tokens.shape


@pytest.mark.slow  # L̂ + updates of two models on 16 traces, then compare's table and fit on them
def test_table_with_random_init_control(full, capsys):
    caches = full
    rep = _report(capsys, str(caches["run"]), "--control", str(caches["rand"]))
    upd = rep["updates"]
    n_layers, metrics = upd["n_layers"], upd["metrics"]
    assert n_layers == 4 and {"upd_contrib", "upd_loo", "upd_sigma_gate"} <= set(metrics)
    rows = upd["comparison"]["rows"]
    # 5 pairs: two matched category rows, reflection vs delimiter / paragraph_initial, the null
    # (position_matched is no row: anti-conservative, docs/statistics.md)
    assert len(rows) == len(metrics) * (n_layers + 1) * 5
    assert not any("position_matched" in (r["a"], r["b"]) for r in rows)
    assert upd["comparison"]["meta"]["n_tests"] == len(rows)
    assert {r["layer"] for r in rows} == {0, 1, 2, 3, "pooled"}
    for r in rows:
        assert r["control"] is not None and r["control"]["a"] == r["a"]
        if r["effect"] in ("more", "less"):
            assert isinstance(r["reproduced_by_random_init"], bool)
            assert r["reproduced_by_random_init"] == (r["control_effect"] == r["effect"])
            lo, hi = r["ci_median_diff"]
            assert (lo > 0) if r["effect"] == "more" else (hi < 0)
            assert r["p_holm"] < 0.05
    # the trained and control tables are different numbers on the same token sets
    r = next(r for r in rows if r["metric"] == "upd_sigma_gate" and r["layer"] == "pooled"
             and r["a"] == "reflection" and r["b"] == "matched_to_reflection")
    assert r["n_traces"] == r["control"]["n_traces"]
    assert r["median_a"] != r["control"]["median_a"]
    # pooled sigma of a trace = mean over layers, aggregated: check one value by hand
    with open_cache(caches["run"]) as reader:
        vals = [np.asarray(tr["upd_sigma_gate"][:], np.float64) for tr in reader]
    assert r["median_b"] < max(v.max() for v in vals)
    fit = rep["fit"]["fits"]
    assert set(fit) == {"delta", "abs_delta"}
    for f in fit.values():
        assert {"full", "controls+mechanism", "controls+mechanism_random"} <= set(f["r2"])
        assert {"categories", "categories_shuffled", "categories_random"} <= set(f["partial_r2"])
        assert f["n_traces"] == 16


def test_updates_only_cache_has_no_lhat_part(caches, capsys):
    rep = _report(capsys, str(caches["only"]), "--update-metrics", "upd_loo", "upd_sigma_gate",
                  "--no-fit")
    assert "table" not in rep and "fit" not in rep
    assert rep["updates"]["metrics"] == ["upd_loo", "upd_sigma_gate"]
    assert rep["updates"]["n_traces"] == 8


@pytest.mark.slow  # the same 16-trace caches, with every plot
def test_text_report_and_plots(full, tmp_path, capsys):
    caches = full
    capsys.readouterr()
    assert main(["compare", str(caches["run"]), "--control", str(caches["rand"]), "--n-boot",
                 "100", "--plots", str(tmp_path / "plots"), "--layers", "all"]) == 0
    out = capsys.readouterr().out
    assert "per-token implicit updates" in out and "random-init" in out
    assert "partial R² of categories" in out
    for name in ("heatmap_upd_sigma_gate.png", "heatmap_upd_sigma_gate_ratio.png",
                 "heatmap_upd_sigma_gate_random_init.png", "heatmap_upd_loo.png"):
        assert (tmp_path / "plots" / name).stat().st_size > 1000
    assert list((tmp_path / "plots").glob("steps_upd_sigma_gate_*.png"))


@pytest.mark.parametrize("which", ["control_is_trained", "main_is_control", "unknown_metric"])
def test_bad_control_or_metric_is_one_line_error(caches, capsys, which):
    argv = {
        "control_is_trained": [str(caches["only"]), "--control", str(caches["only"])],
        "main_is_control": [str(caches["rand"])],
        "unknown_metric": [str(caches["only"]), "--update-metrics", "upd_nope"],
    }[which]
    capsys.readouterr()
    assert main(["compare", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    expected = {"control_is_trained": "--control random-init",
                "main_is_control": "pass this one as --control",
                "unknown_metric": "upd_nope"}[which]
    assert expected in err[0]


def test_layers_subset_is_stored_labelled_and_enforced(traces, caches, tmp_path, capsys):
    sub = tmp_path / "sub.h5"
    argv = ["updates", "--resume", *MODEL, "--traces", str(traces), "--out", str(sub), "--limit", "8"]
    assert main([*argv, "--layers", "1", "3"]) == 0
    with open_cache(sub) as a, open_cache(caches["only"]) as b:
        for ta, tb in zip(a, b, strict=True):
            assert json.loads(ta.attrs["upd_layers"]) == [1, 3]
            for name in ("upd_sigma_gate", "upd_m7", "upd_loo"):
                np.testing.assert_array_equal(ta[name][:], tb[name][:][[1, 3]])
    rep = _report(capsys, str(sub), "--no-fit")
    assert rep["updates"]["layers"] == [1, 3]
    assert {r["layer"] for r in rep["updates"]["comparison"]["rows"]} == {1, 3, "pooled"}
    capsys.readouterr()
    assert main([*argv, "--layers", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds update arrays of layers [1, 3]" in err[0]


def test_control_with_other_answer_rows_is_refused(traces, caches, tmp_path, capsys):
    rand_mean = tmp_path / "rand_mean.h5"
    assert main(["updates", "--resume", *MODEL, "--traces", str(traces), "--out", str(rand_mean), "--limit",
                 "8", "--control", "random-init", "--answer-rows", "mean"]) == 0
    capsys.readouterr()
    assert main(["compare", str(caches["only"]), "--control", str(rand_mean), "--no-fit"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "different --answer-rows" in err[0]
