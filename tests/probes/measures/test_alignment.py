"""Identity tests for `probes.measures.updates.alignment` (docs/methods.md#m6, #m7; #identities: V6, V7, V9).

Seeded random-init models of every family `updates` measures (Qwen2 / Llama / Qwen3 / Mistral;
GPT-2: LayerNorm, Conv1D, one MLP input matrix W_in in the gate slot, NaN in the up slot; Phi-3:
fused qkv_proj / gate_up_proj; OLMo-2: norms after the sublayers only; Gemma-2/3: (1 + γ) norms
around both sublayers, GeGLU, a sliding-window layer, Gemma-2's soft-capping (eager path only);
GQA 4:2 where the config has it, initializer_range 0.2, non-zero biases where the config has them)
built in code; the identities run in float64 on the HF model,
one smoke test goes through `boot_model` (the TransformerLens-bridged LoadedModel) in float32.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    PretrainedConfig,
)

from hooks.weights import layer_views
from probes.measures.updates.alignment import (
    MLP_WEIGHTS,
    AlignmentError,
    answer_alignment,
    answer_loss,
    trace_alignment,
)
from probes.measures.updates.families import SDPA_MISSING
from probes.measures.updates.sdpa_pass import ATTENTION_PATHS
from probes.models.load import boot_model
from probes.models.tiny import TINY_FAMILIES, UPDATE_FAMILIES, byte_tokenizer, tiny_config

UPDATE_CONFIGS: dict[str, Callable[[], PretrainedConfig]] = {
    family: (lambda family=family: tiny_config(family)) for family in UPDATE_FAMILIES
}
"""Every family `updates` measures (the identity fixture runs on each)."""
CONFIGS = {family: UPDATE_CONFIGS[family] for family in TINY_FAMILIES}
"""The Llama-layout configs of the single-family tests here and of test_effects.py (`effects`
hooks the Llama modules by name)."""
N_TOKENS = 24
TRAJ = (4, 16)      # prompt 0..3, trajectory 4..15, scaffold 16..18
ANSWER = (19, 23)   # answer 19..22; token 23 comes after the answer and must not matter


def _softmax_keep_f64(orig):
    def softmax(x, dim=None, _stacklevel=3, dtype=None):
        return orig(x, dim=dim, dtype=None if x.dtype == torch.float64 else dtype)
    return softmax


def _rms_forward(self, x: torch.Tensor) -> torch.Tensor:
    var = x.pow(2).mean(-1, keepdim=True)
    return self.weight * (x * torch.rsqrt(var + self.variance_epsilon))


def _rms_1p_forward(self, x: torch.Tensor) -> torch.Tensor:
    """Gemma's (1 + γ) RMSNorm without its float32 round trip."""
    return (1.0 + self.weight) * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


@pytest.fixture(scope="module", autouse=True)
def true_float64():
    """HF upcasts RMSNorm and the eager softmax to float32 even for float64 weights, which caps
    every float64 identity at ~1e-7; run them in float64 end to end (same maths, no downcast)."""
    from transformers.models.gemma2 import modeling_gemma2
    from transformers.models.gemma3 import modeling_gemma3
    from transformers.models.llama import modeling_llama
    from transformers.models.mistral import modeling_mistral
    from transformers.models.olmo2 import modeling_olmo2
    from transformers.models.phi3 import modeling_phi3
    from transformers.models.qwen2 import modeling_qwen2
    from transformers.models.qwen3 import modeling_qwen3

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.nn.functional, "softmax", _softmax_keep_f64(torch.nn.functional.softmax))
        for cls in (modeling_llama.LlamaRMSNorm, modeling_qwen2.Qwen2RMSNorm,
                    modeling_qwen3.Qwen3RMSNorm, modeling_mistral.MistralRMSNorm,
                    modeling_phi3.Phi3RMSNorm, modeling_olmo2.Olmo2RMSNorm):
            mp.setattr(cls, "forward", _rms_forward)
        for cls in (modeling_gemma2.Gemma2RMSNorm, modeling_gemma3.Gemma3RMSNorm):
            mp.setattr(cls, "forward", _rms_1p_forward)
        yield


def _hf(config: PretrainedConfig, dtype: torch.dtype = torch.float64, seed: int = 0):
    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if name.endswith(("proj.bias", "c_attn.bias", "c_fc.bias", "ln_1.bias", "ln_2.bias")):
                param.normal_(0.0, 0.2)
            if "layernorm" in name or "norm.weight" in name or name.endswith((".ln_1.weight",
                                                                              ".ln_2.weight")):
                # γ ≠ 1 so the unfolded convention is exercised (Gemma: 1 + γ ≠ 1)
                param.uniform_(*((-0.5, 0.5) if config.model_type.startswith("gemma")
                                 else (0.5, 1.5)))
    return hf.to(dtype).eval()


