"""Tests for `probes.measures.fits.pseudo_gradient` / `thought_patch` (docs/methods.md#m12).

Seeded random-init Qwen2 / Llama / Qwen3 models (fp32, GQA 4:2, random q/k/v/o biases and RMSNorm γ)
built in code with the byte tokenizer, synthetic planted / null regressions, and the built-in
tiny-reasoner on a few of its own traces; no files besides the package data, no network.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from sklearn.linear_model import Ridge
from sklearn.model_selection import KFold
from transformers import AutoModelForCausalLM

from hooks.model import LoadedModel
from probes import DATA_DIR
from probes.measures.fits.fitting import FitError
from probes.measures.fits.pseudo_gradient import (
    PseudoGradientSamples,
    fit_pseudo_gradient,
    pseudo_gradient_samples,
)
from probes.measures.fits.thought_patch import (
    endpoint_inputs,
    fit_static_patch,
    thought_patch_fit,
    thought_patch_nll,
    thought_patch_samples,
)
from probes.measures.updates.attention import capture_query, o_proj_weights, token_updates
from probes.measures.updates.mlp import capture_rows, layer_weights, restricted_inputs
from probes.models.load import boot_model, load_model
from probes.models.tiny import TINY_FAMILIES, byte_tokenizer, tiny_config
from probes.traces.read import Trace, read_traces
from probes.traces.tokenize import tokenize_trace, tokenize_traces

F64 = torch.float64
REASONER_TRACES = DATA_DIR / "tiny_reasoner_traces.jsonl"


def _build(family: str, seed: int = 0) -> LoadedModel:
    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(tiny_config(family), attn_implementation="eager")
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if name.endswith("proj.bias"):
                param.normal_(0.0, 0.2)
            elif name.endswith("layernorm.weight"):
                param.normal_(1.0, 0.3)
    return boot_model(hf, byte_tokenizer(), spec="tiny-fits", device="cpu", dtype="float32")


def _trace(question: str, trajectory: str, answer: str, tid: str = "t0"):
    """Byte-tokenized trace: default prompt, RaML scaffold (26 bytes), answer + "}"."""
    return tokenize_trace(Trace(id=tid, question=question, trajectory=trajectory, answer=answer,
                                meta={}, line_no=1), byte_tokenizer())


TRACES = [
    ("1+2?", "Start: 1. Add 2, get 3. Done.", "3"),
    ("5-1?", "Five minus one is four.", "4"),
    ("2*3?", "Two times three: six!", "6"),
]


@pytest.fixture(scope="module", params=sorted(TINY_FAMILIES))
def tiny(request):
    """(family, loaded model, tokenized traces)."""
    tts = [_trace(q, t, a, f"t{i}") for i, (q, t, a) in enumerate(TRACES)]
    return request.param, _build(request.param), tts


def _rel(a, b) -> float:
    a, b = torch.as_tensor(np.asarray(a)).double(), torch.as_tensor(np.asarray(b)).double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# --------------------------------------------------------------------------------------------------
# (a) pseudo-gradient samples: exactness


def test_samples_target_norm_is_loo_sum_norm(tiny):
    _, loaded, tts = tiny
    tt = tts[0]
    s = pseudo_gradient_samples(loaded, tt)
    t0, t1 = tt.spans["trajectory"]
    assert s.query == tt.spans["answer"][0] - 1
    assert list(s.positions) == list(range(t0, t1)) and s.n_trajectory == t1 - t0
    L, d = loaded.arch.n_layers, loaded.arch.d_model
    assert s.y.shape == s.x.shape == s.xv.shape == (L, t1 - t0, d)
    assert s.y.dtype == np.float32
    upd = token_updates(loaded, torch.as_tensor(tt.ids), s.query)
    np.testing.assert_allclose(np.linalg.norm(s.y.astype(np.float64), axis=-1),
                               upd.loo_sum_norm[:, t0:t1], rtol=1e-5, atol=1e-7)
    assert (np.linalg.norm(s.y, axis=-1) > 0).all()


def test_samples_regressors_equal_direct_per_head_sums(tiny):
    """x_t = Σ_h W_O^h v_{g(h),t} (k̃_{g(h),t}·q̃_h)/√d_h and xv_t = Σ_h W_O^h v_{g(h),t}, by loop."""
    _, loaded, tts = tiny
    tt = tts[1]
    s = pseudo_gradient_samples(loaded, tt)
    cap = capture_query(loaded, torch.as_tensor(tt.ids), s.query)
    weights = o_proj_weights(loaded)
    for layer in range(loaded.arch.n_layers):
        w_o = weights[layer][0].detach().double()
        q = cap.rot_q[layer].double()                          # [H, d_h]
        k, v = cap.rot_k[layer].double(), cap.v[layer].double()    # [T, H_kv, d_h]
        H, d_h = q.shape
        G = H // k.shape[1]
        x = torch.zeros(len(s.positions), w_o.shape[0], dtype=F64)
        xv = torch.zeros_like(x)
        for h in range(H):
            w_h = w_o[:, h * d_h:(h + 1) * d_h]                 # W_O^h [d, d_h]
            for i, t in enumerate(s.positions):
                wv = w_h @ v[t, h // G]
                x[i] += wv * float(k[t, h // G] @ q[h]) / math.sqrt(d_h)
                xv[i] += wv
        assert _rel(s.x[layer], x) <= 1e-5
        assert _rel(s.xv[layer], xv) <= 1e-5


def test_samples_subsample_layers_and_rng(tiny):
    _, loaded, tts = tiny
    tt = tts[0]
    full = pseudo_gradient_samples(loaded, tt)
    sub = pseudo_gradient_samples(loaded, tt, layers=[1], max_tokens=5, rng=3)
    again = pseudo_gradient_samples(loaded, tt, layers=[1], max_tokens=5, rng=3)
    assert sub.y.shape == (1, 5, loaded.arch.d_model) and list(sub.layers) == [1]
    assert (np.diff(sub.positions) > 0).all() and set(sub.positions) <= set(full.positions)
    assert list(again.positions) == list(sub.positions)
    idx = [list(full.positions).index(p) for p in sub.positions]
    np.testing.assert_allclose(sub.y[0], full.y[1, idx], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(sub.x[0], full.x[1, idx], rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------------------------------
# (a) the fits on synthetic data


def _synthetic(n_traces: int, n_tok: int, d: int, make_y, seed: int = 0,
               n_layers: int = 1) -> list[PseudoGradientSamples]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n_traces):
        x = rng.normal(size=(n_layers, n_tok, d))
        xv = rng.normal(size=(n_layers, n_tok, d))
        y = make_y(x, rng, i)
        out.append(PseudoGradientSamples(
            trace_id=f"s{i}", query=0, positions=np.arange(n_tok), layers=np.arange(n_layers),
            y=y.astype(np.float32), x=x.astype(np.float32), xv=xv.astype(np.float32)))
    return out


def test_fit_recovers_planted_eta():
    eta = 0.37
    samples = _synthetic(6, 60, 8, lambda x, rng, i: eta * x + 0.02 * rng.normal(size=x.shape),
                         n_layers=2)
    fit = fit_pseudo_gradient(samples, n_splits=3)
    assert fit.n_splits == 3 and fit.eta_folds.shape == (2, 3)
    np.testing.assert_allclose(fit.eta, eta, rtol=5e-3)
    np.testing.assert_allclose(fit.eta_folds, eta, rtol=1e-2)
    assert (fit.r2_scalar > 0.99).all() and (fit.r2_scalar_in > 0.99).all()
    assert (fit.r2_map > 0.99).all() and (fit.r2_map_in > 0.99).all()
    assert (fit.cos_xy > 0.99).all()
    # xv is independent of y: the value-only baselines explain nothing out of sample
    assert (fit.r2_value_map <= 0.05).all() and (fit.r2_value_scalar <= 0.05).all()
    assert np.abs(fit.eta_value).max() < 0.05
    d = json.loads(json.dumps(fit.to_dict(), allow_nan=False))
    assert d["trace_ids"] == [f"s{i}" for i in range(6)] and len(d["r2_map"]) == 2


def test_fit_null_case_has_no_heldout_r2():
    samples = _synthetic(5, 80, 8, lambda x, rng, i: rng.normal(size=x.shape), seed=1)
    fit = fit_pseudo_gradient(samples)
    assert fit.n_splits == 5
    for name in ("r2_scalar", "r2_map", "r2_value_map", "r2_value_scalar"):
        assert getattr(fit, name)[0] <= 0.05, name
    assert abs(fit.eta[0]) < 0.05
    assert fit.r2_map_in[0] <= 0.05 and fit.r2_scalar_in[0] <= 0.05
    assert fit.alpha_map[0] >= 10.0                      # RidgeCV shrinks the useless map


def test_fit_groups_by_trace():
    """Trace-specific signature → trace-specific target: learnable only if a trace leaks."""
    d, n_traces, n_tok = 8, 8, 30
    rng = np.random.default_rng(2)
    sig, tgt = rng.normal(size=(n_traces, d)), rng.normal(size=(n_traces, d))
    samples = []
    for i in range(n_traces):
        x = sig[i] + 0.01 * rng.normal(size=(1, n_tok, d))
        y = tgt[i] + 0.01 * rng.normal(size=(1, n_tok, d))
        samples.append(PseudoGradientSamples(
            trace_id=f"g{i}", query=0, positions=np.arange(n_tok), layers=np.arange(1),
            y=y.astype(np.float32), x=x.astype(np.float32), xv=x.astype(np.float32)))
    fit = fit_pseudo_gradient(samples, n_splits=4)
    flat = sorted(t for fold in fit.fold_traces for t in fold)
    assert flat == list(range(n_traces)) and len(fit.fold_traces) == 4   # a partition of traces
    assert fit.r2_map[0] < 0.3
    # the same Ridge with token-level (ungrouped) folds is wildly optimistic: the test can tell
    X = np.concatenate([s.x[0] for s in samples]).astype(np.float64)
    Y = np.concatenate([s.y[0] for s in samples]).astype(np.float64)
    sse = sst = 0.0
    for tr, te in KFold(4, shuffle=True, random_state=0).split(X):
        pred = Ridge(alpha=1e-6, fit_intercept=False).fit(X[tr], Y[tr]).predict(X[te])
        sse += ((Y[te] - pred) ** 2).sum()
        sst += ((Y[te] - Y[tr].mean(0)) ** 2).sum()
    assert 1 - sse / sst > 0.9


def test_fit_rejects_bad_input():
    one = _synthetic(1, 10, 4, lambda x, rng, i: x)
    with pytest.raises(FitError, match="at least 2 traces"):
        fit_pseudo_gradient(one)
    two = _synthetic(2, 10, 4, lambda x, rng, i: x)
    with pytest.raises(FitError, match="alphas must be positive"):
        fit_pseudo_gradient(two, alphas=[0.0])
    bad = dataclasses.replace(two[1], layers=np.array([3]))
    with pytest.raises(FitError, match="same model and layers"):
        fit_pseudo_gradient([two[0], bad])
    with pytest.raises(FitError, match="share one"):
        PseudoGradientSamples(trace_id="x", query=0, positions=np.arange(3), layers=np.arange(1),
                              y=np.zeros((1, 3, 4)), x=np.zeros((1, 3, 5)), xv=np.zeros((1, 3, 4)))


def test_samples_reject_empty_trajectory(tiny):
    _, loaded, tts = tiny
    tt = tts[0]
    t1 = tt.spans["trajectory"][1]
    spans = dict(tt.spans, prompt=(0, t1), trajectory=(t1, t1))
    empty = dataclasses.replace(tt, spans=spans)
    with pytest.raises(FitError, match="empty trajectory.*Drop such traces"):
        pseudo_gradient_samples(loaded, empty)
    with pytest.raises(FitError, match="empty trajectory"):
        thought_patch_fit(loaded, empty)
    with pytest.raises(FitError, match="max_tokens"):
        pseudo_gradient_samples(loaded, tt, max_tokens=0)
    with pytest.raises(FitError, match="layers"):
        pseudo_gradient_samples(loaded, tt, layers=[loaded.arch.n_layers])
    with pytest.raises(FitError, match="'gate' or 'up'"):
        thought_patch_fit(loaded, tt, which="down")
    no_rows = dataclasses.replace(tt, ids=tt.ids[:t1],
                                  spans=dict(tt.spans, scaffold=(t1, t1), answer=(t1, t1)))
    with pytest.raises(FitError, match="no rows after its trajectory"):
        thought_patch_samples(loaded, no_rows)


# --------------------------------------------------------------------------------------------------
# (b) static thought patch


def test_static_patch_planted_linear_case():
    rng = np.random.default_rng(0)
    K, d, d_out = 60, 8, 12
    delta = rng.normal(size=(d_out, d))
    x = rng.normal(size=(K, d))
    fit = fit_static_patch(x, x @ delta.T, alpha=1e-9)
    assert fit.k == K and fit.n_splits == 5 and fit.delta.shape == (d_out, d)
    assert fit.r2_heldout > 0.9999 and fit.r2_in > 0.9999
    assert _rel(fit.delta, delta) <= 1e-5
    assert fit.fro == pytest.approx(float(np.linalg.norm(delta)), rel=1e-5)
    # a null case: Y independent of X ⇒ no held-out R²
    null = fit_static_patch(x, rng.normal(size=(K, d_out)), alpha=1e-2)
    assert null.r2_heldout <= 0.05
    with pytest.raises(FitError, match="at least 2 calibration queries"):
        fit_static_patch(x[:1], x[:1] @ delta.T)
    with pytest.raises(FitError, match="alpha"):
        fit_static_patch(x, x @ delta.T, alpha=0.0)


def test_thought_patch_inputs_match_restricted_and_exact_patch(tiny):
    """u', u = restricted_inputs endpoints; each exact per-row patch restores the captured W u."""
    _, loaded, tts = tiny
    tt = tts[0]
    t0, t1 = tt.spans["trajectory"]
    rows = list(range(t1, tt.n_tokens))
    weights = layer_weights(loaded)
    cap = capture_rows(loaded, torch.as_tensor(tt.ids), rows)
    for which, site in (("gate", "mlp_pre"), ("up", "mlp_pre_linear")):
        s = thought_patch_samples(loaded, tt, which=which)
        assert list(s.rows) == rows and s.x.shape == (loaded.arch.n_layers, len(rows),
                                                      loaded.arch.d_model)
        for layer, w in enumerate(weights):
            m, u = restricted_inputs(cap, w, layer, range(t0, t1))
            e = endpoint_inputs(cap, w, layer, (t0, t1))
            assert _rel(e["u_base"], u[:, 0]) <= 1e-10 and _rel(e["u"], u[:, -1]) <= 1e-10
            assert _rel(e["m_base"], m[:, 0]) <= 1e-10 and _rel(e["m"], m[:, -1]) <= 1e-10
            assert _rel(s.x[layer], u[:, 0]) <= 1e-12 and _rel(s.u[layer], cap.ln2_out[layer]) <= 1e-5
            wm = w.w_gate if which == "gate" else w.w_up
            target = getattr(cap, site)[layer].double()
            for k in range(len(rows)):
                xk, yk = torch.from_numpy(s.x[layer, k]), torch.from_numpy(s.y[layer, k])
                dw = torch.outer(yk, xk) / xk.dot(xk)                  # Dherin ΔW_k, rank 1
                assert _rel((wm + dw) @ xk, target[k]) <= 1e-5
                assert _rel(wm @ xk, target[k]) > 1e-3                 # the trajectory mattered


