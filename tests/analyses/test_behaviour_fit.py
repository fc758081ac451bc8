"""ΔL̂ explained by mechanistic features: planted signals are recovered, nulls stay near 0."""

from __future__ import annotations

import numpy as np
import pytest

from analyses.behaviour_fit import behaviour_design, fit_behaviour, format_fit
from analyses.token_sets import token_sets


def _data(*, n_traces=40, T=50, mech_coef=1.0, cat_coef=0.0, seed=0):
    """Traces whose ΔL̂ = mech_coef · metric[layer 1] + cat_coef · reflection + noise."""
    rng = np.random.default_rng(seed)
    gen = np.random.default_rng(seed + 1)
    lhat, values, sets, toks, para = [], [], [], [], []
    for _ in range(n_traces):
        cat = np.zeros(T, np.uint8)
        cat[rng.choice(T, size=5, replace=False)] = 1
        cat[rng.choice(np.flatnonzero(cat == 0), size=2, replace=False)] = 2
        v = rng.normal(size=(2, T))
        d = mech_coef * v[1] + cat_coef * (cat == 1) + rng.normal(scale=0.5, size=T)
        lhat.append(np.concatenate([[10.0], 10.0 + np.cumsum(d)]))
        values.append(v)
        sets.append(token_sets(cat, rng=gen))
        toks.append(rng.integers(0, 30, size=T))
        para.append(np.zeros(T, bool))
    return lhat, {"upd_m": values}, sets, toks, para


def test_design_columns_and_target():
    lhat, values, sets, toks, para = _data(n_traces=3, T=10)
    d = behaviour_design(lhat, values, sets, toks, para)
    assert d.y.shape == (30,) and d.mechanism.shape == (30, 2) and d.categories.shape == (30, 2)
    np.testing.assert_allclose(d.y[:10], np.diff(lhat[0]))
    np.testing.assert_allclose(d.mechanism[:10], values["upd_m"][0].T)
    np.testing.assert_array_equal(d.categories[:10, 0], sets[0].labels == 1)
    np.testing.assert_array_equal(d.groups, np.repeat([0, 1, 2], 10))
    assert d.names["mechanism"] == ["upd_m[L0]", "upd_m[L1]"]
    a = behaviour_design(lhat, values, sets, toks, para, target="abs_delta")
    np.testing.assert_allclose(a.y, np.abs(d.y))
    with pytest.raises(ValueError, match="target must be"):
        behaviour_design(lhat, values, sets, toks, para, target="rho")


def test_mechanism_signal_without_category_effect():
    d = behaviour_design(*_data(mech_coef=1.0, cat_coef=0.0))
    fit = fit_behaviour(d, n_boot=300)
    assert fit.r2["controls+mechanism"] > 0.7          # 1 / (1 + 0.25) = 0.8 expected
    assert fit.partial_r2["mechanism"] > 0.7
    assert abs(fit.partial_r2["categories"]) < 0.02
    lo, hi = fit.ci["categories"]
    assert lo < 0.01 and hi < 0.03
    assert abs(fit.r2["controls"]) < 0.05
    assert "partial R² of categories" in format_fit(fit)


def test_category_signal_beyond_mechanism_and_the_shuffled_null():
    d = behaviour_design(*_data(mech_coef=1.0, cat_coef=1.5))
    fit = fit_behaviour(d, n_boot=300)
    assert fit.partial_r2["categories"] > 0.2
    assert fit.ci["categories"][0] > 0.1
    assert abs(fit.partial_r2["categories_shuffled"]) < 0.03


def test_random_init_mechanism_control():
    lhat, values, sets, toks, para = _data(mech_coef=1.0)
    d = behaviour_design(lhat, values, sets, toks, para)
    rng = np.random.default_rng(5)
    noise = {"upd_m": [rng.normal(size=v.shape) for v in values["upd_m"]]}
    ctrl = behaviour_design(lhat, noise, sets, toks, para).mechanism
    fit = fit_behaviour(d, control_mechanism=ctrl, n_boot=200)
    assert fit.r2["controls+mechanism"] > 0.7
    assert fit.r2["controls+mechanism_random"] < 0.05
    with pytest.raises(ValueError, match="random-init mechanism block has shape"):
        fit_behaviour(d, control_mechanism=ctrl[:, :1], n_boot=10)


def test_needs_two_traces():
    lhat, values, sets, toks, para = _data(n_traces=1)
    d = behaviour_design(lhat, values, sets, toks, para)
    with pytest.raises(ValueError, match="at least 2 traces"):
        fit_behaviour(d)
