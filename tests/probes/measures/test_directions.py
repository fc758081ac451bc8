"""Behaviour directions (`probes.measures.effects.directions`; docs/methods.md#directions, M11)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hooks.edit import edit, mask_keys
from probes.measures.effects.directions import (
    DirectionAccumulator,
    DirectionsError,
    cosines,
    loo_residual,
    occurrence_windows,
    probe_accuracy,
    projections,
    trajectory_residuals,
)
from probes.measures.updates.alignment import answer_alignment
from tests.hooks._models import build_tiny, token_ids


def test_occurrence_windows_take_the_token_before_and_up_to_ten():
    is_cat = np.zeros(30, bool)
    is_cat[[0, 5, 6, 7, 25]] = True
    assert occurrence_windows(is_cat) == [(0, 10), (4, 15), (24, 30)]
    assert occurrence_windows(is_cat, window=2) == [(0, 2), (4, 7), (24, 27)]


def test_difference_of_means_recovers_a_planted_direction():
    """Windows of reflection occurrences carry +v: the direction is v's, scaled to ‖mean_overall‖."""
    rng = np.random.default_rng(0)
    L, d = 3, 16
    v = rng.normal(size=(L, d))
    acc = DirectionAccumulator(categories=("reflection",), window=3)
    overall, occ = [], []
    for _ in range(5):
        T = 40
        resid = rng.normal(size=(L, T, d)) * 0.01 + 2.0
        names = np.array(["ordinary"] * T, dtype=object)
        for s in rng.choice(np.arange(5, 35, 6), 3, replace=False):
            names[s] = "reflection"
            resid[:, s - 1:s + 3] += v[:, None]
        acc.add(resid, names)
        overall.append(resid.mean(1))
        occ += [resid[:, lo:hi].mean(1) for lo, hi in occurrence_windows(names == "reflection", 3)]
    u = acc.directions()["reflection"]
    mean_all = np.mean(overall, axis=0)
    want = np.mean(occ, axis=0) - mean_all
    want = want / np.linalg.norm(want, axis=-1, keepdims=True) * np.linalg.norm(mean_all, axis=-1,
                                                                                 keepdims=True)
    np.testing.assert_allclose(u, want, rtol=1e-12)
    assert np.all(cosines(u, v[0])[:1] > 0.95)        # layer 0 direction ≈ v_0
    resid = rng.normal(size=(L, 7, d))
    np.testing.assert_allclose(projections(resid, u)[1],
                               resid[1] @ (u[1] / np.linalg.norm(u[1])), rtol=1e-12)
    with pytest.raises(DirectionsError, match="no trace"):
        DirectionAccumulator().directions()


def test_loo_residual_equals_the_attention_output_change_of_a_masked_key():
    """δ^ℓ_t = W_O δz_t is exactly how much layer ℓ's attn_out at q drops when key t is masked."""
    loaded = build_tiny("llama")
    ids = token_ids(20)
    traj, answer = (3, 12), (15, 18)
    al = answer_alignment(loaded, ids, traj, answer, keep_factors=True, m6_rows=[0])
    q, layer, t = answer[0] - 1, 1, 4
    w_o = loaded.hf_model.model.layers[layer].self_attn.o_proj.weight
    delta = loo_residual(al.factors[layer]["dz"][0], w_o)            # [T, d] at row q
    seen = {}

    def keep(name):
        def fn(act, hook):
            seen[name] = act[0, q].detach().double().clone()
        return fn

    with torch.no_grad():
        with edit(loaded, [(f"L{layer}.attn_out", keep("clean"))]):
            loaded.bridge(ids)
        with edit(loaded, [(f"L{layer}.attn.scores", mask_keys([q], [traj[0] + t], "cpu")),
                           (f"L{layer}.attn_out", keep("masked"))]):
            loaded.bridge(ids)
    got = (seen["clean"] - seen["masked"]).numpy()
    np.testing.assert_allclose(delta[t], got, rtol=1e-4, atol=1e-5 * np.abs(got).max())


def test_trajectory_residuals_shape_and_values():
    loaded = build_tiny("qwen2")
    ids = token_ids(16).reshape(-1).numpy()
    resid = trajectory_residuals(loaded, ids, (4, 10))
    assert resid.shape == (2, 6, 32) and resid.dtype == np.float32
    with torch.no_grad():
        hs = loaded.hf_model(torch.as_tensor(ids[None]), output_hidden_states=True).hidden_states
    np.testing.assert_allclose(resid[0], hs[1][0, 4:10].numpy(), rtol=1e-4, atol=1e-5)


def test_probe_separates_a_planted_signal_and_the_shuffled_control_does_not():
    rng = np.random.default_rng(1)
    feats, labels = [], []
    for _ in range(12):
        y = (rng.random(30) < 0.4).astype(int)
        x = rng.normal(size=(2, 30, 8))
        x[0, :, 0] += 3.0 * y                 # layer 0 carries the label, layer 1 does not
        feats.append(x)
        labels.append(y)
    r = probe_accuracy(feats, labels, seed=0)
    assert r["accuracy"][0] > 0.9 and r["accuracy"][1] < 0.7
    assert r["shuffled_accuracy"][0] < 0.75
    with pytest.raises(DirectionsError, match="at least 4 traces"):
        probe_accuracy(feats[:3], labels[:3])
