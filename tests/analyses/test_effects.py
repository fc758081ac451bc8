"""V7 statistics, the headline table and the scatter plot (`analyses.effects`)."""

from __future__ import annotations

import numpy as np

from analyses.effects import TraceEffects, agreement, headline, scatter_plot, v7_table


def _traces(n: int = 6, seed: int = 0) -> list[TraceEffects]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        pred = rng.normal(size=12)
        cat = np.array(["reflection", "delimiter", "ordinary"] * 4, dtype=object)
        shift = np.where(cat == "reflection", 1.0, 0.0)
        out.append(TraceEffects(f"t{i}", {
            "eff_dl_attn": pred * 1.1 + shift, "eff_pred_m7": pred,
            "eff_dl_mlp": -pred, "eff_pred_m6": pred}, cat))
    return out


def test_agreement_figures():
    real = np.array([1.0, 2.0, 4.0, -1.0])
    r = agreement(real, real * 1.5)
    assert r["n"] == 4 and abs(r["pearson"] - 1) < 1e-12 and abs(r["spearman"] - 1) < 1e-12
    assert abs(r["median_rel_err"] - 0.5) < 1e-12 and r["sign_agree"] == 1.0
    r = agreement(real, -real)
    assert r["pearson"] < -0.999 and r["sign_agree"] == 0.0
    r = agreement(np.array([0.0, np.nan]), np.array([1.0, 1.0]))
    assert r["n"] == 1 and np.isnan(r["pearson"]) and np.isnan(r["median_rel_err"])


def test_v7_table_and_headline():
    traces = _traces()
    t = v7_table(traces)
    assert t["mlp"]["all"]["pearson"] < -0.999            # removal predicted with the wrong sign
    assert t["attn"]["ordinary"]["pearson"] > 0.999 and t["attn"]["all"]["n"] == 72
    h = headline(traces, n_boot=200)
    refl, ordi = h["attn"]["reflection"], h["attn"]["ordinary"]
    assert refl["n_traces"] == 6 and refl["n_pairs"] == 24
    per_trace = [np.mean(tr.arrays["eff_dl_attn"][tr.category == "reflection"]) for tr in traces]
    assert abs(refl["mean"] - np.mean(per_trace)) < 1e-12
    assert refl["ci_low"] <= refl["mean"] <= refl["ci_high"]
    assert refl["mean"] - ordi["mean"] > 0.5


def test_scatter_plot_writes_a_png(tmp_path):
    p = scatter_plot(_traces(), tmp_path / "x" / "s.png", title="t")
    assert p.read_bytes()[:4] == b"\x89PNG"
