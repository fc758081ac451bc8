"""Identity tests for `probes.measures.updates.mlp` (docs/methods.md#m5; #identities: V5a, V5b, V9) on
tiny models.

Seeded random-init Qwen2 / Llama / Qwen3 models (fp32, GQA 4:2, initializer_range 0.2, random q/k/v/o
biases where the config has them, random RMSNorm γ so the unfolded-γ handling is exercised) built
in code with the byte tokenizer; no files, no network. The same identities run on Mistral, Gemma-2/3
(norms after the sublayers, 1 + γ RMSNorm, GeGLU, soft-capping), Phi-3 (fused gate_up_proj), OLMo-2
(no norm before the MLP) and GPT-2 (LayerNorm, plain GELU MLP with biases, Conv1D), through the
weight views of `hooks.weights`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPTNeoXConfig,
    PretrainedConfig,
)
from transformers.activations import ACT2FN

from hooks import capture
from hooks.model import LoadedModel
from hooks.weights import layer_views
from probes.measures.updates.mlp import (
    LayerWeights,
    MlpUpdateError,
    capture_rows,
    layer_weights,
    mlp_updates,
    mlp_updates_from,
    mlp_updates_rows,
    mlp_updates_rows_from,
    restricted_inputs,
    rms_norm,
    row_capture,
)
from probes.measures.updates.mlp_patch import endpoint_patches, masked_patched_logits
from probes.models.load import boot_model
from probes.models.tiny import MORE_FAMILIES, TINY_FAMILIES, byte_tokenizer, tiny_config

CONFIGS: dict[str, Callable[[], PretrainedConfig]] = {
    family: (lambda family=family: tiny_config(family)) for family in TINY_FAMILIES + MORE_FAMILIES
}
N_TOKENS = 24
TRAJ = list(range(4, 16))           # trajectory keys τ_0..τ_11
ROWS = list(range(16, 22))          # scaffold + answer rows after the trajectory
QUERY = 21                          # not the last position: keys after q must be ignored
F64 = torch.float64


def _build(config: PretrainedConfig, seed: int = 0) -> LoadedModel:
    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        gemma = config.model_type.startswith("gemma")
        for name, param in hf.named_parameters():
            if name.endswith(("proj.bias", "c_fc.bias", "c_attn.bias")):
                param.normal_(0.0, 0.2)
            elif name.endswith(("layernorm.weight", "ln_1.weight", "ln_2.weight", "ln_1.bias",
                                "ln_2.bias")):
                # γ ≠ 1 (Gemma: 1 + γ ≠ 1): the unfolded convention matters
                param.normal_(0.0 if gemma or name.endswith("bias") else 1.0, 0.3)
    return boot_model(hf, byte_tokenizer(), spec="tiny-mlp-update", device="cpu", dtype="float32")


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def setup(request):
    """(name, loaded model, ids [1, N], M5 at QUERY, weights, capture at QUERY)."""
    loaded = _build(CONFIGS[request.param]())
    ids = torch.randint(0, 257, (1, N_TOKENS), generator=torch.Generator().manual_seed(1))
    weights = layer_weights(loaded, any_layout=True)
    return (request.param, loaded, ids, mlp_updates(loaded, ids, QUERY, TRAJ), weights,
            capture_rows(loaded, ids, [QUERY]))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _mlp_hidden(u: torch.Tensor, loaded: LoadedModel, layer: int, w, mats: dict[str, torch.Tensor]
                ) -> torch.Tensor:
    """φ = act(W_gate u + b) ⊙ (W_up u + b), or act(W_in u + b) for a plain MLP (float64)."""
    view = layer_views(loaded, what="test")[layer]
    act = ACT2FN[w.act]

    def pre(n: str) -> torch.Tensor:
        b = view.mlp_in_bias[n]
        return u @ mats[n].T + (0.0 if b is None else b.detach().double())
    return act(pre("gate")) * pre("up") if "gate" in mats else act(pre("in"))


def _mlp_out(phi: torch.Tensor, loaded: LoadedModel, layer: int, w_down: torch.Tensor
             ) -> torch.Tensor:
    """What the MLP adds to the residual: [N_post](W_down φ + b_down) (float64)."""
    view = layer_views(loaded, what="test")[layer]
    out = phi @ w_down.T + (0.0 if view.b_down is None else view.b_down.detach().double())
    norm = view.mlp_out_norm
    return out if norm is None else norm.apply(out, weight=norm.weight.detach().double())


def _mask_hook(rows: list[int], keys: list[int]):
    def hook(scores: torch.Tensor, hook) -> torch.Tensor:
        scores = scores.clone()
        for r in rows:
            scores[:, :, r, keys] = float("-inf")
        return scores
    return hook


@contextmanager
def _patched_weights(loaded: LoadedModel, layer: int,
                     deltas: dict[str, torch.Tensor]) -> Iterator[None]:
    """Add explicit ΔW to the HF MLP weights of `layer` (restored on exit)."""
    view = layer_views(loaded, what="test")[layer]
    mats = {**view.mlp_in, "down": view.w_down}       # views sharing storage with the model
    saved = {k: mats[k].detach().clone() for k in deltas}
    try:
        with torch.no_grad():
            for k, d in deltas.items():
                mats[k] += d.to(torch.float32)
        yield
    finally:
        with torch.no_grad():
            for k, w in saved.items():
                mats[k].copy_(w)


def test_attention_is_not_uniform_and_trajectory_matters(setup):
    _, _, _, upd, weights, cap = setup
    assert max(float(p.max()) for p in cap.pattern) > 3.0 / (QUERY + 1)
    assert (upd.delta_norm > 1e-3).all()
    sigma = upd.get(f"sigma_{weights[0].names[0]}")
    for layer, p in enumerate(cap.pattern):
        # a key outside a sliding window (Gemma's local layers) gets no attention and no step
        seen = (p[:, 0, TRAJ].sum(0) > 0).numpy()
        assert seen.any() and (sigma[layer][seen] > 0).all() and (sigma[layer][~seen] == 0).all()


def test_v9_full_prefix_equals_full_context(setup):
    """u^{(T−1)} = u_q and m^{(T−1)} = m_q (the restricted-attention sums are exact)."""
    _, _, _, _, weights, cap = setup
    for layer, w in enumerate(weights):
        m, u = restricted_inputs(cap, w, layer, TRAJ)
        assert _rel(m[0, -1], cap.resid_mid[layer][0]) <= 1e-5
        assert _rel(u[0, -1], cap.ln2_out[layer][0]) <= 1e-5
        assert _rel(w.norm2(cap.resid_mid[layer][0].double()), cap.ln2_out[layer][0]) <= 1e-5
        if w.mlp_norm is None and not w.identity:
            assert _rel(rms_norm(cap.resid_mid[layer][0].double(), w.gamma, w.eps),
                        cap.ln2_out[layer][0]) <= 1e-5


@pytest.mark.parametrize("layer,cut", [(0, 3), (1, 7), (1, -1)])
def test_prefix_equals_single_layer_suffix_knockout(setup, layer, cut):
    """m^{(i)} at q = resid_mid of a run with keys τ_{i+1..} masked for row q at `layer` only."""
    _, loaded, ids, _, weights, cap = setup
    m, _ = restricted_inputs(cap, weights[layer], layer, TRAJ)
    hook = (f"blocks.{layer}.attn.hook_attn_scores", _mask_hook([QUERY], TRAJ[cut + 1:]))
    with (capture(loaded, [f"L{layer}.resid_mid"], positions=[QUERY], dtype="float32") as st,
          loaded.bridge.hooks(fwd_hooks=[hook])):
        loaded.bridge(ids)
    assert _rel(m[0, cut + 1], st[f"L{layer}.resid_mid"][0]) <= 1e-5


def test_v5a_explicit_patch_restores_pre_activations(setup):
    """(W+ΔW) u' = W u for gate and up (W_in); φ' = φ; m' + (W_down+ΔW_down) φ' = y, or with a
    norm after the MLP m' + N(W_down φ') + δ = y (materialised)."""
    _, loaded, _, _, weights, cap = setup
    patches = endpoint_patches(cap, weights, TRAJ)
    for layer, (w, pt) in enumerate(zip(weights, patches)):
        m, u = restricted_inputs(cap, w, layer, TRAJ)
        u_base, m_base = u[0, 0], m[0, 0]
        deltas = {n: torch.outer(pt.left[n][0], pt.right[0]) for n in w.names}
        d_down = torch.outer(pt.down_left[0], pt.down_right[0])
        assert all(torch.linalg.matrix_rank(d) == 1 for d in deltas.values())
        patched = {n: w.matrix(n) + deltas[n] for n in w.names}
        bias = {n: b for n, b in layer_views(loaded, what="test")[layer].mlp_in_bias.items()}
        for n, site in zip(w.names, (cap.mlp_pre, cap.mlp_pre_linear)):
            b = 0.0 if bias[n] is None else bias[n].detach().double()
            assert _rel(patched[n] @ u_base + b, site[layer][0]) <= 1e-5
        assert _rel(w.w_gate @ u_base, cap.mlp_pre[layer][0]) > 1e-3       # the patch acted
        phi = _mlp_hidden(u_base, loaded, layer, w, patched)
        assert _rel(phi, cap.mlp_post[layer][0]) <= 1e-5
        y_clean = cap.resid_mid[layer][0].double() + _mlp_out(
            cap.mlp_post[layer][0].double(), loaded, layer, w.w_down)
        if w.down_bias_only:
            y = m_base + _mlp_out(phi, loaded, layer, w.w_down) + pt.down_left[0]
        else:
            y = m_base + _mlp_out(phi, loaded, layer, w.w_down + d_down)
        assert _rel(y, y_clean) <= 1e-5


def test_v5a_in_model_weight_patch(setup):
    """Mask 𝒯 for row q at one layer, add the explicit ΔW to that layer's HF weights: resid_post
    at q equals the clean one (the other rows see patched weights, row q does not care)."""
    _, loaded, ids, _, weights, cap = setup
    patches = endpoint_patches(cap, weights, TRAJ)
    clean_sites = [f"L{l}.resid_post" for l in range(loaded.arch.n_layers)]
    with capture(loaded, clean_sites, positions=[QUERY], dtype="float32") as clean:
        loaded.bridge(ids)
    for layer, (pt, w) in enumerate(zip(patches, weights)):
        deltas = {n: torch.outer(pt.left[n][0], pt.right[0]) for n in pt.left}
        if not w.down_bias_only:
            deltas["down"] = torch.outer(pt.down_left[0], pt.down_right[0])
        hook = (f"blocks.{layer}.attn.hook_attn_scores", _mask_hook([QUERY], TRAJ))
        site = f"L{layer}.resid_post"
        for with_patch in (True, False):
            hooks = [hook]
            if with_patch and w.down_bias_only:      # the skip term: a bias after the MLP's norm
                delta = pt.down_left[0].float()
                hooks.append((f"blocks.{layer}.hook_mlp_out",
                              lambda act, hook, delta=delta: act + delta))
            ctx = _patched_weights(loaded, layer, deltas if with_patch else {})
            with (ctx, capture(loaded, [site], positions=[QUERY], dtype="float32") as st,
                  loaded.bridge.hooks(fwd_hooks=hooks)):
                loaded.bridge(ids)
            err = _rel(st[site][0], clean[site][0])
            assert (err <= 1e-5) if with_patch else (err > 1e-3), (layer, with_patch, err)


def test_v5b_dherin_identity_end_to_end(setup):
    """𝒯 masked for every row after it at all layers + cache-derived patches ⇒ clean logits."""
    name, loaded, ids, _, _, _ = setup
    patched, clean = masked_patched_logits(loaded, ids, TRAJ, ROWS)
    err = float((patched - clean).abs().max())
    assert err < 1e-4, (name, err)
    unpatched, _ = masked_patched_logits(loaded, ids, TRAJ, ROWS, patch=False)
    assert float((unpatched - clean).abs().max()) > 1e-2


def test_v9_telescoping_and_rank1_norms(setup):
    """Σ_i step_i = ΔW_{T−1} (explicit); rank-1 σ, cumulative norm and cosine = explicit ones."""
    _, _, _, upd, weights, cap = setup
    T = len(TRAJ)
    for layer, w in enumerate(weights):
        _, u = restricted_inputs(cap, w, layer, TRAJ)
        base = u[0, 0]
        right = base / base.dot(base)
        assert upd.lr[layer] == pytest.approx(1.0 / float(base.dot(base)), rel=1e-12)
        for which, wm in ((n, w.matrix(n)) for n in w.names):
            du = torch.from_numpy(upd.du[layer])
            steps = torch.einsum("ti,j->tij", du @ wm.T, right)            # explicit [T, d_ff, d]
            total = torch.outer(wm @ (u[0, -1] - base), right)
            assert _rel(steps.sum(0), total) <= 1e-10
            fro = steps.flatten(1).norm(dim=-1)
            assert _rel(getattr(upd, f"sigma_{which}")[layer], fro) <= 1e-10
            assert _rel(getattr(upd, f"grad_norm_{which}")[layer], fro / upd.lr[layer]) <= 1e-10
            cum = steps.cumsum(0).flatten(1).norm(dim=-1)
            assert _rel(getattr(upd, f"cum_fro_{which}")[layer], cum) <= 1e-10
            assert getattr(upd, f"total_fro_{which}")[layer] == pytest.approx(
                float(total.norm()), rel=1e-10)
            flat = steps.flatten(1)
            cos = (flat[1:] * flat[:-1]).sum(-1) / (fro[1:] * fro[:-1])
            got = getattr(upd, f"cos_{which}")[layer]
            assert np.isnan(got[0])
            np.testing.assert_allclose(got[1:], cos.numpy(), rtol=1e-10, atol=1e-12,
                                       equal_nan=True)
            finite = got[1:][~np.isnan(got[1:])]                # NaN: a zero step (window)
            assert got.shape == (T,) and finite.size and (np.abs(finite) <= 1 + 1e-12).all()
        phi = cap.mlp_post[layer][0].double()
        assert upd.down_fro[layer] == pytest.approx(upd.delta_norm[layer] / float(phi.norm()),
                                                    rel=1e-12)


def test_grams_without_mlp_copies(setup):
    """`layer_weights(with_mlp=False)` keeps W_O/γ2 and only the two d×d Grams of gate/up."""
    _, loaded, _, _, weights, _ = setup
    light = layer_weights(loaded, with_mlp=False, any_layout=True)
    for full, w in zip(weights, light):
        assert w.w_gate is None and w.w_up is None and w.w_down is None
        assert torch.equal(w.w_o, full.w_o) and torch.equal(w.gamma, full.gamma)
        for which in w.names:
            assert _rel(w.gram(which), full.gram(which)) <= 1e-14
    assert full.grams is None
    with pytest.raises(MlpUpdateError):
        LayerWeights(w_o=full.w_o, b_o=None, gamma=full.gamma, eps=full.eps, w_gate=None,
                     w_up=None, w_down=None).gram("gate")


def test_shared_capture_equals_separate_forward(setup):
    """`row_capture` hooked into a grad-enabled HF forward = `capture_rows` (bridge, no grad)."""
    _, loaded, ids, upd, _, cap = setup
    with row_capture(loaded, [QUERY]) as get, torch.enable_grad():
        loaded.hf_model(ids)
    shared = get()
    assert shared.logits is None
    for name in ("v", "pattern", "resid_pre", "resid_mid", "ln2_out", "mlp_post"):
        for a, b in zip(getattr(shared, name), getattr(cap, name)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    again = mlp_updates_from(shared, layer_weights(loaded, with_mlp=False, any_layout=True), TRAJ)
    last = single_names(upd)[-1]
    np.testing.assert_allclose(again.get(f"sigma_{last}"), upd.get(f"sigma_{last}"), rtol=1e-12)
    np.testing.assert_allclose(again.get(f"cos_{last}"), upd.get(f"cos_{last}"), rtol=1e-12,
                               equal_nan=True)


def test_shapes(setup):
    _, loaded, _, upd, weights, _ = setup
    L, T, d = loaded.arch.n_layers, len(TRAJ), loaded.arch.d_model
    names = weights[0].names
    for n in ("gate", "up", "in"):
        for q in ("sigma", "cos", "cum_fro", "grad_norm", "total_fro"):
            value = getattr(upd, f"{q}_{n}")
            shape = (L,) if q == "total_fro" else (L, T)
            assert (value.shape == shape) if n in names else value is None, (q, n)
    for name in ("lr", "u_base_norm", "down_fro", "delta_norm"):
        assert getattr(upd, name).shape == (L,), name
    assert upd.du.shape == (L, T, d) and upd.u_base.shape == (L, d)
    assert upd.query == QUERY and list(upd.trajectory) == TRAJ


def test_rejects_unsupported_inputs(setup):
    _, loaded, ids, _, _, _ = setup
    with pytest.raises(MlpUpdateError):
        mlp_updates(loaded, ids, QUERY, [3, QUERY])          # trajectory must precede q
    with pytest.raises(MlpUpdateError):
        mlp_updates(loaded, ids, QUERY, [5, 4])              # not increasing
    with pytest.raises(MlpUpdateError):
        mlp_updates(loaded, ids, N_TOKENS, TRAJ)             # query out of range
    torch.manual_seed(0)
    neox = boot_model(
        AutoModelForCausalLM.from_config(GPTNeoXConfig(
            vocab_size=300, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=64)),
        byte_tokenizer(), spec="tiny-neox", device="cpu", dtype="float32")
    with pytest.raises(MlpUpdateError, match=r"^mlp_update has no weight view for model_type "
                                             r"'gpt_neox'; supported: llama, .*gpt2"):
        mlp_updates(neox, ids, QUERY, TRAJ)


def test_what_does_not_apply_is_refused_by_name(setup):
    """A plain MLP has no gate or up matrix: asking for one is one clear error; a gated one has
    no W_in; `layer_weights` without `any_layout` refuses a non-Llama computation."""
    name, loaded, ids, upd, weights, cap = setup
    pt = endpoint_patches(cap, weights, TRAJ)[0]
    missing = [n for n in ("gate", "up", "in") if n not in weights[0].names]
    for n in missing:
        with pytest.raises(MlpUpdateError, match=f"^cos_{n} does not apply to this model"):
            upd.get(f"cos_{n}")
        with pytest.raises(MlpUpdateError, match=f"has no {n!r} matrix"):
            weights[0].gram(n)
    if "up" in missing:
        with pytest.raises(MlpUpdateError, match="this patch has no 'up' factor"):
            _ = pt.up_left
    if layer_views(loaded, what="test")[0].llama_like:
        assert len(layer_weights(loaded)) == loaded.arch.n_layers
    else:
        with pytest.raises(MlpUpdateError, match=f"needs the Llama computation.*{name[:4]}"):
            layer_weights(loaded)


def test_rows_equal_single_rows(setup):
    """`mlp_updates_rows` (one forward, one restricted_prefix per layer for all rows) = separate
    `mlp_updates` per row; `mlp_updates_from` on a multi-row capture is its first row."""
    _, loaded, ids, upd, _, _ = setup
    rows = mlp_updates_rows(loaded, ids, ROWS, TRAJ)
    assert [u.query for u in rows] == ROWS
    for u, q in zip(rows, ROWS):
        single = upd if q == QUERY else mlp_updates(loaded, ids, q, TRAJ)
        for name in ("lr", "u_base_norm", "down_fro", "delta_norm", "du", "u_base",
                     *(f"{q}_{n}" for n in single_names(single)
                       for q in ("sigma", "grad_norm", "cos", "cum_fro", "total_fro"))):
            got, ref = getattr(u, name), getattr(single, name)
            assert got.shape == ref.shape, name
            np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-14, equal_nan=True,
                                       err_msg=name)
        assert list(u.trajectory) == TRAJ
    cap = capture_rows(loaded, ids, ROWS)
    light = layer_weights(loaded, with_mlp=False, any_layout=True)
    lean = mlp_updates_rows_from(cap, light, TRAJ, keep_du=False)
    first = mlp_updates_from(cap, light, TRAJ)
    assert all(u.du is None for u in lean) and first.query == ROWS[0]
    np.testing.assert_array_equal(first.sigma_gate if first.sigma_gate is not None
                                  else first.sigma_in, (lean[0].sigma_gate if lean[0].sigma_gate
                                                        is not None else lean[0].sigma_in))
    last = "sigma_up" if lean[-1].sigma_up is not None else "sigma_in"
    np.testing.assert_array_equal(getattr(lean[-1], last), getattr(rows[-1], last))
    first_q = "sigma_gate" if rows[0].sigma_gate is not None else "sigma_in"
    assert not np.allclose(getattr(rows[0], first_q), getattr(rows[-1], first_q))
    with pytest.raises(MlpUpdateError):
        mlp_updates_rows(loaded, ids, [QUERY, ROWS[0]], TRAJ)      # rows not increasing


def single_names(upd) -> tuple[str, ...]:
    """The MLP input matrices an `MlpUpdates` holds ("gate", "up") or ("in",)."""
    return ("gate", "up") if upd.sigma_gate is not None else ("in",)