def _mats(hf, layer: int) -> dict[str, torch.Tensor]:
    """The MLP input matrices of a layer by name ("gate", "up" or "in"), views of the weights."""
    return layer_views(hf, what="test")[layer].mlp_in


def _slots(names) -> list[tuple[int, tuple[int, ...]]]:
    """(`MLP_WEIGHTS` slot, indices into `names`): gate [, up], joint (a plain MLP: W_in in the
    gate slot, no up slot)."""
    own = [(k, (k,)) for k in range(len(names))]
    return [*own, (MLP_WEIGHTS.index("joint"), tuple(range(len(names))))]


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


@pytest.fixture(scope="module", params=[
    (f, a) for f in sorted(UPDATE_CONFIGS) for a in ATTENTION_PATHS
    if not (a == "sdpa" and tiny_config(f).model_type in SDPA_MISSING)], ids=lambda p: "-".join(p))
def setup(request):
    """((family, attention path), float64 HF model, ids [1, N], AnswerAlignment with factors).

    Every identity runs on both paths: "eager" (the reference) and "sdpa" (the linear-memory
    pass, `probes.measures.updates.sdpa_pass`)."""
    family, attention = request.param
    hf = _hf(UPDATE_CONFIGS[family]())
    ids = torch.randint(0, 257, (1, N_TOKENS), generator=torch.Generator().manual_seed(1))
    al = answer_alignment(hf, ids, TRAJ, ANSWER, keep_factors=True, attention=attention)
    return request.param, hf, ids, al


def test_shapes_and_loss(setup):
    _, hf, ids, al = setup
    L, Q, T, H = 2, ANSWER[1] - ANSWER[0], TRAJ[1] - TRAJ[0], 4
    assert al.inner.shape == al.cos.shape == al.eta.shape == (len(MLP_WEIGHTS), L, Q, T)
    assert al.eta_pooled.shape == al.full_inner.shape == (3, L, Q)
    assert al.grad_norm.shape == (3, L) and al.m7.shape == (L, T)
    assert al.m7_head.shape == (L, H, T) and al.mass.shape == (L, H, Q, T)
    assert _rel(al.loss, answer_loss(hf, ids, ANSWER)) < 1e-12
    assert np.all(np.abs(al.cos[np.isfinite(al.cos)]) <= 1 + 1e-12)
    np.testing.assert_allclose(al.m7, al.m7_head.sum(1))
    np.testing.assert_allclose(al.eta_pooled, al.eta.mean(-1))


def test_v9_telescoping(setup):
    """u^{(T−1)} = u_q; Σ_i step_i = ΔW_{T−1} (so Σ_i ⟨G, step_i⟩ = ⟨G, ΔW_{T−1}⟩); V5a endpoint."""
    _, hf, _ids, al = setup
    assert al.telescope_err.max() < 1e-12
    np.testing.assert_allclose(al.inner.sum(-1), al.full_inner, rtol=1e-10, atol=1e-14)
    for layer in range(2):
        f = al.factors[layer]
        W = next(iter(_mats(hf, layer).values())).detach()
        for row in range(ANSWER[1] - ANSWER[0]):
            u0 = f["u_base"][row]
            patch = (W @ f["du"][row].sum(0))[:, None] * (u0 / u0.dot(u0))[None]
            u_full = u0 + f["du"][row].sum(0)
            # (W + ΔW_{T−1}) u^{(−1)} = W u_q
            assert (((W + patch) @ u0 - W @ u_full).norm() / (W @ u_full).norm()) < 1e-12


def _grads(hf, ids, layer: int) -> list[torch.Tensor]:
    """∂L/∂W for each MLP input matrix of the layer (gate, up or W_in), in `_mats` order."""
    view = layer_views(hf, what="test")[layer]
    with torch.enable_grad():
        logits = hf(ids).logits
        a, b = ANSWER
        loss = -torch.log_softmax(logits[0, a - 1:b - 1], -1).gather(-1, ids[0, a:b, None]).mean()
        grads = torch.autograd.grad(loss, list(view.mlp_params))
    return list(view.mlp_split(*grads).values())