def test_thought_patch_interpolates_when_k_le_d(tiny):
    _, loaded, tts = tiny
    tt = tts[1]
    s = thought_patch_samples(loaded, tt, which="gate")
    K, d = s.x.shape[1], s.x.shape[2]
    assert 2 <= K <= d
    fit = thought_patch_fit(loaded, tt, which="gate", alpha=1e-10, keep_delta=True)
    assert fit.k == K and fit.r2_heldout.shape == (loaded.arch.n_layers,)
    for layer in range(loaded.arch.n_layers):
        assert fit.r2_in[layer] > 0.9999
        assert _rel(s.x[layer] @ fit.deltas[layer].T, s.y[layer]) <= 1e-3
    np.testing.assert_allclose(
        fit.exact_fro_mean,
        (np.linalg.norm(s.y, axis=-1) / np.linalg.norm(s.x, axis=-1)).mean(-1), rtol=1e-12)
    assert "deltas" not in json.loads(json.dumps(fit.to_dict(), allow_nan=False))


def test_thought_patch_nll_exact_and_interpolating_static(tiny):
    name, loaded, tts = tiny
    tt = tts[2]
    res = thought_patch_nll(loaded, tt, alpha=1e-10)
    assert res.max_logit_err_exact < 1e-4, name                 # V5b through this code path
    assert res.nll_exact == pytest.approx(res.nll_clean, abs=1e-4)
    assert abs(res.nll_masked - res.nll_clean) > 1e-3           # masking matters
    assert res.nll_static == pytest.approx(res.nll_clean, abs=1e-3)   # K ≤ d: in-sample interp.
    assert (res.r2_rows_gate > 0.9999).all() and (res.r2_rows_up > 0.9999).all()
    bias = thought_patch_nll(loaded, tt, alpha=1e-10, down="bias")
    assert bias.nll_exact == pytest.approx(res.nll_clean, abs=1e-4)
    with pytest.raises(FitError, match="fit_rows"):
        thought_patch_nll(loaded, tt, fit_rows=[0])


