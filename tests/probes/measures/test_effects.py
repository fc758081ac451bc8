"""Causal edits of single tokens' updates (`probes.measures.effects.edits`; docs/methods.md#effects, V7).

Each edit is checked against a direct real forward: the attention knockout against a bridge forward
with `hooks.edit.mask_keys` at that layer's scores (answer rows only), the MLP-step removal against
the model with its gate/up weights actually edited. Then the first-order check that can fail: for
small edits ε the real ΔL/ε tends to M7's / M6's prediction. Float64 models from
`test_alignment` (seeded random-init Qwen2 / Llama / Qwen3, γ ≠ 1, non-zero biases).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from analyses.token_sets import CATEGORY_CODES
from hooks.edit import edit, mask_keys
from probes.measures.effects.edits import (
    CATEGORIES,
    EffectsError,
    causal_effects,
    edited_deltas,
    pairs_by_category,
    sample_pairs,
)
from probes.measures.updates.alignment import answer_alignment, answer_loss
from probes.models.load import boot_model
from probes.models.tiny import byte_tokenizer
from tests.probes.measures.test_alignment import (  # noqa: F401  (true_float64: autouse fixture)
    ANSWER,
    CONFIGS,
    N_TOKENS,
    TRAJ,
    _hf,
    true_float64,
)

PAIRS = np.array([[0, 0], [0, 5], [1, 3], [1, 11], [0, 11], [1, 7]])


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def setup(request):
    hf = _hf(CONFIGS[request.param]())
    ids = torch.randint(0, 257, (1, N_TOKENS), generator=torch.Generator().manual_seed(1))
    al = answer_alignment(hf, ids, TRAJ, ANSWER, keep_factors=True, m6_rows=[0])
    return request.param, hf, ids, al


def _nll(logits: torch.Tensor, ids: torch.Tensor) -> float:
    a, b = ANSWER
    logp = torch.log_softmax(logits[0, a - 1:b - 1], dim=-1)
    return float(-logp.gather(-1, ids[0, a:b, None]).mean())


def test_attention_knockout_equals_a_masked_key_forward(setup):
    """ΔL of the batched z edit = a real bridge forward with key t masked for 𝒬 in layer ℓ only."""
    name, hf, ids, al = setup
    loaded = boot_model(copy.deepcopy(hf), byte_tokenizer(), spec=f"tiny-{name}", device="cpu")
    rows = list(range(ANSWER[0] - 1, ANSWER[1] - 1))
    eff = causal_effects(hf, ids, TRAJ, ANSWER, PAIRS, batch_size=4, al=al)
    with torch.no_grad():
        clean = _nll(loaded.bridge(ids), ids)
        for (layer, t), got in zip(PAIRS, eff.dl_attn):
            with edit(loaded, [(f"L{layer}.attn.scores", mask_keys(rows, [TRAJ[0] + int(t)], "cpu"))]):
                real = _nll(loaded.bridge(ids), ids) - clean
            assert abs(got - real) <= 1e-9 * max(abs(real), 1e-3), (layer, t, got, real)
    assert np.abs(eff.dl_attn).max() > 1e-4        # the edits do something


def test_mlp_step_removal_equals_the_edited_weights(setup):
    """ΔL of the hooked step removal = answer loss of a model whose W_gate, W_up were edited."""
    _, hf, ids, al = setup
    eff = causal_effects(hf, ids, TRAJ, ANSWER, PAIRS, batch_size=4, al=al)
    clean = answer_loss(hf, ids, ANSWER)
    for (layer, t), got in zip(PAIRS, eff.dl_mlp):
        du, b = al.step_factors(int(layer), 0, int(t))
        edited = copy.deepcopy(hf)
        mlp = edited.model.layers[int(layer)].mlp
        with torch.no_grad():
            for w in (mlp.gate_proj.weight, mlp.up_proj.weight):
                w -= (w @ du)[:, None] * b[None, :]
        real = answer_loss(edited, ids, ANSWER) - clean
        assert abs(got - real) <= 1e-9 * max(abs(real), 1e-3), (layer, t, got, real)


@pytest.mark.parametrize("edit_name", ["attn", "mlp"])
def test_small_edits_approach_the_first_order_prediction(setup, edit_name):
    """ΔL(ε·edit)/ε → the M7 / M6 prediction as ε → 0 (the error shrinks ~linearly in ε)."""
    _, hf, ids, al = setup
    errs = []
    for eps in (1e-1, 1e-2, 1e-3):
        eff = causal_effects(hf, ids, TRAJ, ANSWER, PAIRS, scale=eps, al=al, batch_size=8)
        real = eff.dl_attn if edit_name == "attn" else eff.dl_mlp
        pred = eff.pred_m7 if edit_name == "attn" else eff.pred_m6
        big = np.abs(pred) > 1e-3 * np.abs(pred).max()
        errs.append(np.max(np.abs(real[big] - pred[big]) / np.abs(pred[big])))
    assert errs[-1] < 1e-2, errs
    assert errs[-1] < errs[0], errs


def test_batching_does_not_change_the_result(setup):
    _, hf, ids, al = setup
    one = edited_deltas(hf, ids, ANSWER, al, PAIRS, "attn", batch_size=1)
    many = edited_deltas(hf, ids, ANSWER, al, PAIRS, "attn", batch_size=5)
    np.testing.assert_allclose(one, many, rtol=1e-10, atol=1e-13)


def test_predictions_equal_the_stored_update_arrays():
    """pred_m7 = upd_m7[ℓ, t], pred_m6 = −upd_dl_pred[ℓ, t] of `updates` (float32 LoadedModel)."""
    from probes.measures.updates.shared_pass import trace_update_arrays

    hf = _hf(CONFIGS["qwen2"](), dtype=torch.float32)
    loaded = boot_model(hf, byte_tokenizer(), spec="tiny-eff", device="cpu", dtype="float32")
    ids = np.random.default_rng(2).integers(0, 257, N_TOKENS)
    spans = {"prompt": (0, 4), "trajectory": TRAJ, "scaffold": (16, 19), "answer": ANSWER}
    from types import SimpleNamespace

    arrays, _ = trace_update_arrays(loaded, SimpleNamespace(ids=ids, spans=spans))
    eff = causal_effects(loaded, ids, TRAJ, ANSWER, PAIRS)
    l, t = PAIRS[:, 0], PAIRS[:, 1]
    np.testing.assert_allclose(eff.pred_m7, arrays["upd_m7"][l, t], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(eff.pred_m6, -arrays["upd_dl_pred"][l, t], rtol=1e-5, atol=1e-7)


def test_sample_pairs_is_stratified_and_distinct():
    cat = np.array([0, 1, 0, 2, 0, 0, 1, 0], dtype=np.uint8)
    pairs = sample_pairs(cat, 3, 4, np.random.default_rng(0), CATEGORY_CODES)
    masks = pairs_by_category(pairs, cat, CATEGORY_CODES)
    assert [int(masks[c].sum()) for c in CATEGORIES] == [4, 3, 4]   # the delimiter has 1 × 3 pairs
    assert len({tuple(p) for p in pairs}) == len(pairs)
    assert pairs[:, 0].max() < 3 and pairs[:, 1].max() < len(cat)
    again = sample_pairs(cat, 3, 4, np.random.default_rng(0), CATEGORY_CODES)
    np.testing.assert_array_equal(pairs, again)
    none = sample_pairs(np.zeros(0, np.uint8), 3, 4, np.random.default_rng(0), CATEGORY_CODES)
    assert none.shape == (0, 2)


def test_bad_pairs_and_settings_are_refused(setup):
    _, hf, ids, al = setup
    with pytest.raises(EffectsError, match=r"outside 2 layers x 12 trajectory tokens"):
        causal_effects(hf, ids, TRAJ, ANSWER, np.array([[2, 0]]), al=al)
    with pytest.raises(EffectsError, match="edit must be one of"):
        edited_deltas(hf, ids, ANSWER, al, PAIRS, "both")
    no_factors = answer_alignment(hf, ids, TRAJ, ANSWER, m6_rows=[0])
    with pytest.raises(EffectsError, match="keep_factors=True"):
        causal_effects(hf, ids, TRAJ, ANSWER, PAIRS, al=no_factors)