@pytest.mark.parametrize("layer,row,token", [(0, 0, 0), (1, 3, 5), (1, 0, 11), (0, 2, 7)])
def test_v6_inner_is_finite_difference(setup, layer, row, token):
    """⟨G, step⟩ = (L(W + ε step) − L(W − ε step))/2ε for gate, up and both together."""
    _, hf, ids, al = setup
    du, bvec = al.step_factors(layer, row, token)
    params = list(_mats(hf, layer).values())        # views: in-place edits reach the model
    steps = [(p.detach() @ du)[:, None] * bvec[None] for p in params]
    for k, idx in _slots(params):
        which = MLP_WEIGHTS[k]
        scale = max(float(np.sqrt(sum(float(steps[i].norm()) ** 2 for i in idx))), 1e-30)
        eps = 1e-4 / scale
        losses = []
        saved = [p.detach().clone() for p in params]
        for sign in (1.0, -1.0):
            with torch.no_grad():
                for i in idx:
                    params[i].add_(sign * eps * steps[i])
            losses.append(answer_loss(hf, ids, ANSWER))
            with torch.no_grad():          # restored bit for bit (w + e − e need not be w)
                for i in idx:
                    params[i].copy_(saved[i])
        fd = (losses[0] - losses[1]) / (2 * eps)
        pred = float(al.inner[k, layer, row, token])
        assert abs(fd - pred) <= 1e-6 * max(abs(pred), 1e-3 * scale * al.grad_norm[k, layer]), (
            which, fd, pred)


def test_m6_cos_eta_norm_match_materialised(setup):
    """cos, η*, ‖step‖, ‖G‖ equal the materialised Frobenius quantities."""
    _, hf, ids, al = setup
    for layer in range(2):
        grads = _grads(hf, ids, layer)
        mats = list(_mats(hf, layer).values())
        np.testing.assert_allclose(al.grad_norm[:len(grads), layer],
                                   [float(g.norm()) for g in grads], rtol=1e-10)
        if len(grads) == 1:     # a plain MLP: no up slot
            assert np.isnan(al.grad_norm[1, layer]) and np.isnan(al.inner[1, layer]).all()
        for row, token in [(0, 0), (3, 11), (1, 6)]:
            du, bvec = al.step_factors(layer, row, token)
            steps = [(w.detach() @ du)[:, None] * bvec[None] for w in mats]
            inner = float(sum((g * st).sum() for g, st in zip(grads, steps)))
            sn = float(torch.sqrt(sum(st.pow(2).sum() for st in steps)))
            gn = float(torch.sqrt(sum(g.pow(2).sum() for g in grads)))
            k = MLP_WEIGHTS.index("joint")
            if sn == 0.0:           # a key outside a sliding window (Gemma): no step at all
                assert al.step_norm[k, layer, row, token] == 0.0 and inner == 0.0
                assert np.isnan(al.cos[k, layer, row, token])
                continue
            assert _rel(al.inner[k, layer, row, token], inner) < 1e-9
            assert _rel(al.step_norm[k, layer, row, token], sn) < 1e-9
            assert _rel(al.cos[k, layer, row, token], -inner / (gn * sn)) < 1e-9
            assert _rel(al.eta[k, layer, row, token], -inner / gn**2) < 1e-9
            assert _rel(al.inner[0, layer, row, token], float((grads[0] * steps[0]).sum())) < 1e-9


@pytest.mark.parametrize("layer,token", [(0, 0), (0, 9), (1, 4), (1, 11)])
def test_m7_is_linearisation_of_z_perturbation(setup, layer, token):
    """M7 = d/dε L(z − ε δz_t) at ε = 0 (central finite difference, rows 𝒬 of one layer)."""
    _, hf, ids, al = setup
    dz = al.loo_dz(layer, token)
    eps = 1e-5 / max(float(dz.norm()), 1e-30)
    fd = (answer_loss(hf, ids, ANSWER, z_delta={layer: -eps * dz})
          - answer_loss(hf, ids, ANSWER, z_delta={layer: eps * dz})) / (2 * eps)
    pred = float(al.m7[layer, token])
    assert abs(fd - pred) <= 1e-6 * max(abs(pred), 1e-8), (fd, pred)