# --------------------------------------------------------------------------------------------------
# tiny-reasoner end to end


@pytest.fixture(scope="module")
def reasoner():
    loaded = load_model("tiny-reasoner", device="cpu")
    tts, _ = tokenize_traces(list(read_traces(REASONER_TRACES))[:3], loaded.tokenizer)
    return loaded, tts


def test_tiny_reasoner_end_to_end(reasoner):
    loaded, tts = reasoner
    samples = [pseudo_gradient_samples(loaded, tt, max_tokens=40) for tt in tts]
    fit = fit_pseudo_gradient(samples)
    L = loaded.arch.n_layers
    assert fit.n_splits == 3 and sorted(t for f in fit.fold_traces for t in f) == [0, 1, 2]
    for name in ("eta", "r2_scalar", "r2_map", "r2_value_map", "r2_scalar_in", "r2_map_in"):
        v = getattr(fit, name)
        assert v.shape == (L,) and np.isfinite(v).all(), name
    assert (fit.r2_map_in >= fit.r2_map).all()
    assert (fit.r2_scalar <= 1).all() and (fit.eta > 0).all()
    tp = thought_patch_fit(loaded, tts[0])
    assert tp.k == tts[0].n_tokens - tts[0].spans["trajectory"][1]
    assert (tp.r2_in > 0.999).all() and (tp.r2_heldout < tp.r2_in).all()
    json.dumps(fit.to_dict(), allow_nan=False)
    json.dumps(tp.to_dict(), allow_nan=False)