def test_m7_tracks_real_single_layer_knockout(setup):
    """V7: the first-order estimate vs the exact single-layer knockout ΔL.

    The knockout replaces z at the rows 𝒬 by z^{(∖t)} = z − δz (the exact leave-one-out of key t
    from every head's softmax there, V4 in tests/test_updates.py); a partial knockout by z − s·δz.
    Random-init weights give large full-knockout effects (p up to 0.8), so there only the ranking
    is asserted; for small (s = 0.1) effects the linear estimate s·M7 must match, and its remainder
    must shrink quadratically with s.
    """
    from scipy.stats import spearmanr

    _, hf, ids, al = setup
    base = answer_loss(hf, ids, ANSWER)
    pred = np.array([al.m7[l, t] for l in range(2) for t in range(TRAJ[1] - TRAJ[0])])

    def knockout(s: float) -> np.ndarray:
        return np.array([answer_loss(hf, ids, ANSWER, z_delta={l: -s * al.loo_dz(l, t)}) - base
                         for l in range(2) for t in range(TRAJ[1] - TRAJ[0])])

    full, tenth, hundredth = knockout(1.0), knockout(0.1), knockout(0.01)
    # a key outside a sliding window (Gemma's local layer) has δz = 0: no effect, M7 = 0
    dead = pred == 0
    assert dead.mean() < 0.5 and (full[dead] == 0).all()
    full, tenth, hundredth, pred = full[~dead], tenth[~dead], hundredth[~dead], pred[~dead]
    assert spearmanr(full, pred)[0] > 0.5
    assert np.corrcoef(tenth, 0.1 * pred)[0, 1] > 0.98
    assert np.median(np.abs(tenth - 0.1 * pred) / np.abs(tenth)) < 0.05
    rem_10 = np.median(np.abs(tenth - 0.1 * pred))
    rem_100 = np.median(np.abs(hundredth - 0.01 * pred))
    assert rem_100 < 0.02 * rem_10, (rem_10, rem_100)   # O(s²) remainder


def test_loaded_model_and_trace_wrapper():
    """Float32 through `boot_model` (LoadedModel) and a TokenizedTrace-like object."""
    hf = _hf(CONFIGS["qwen2"](), dtype=torch.float32)
    loaded = boot_model(hf, byte_tokenizer(), spec="tiny-align", device="cpu", dtype="float32")
    ids = np.random.default_rng(2).integers(0, 257, N_TOKENS)
    spans = {"prompt": (0, 4), "trajectory": TRAJ, "scaffold": (16, 19), "answer": ANSWER}
    al = trace_alignment(loaded, SimpleNamespace(ids=ids, spans=spans))
    ref = answer_alignment(_hf(CONFIGS["qwen2"]()), ids, TRAJ, ANSWER)
    assert al.telescope_err.max() < 1e-5
    assert al.factors == []
    np.testing.assert_allclose(al.inner, ref.inner, rtol=1e-3, atol=1e-4 * np.abs(ref.inner).max())
    np.testing.assert_allclose(al.m7, ref.m7, rtol=1e-3, atol=1e-4 * np.abs(ref.m7).max())
    with pytest.raises(AlignmentError):
        al.step_factors(0, 0, 0)
    assert all(p.grad is None for p in loaded.hf_model.parameters())   # autograd.grad only
    # V6 at the doc's fp32 tolerance (rel 1e−2), one-sided as §7.3 M6 writes it
    al = trace_alignment(loaded, SimpleNamespace(ids=ids, spans=spans), keep_factors=True)
    gate = loaded.hf_model.model.layers[1].mlp.gate_proj.weight
    du, bvec = al.step_factors(1, 0, 3)
    step = (gate.detach() @ du.float())[:, None] * bvec.float()[None]
    base = answer_loss(loaded, ids, ANSWER)
    pred = float(al.inner[0, 1, 0, 3])
    for eps in (1e-2, 1e-3):
        eps_w = eps * float(gate.detach().norm()) / float(step.norm())   # ε relative to ‖W‖
        with torch.no_grad():
            gate.add_(eps_w * step)
        fd = (answer_loss(loaded, ids, ANSWER) - base) / eps_w
        with torch.no_grad():
            gate.sub_(eps_w * step)
        assert _rel(fd, pred) < 1e-2 or abs(fd - pred) < 1e-2 * al.grad_norm[0, 1] * float(
            step.norm()), (eps, fd, pred)


def test_errors():
    hf = _hf(CONFIGS["llama"]())
    ids = torch.zeros(1, N_TOKENS, dtype=torch.long)
    with pytest.raises(AlignmentError):
        answer_alignment(hf, ids, (4, 20), (19, 23))      # trajectory overlaps the answer rows
    with pytest.raises(AlignmentError):
        answer_alignment(hf, ids, TRAJ, (19, 30))
    with pytest.raises(AlignmentError, match="attention must be one of sdpa, eager"):
        answer_alignment(hf, ids, TRAJ, ANSWER, attention="flash")
    hf.set_attn_implementation("sdpa")
    with pytest.raises(AlignmentError):
        answer_alignment(hf, ids, TRAJ, ANSWER)


def test_empty_trajectory():
    hf = _hf(CONFIGS["qwen3"]())
    ids = torch.randint(0, 257, (1, N_TOKENS), generator=torch.Generator().manual_seed(3))
    al = answer_alignment(hf, ids, (4, 4), ANSWER)
    assert al.inner.shape == (3, 2, 4, 0) and al.m7.shape == (2, 0)
    assert al.telescope_err.max() < 1e-12
    np.testing.assert_allclose(al.full_inner, 0.0, atol=1e-15)


def test_m6_rows_and_precomputed_grams(setup):
    """M6 on a subset of 𝒬 with Grams passed in = the matching rows of the full computation."""
    (_, attention), hf, ids, al = setup
    grams = [tuple(w.detach().T @ w.detach() for w in _mats(hf, layer).values())
             for layer in range(2)]
    rows = [0, 2]
    sub = answer_alignment(hf, ids, TRAJ, ANSWER, m6_rows=rows, grams=grams, keep_factors=True,
                           attention=attention)
    assert list(sub.m6_rows) == rows and list(al.m6_rows) == list(range(ANSWER[1] - ANSWER[0]))
    for name in ("inner", "step_norm", "step_cos", "cos", "eta", "eta_pooled", "full_inner"):
        np.testing.assert_allclose(getattr(sub, name), getattr(al, name)[:, :, rows],
                                   rtol=1e-10, atol=1e-14, equal_nan=True, err_msg=name)
    np.testing.assert_allclose(sub.telescope_err, al.telescope_err[:, rows], atol=1e-12)
    np.testing.assert_array_equal(sub.m7, al.m7)                 # M7 always uses all of 𝒬
    np.testing.assert_array_equal(sub.mass, al.mass)
    np.testing.assert_allclose(sub.step_factors(1, 1, 5)[0], al.step_factors(1, 2, 5)[0],
                               rtol=1e-10)
    for bad in ([], [4], [2, 1], [0, 0]):
        with pytest.raises(AlignmentError):
            answer_alignment(hf, ids, TRAJ, ANSWER, m6_rows=bad)
    with pytest.raises(AlignmentError):
        answer_alignment(hf, ids, TRAJ, ANSWER, grams=grams[:1])


def test_step_cos_is_consecutive_cosine_of_materialised_steps(setup):
    """`step_cos` = cos(step_i, step_{i−1}) of the explicit rank-1 steps (gate, up, gate ⊕ up)."""
    _, hf, _ids, al = setup
    T = TRAJ[1] - TRAJ[0]
    assert al.step_cos.shape == al.step_norm.shape == (3, 2, ANSWER[1] - ANSWER[0], T)
    names = list(_mats(hf, 0))
    slots = [k for k, _ in _slots(names)]
    # NaN at i = 0 and next to a zero step (a key outside a sliding window), finite elsewhere
    norms = al.step_norm[slots]
    live = (norms[..., 1:] > 0) & (norms[..., :-1] > 0)
    assert np.isnan(al.step_cos[..., 0]).all() and live.mean() > 0.5
    assert (np.isfinite(al.step_cos[slots, ..., 1:]) == live).all()
    if len(names) == 1:                                   # a plain MLP: the up slot is NaN
        assert np.isnan(al.step_cos[1]).all() and np.isnan(al.step_norm[1]).all()
    for layer in range(2):
        for row in (0, 3):
            steps = []
            for w in (m.detach() for m in _mats(hf, layer).values()):
                flat = []
                for token in range(T):
                    du, bvec = al.step_factors(layer, row, token)
                    flat.append(((w @ du)[:, None] * bvec[None]).reshape(-1))
                steps.append(torch.stack(flat))                        # [T, d_ff·d]
            steps.append(torch.cat(steps, dim=1))                      # joint
            for k, s in zip(slots, steps):
                n = s.norm(dim=-1)
                cos = ((s[1:] * s[:-1]).sum(-1) / (n[1:] * n[:-1])).numpy()   # NaN at 0 / 0
                np.testing.assert_allclose(al.step_cos[k, layer, row, 1:], cos, rtol=1e-9,
                                           atol=1e-12, equal_nan=True, err_msg=f"{k} {layer} {row}")
