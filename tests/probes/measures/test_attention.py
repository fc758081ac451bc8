"""Identity tests for `probes.measures.updates.attention` (docs/methods.md#identities: V0, V1, V3, V4)
on tiny models.

Seeded random-init models of every family `updates` measures (Qwen2 / Llama / Qwen3 / Mistral,
GPT-2 with unrotated q/k and Conv1D weights, Phi-3 with fused qkv_proj, OLMo-2 and Gemma-3 with
norms after attention, Gemma-2 with soft-capped scores, both Gemmas with a sliding-window layer;
fp32, GQA 4:2 where the config has it, initializer_range 0.2 so the attention is far from
uniform) built in code with the byte tokenizer; no files, no network. Phi-3 runs on the "sdpa"
capture only (its bridge does not fire hook_rot_q/k; the eager capture refuses it in one line),
Gemma-2 on the eager one only (the fused kernel cannot soft-cap).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPTNeoXConfig,
    PretrainedConfig,
)

from hooks.model import LoadedModel
from hooks.weights import layer_views
from probes.measures.updates.attention import (
    UpdatesError,
    capture_query,
    capture_query_rows,
    layer_terms,
    o_proj_weights,
    query_capture,
    query_rows_capture,
    token_updates,
    token_updates_from,
    token_updates_rows,
)
from probes.measures.updates.attention_rows import key_summary_from
from probes.measures.updates.families import EAGER_MISSING, SDPA_MISSING
from probes.measures.updates.sdpa_pass import ATTENTION_PATHS, sdpa_query_rows_capture, sdpa_view
from probes.models.load import boot_model
from probes.models.tiny import UPDATE_FAMILIES, byte_tokenizer, tiny_config

CONFIGS: dict[str, Callable[[], PretrainedConfig]] = {
    family: (lambda family=family: tiny_config(family)) for family in UPDATE_FAMILIES
}
N_TOKENS = 24
QUERY = 21  # not the last position: keys after q must be ignored
REL = 1e-5


def _build(config: PretrainedConfig, seed: int = 0) -> LoadedModel:
    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():  # non-zero q/k/v/o biases where the config has them (checks b handling)
        for name, param in hf.named_parameters():
            if name.endswith(("proj.bias", "c_attn.bias")):
                param.normal_(0.0, 0.2)
    return boot_model(hf, byte_tokenizer(), spec="tiny-updates", device="cpu", dtype="float32")


def _model_type(family: str) -> str:
    return tiny_config(family).model_type


PATHS = [(f, a) for f in sorted(CONFIGS) for a in ATTENTION_PATHS
         if not (a == "eager" and _model_type(f) in EAGER_MISSING)
         and not (a == "sdpa" and _model_type(f) in SDPA_MISSING)]


@pytest.fixture(scope="module", params=PATHS, ids=lambda p: "-".join(p))
def setup(request):
    """((family, attention path), loaded model, ids [1, N], capture at QUERY, o_proj weights).

    Every identity runs on both capture paths: "eager" (the bridge, the reference) and "sdpa"
    (the linear-memory pass, `probes.measures.updates.sdpa_pass`)."""
    family, attention = request.param
    loaded = _build(CONFIGS[family]())
    ids = torch.randint(0, 257, (1, N_TOKENS), generator=torch.Generator().manual_seed(1))
    return (request.param, loaded, ids, capture_query(loaded, ids, QUERY, attention=attention),
            o_proj_weights(loaded))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def test_attention_is_not_uniform(setup):
    _, _, _, cap, _ = setup
    assert max(float(p.max()) for p in cap.pattern) > 3.0 / (QUERY + 1)


def test_v0_z_from_pattern_and_values(setup):
    _, loaded, _, cap, weights = setup
    for layer in range(loaded.arch.n_layers):
        t = layer_terms(cap, layer, weights[layer][0])
        z = (t["p"][..., None] * t["v_h"]).sum(1)
        assert _rel(z, cap.z[layer]) <= REL


def test_v0_v1_contributions_sum_to_attn_out(setup):
    """Σ_{h,t} c + b_O is the o_proj output; the attention output is it, or N_ao of it where a norm
    follows attention (OLMo-2)."""
    _, loaded, _, cap, weights = setup
    for layer in range(loaded.arch.n_layers):
        w, b = weights[layer]
        t = layer_terms(cap, layer, w)
        bias = 0.0 if b is None else b.detach().double()
        norm = layer_views(loaded, what="test")[layer].attn_out_norm

        def after(o: torch.Tensor, norm=norm) -> torch.Tensor:
            return o if norm is None else norm.apply(o, weight=norm.weight.detach().double())
        assert _rel(after(t["c"].sum((0, 1)) + bias), cap.attn_out[layer]) <= REL  # Σ_{h,t} c + b_O
        head_out = torch.einsum("dhe,he->d", w.detach().double().reshape(-1, *t["z"].shape),
                                cap.z[layer].double())
        assert _rel(after(head_out + bias), cap.attn_out[layer]) <= REL     # Σ_h W_O^h z + b_O


def test_v1_mass_sums_to_one_and_shapes(setup):
    (_, att), loaded, ids, _, _ = setup
    upd = token_updates(loaded, ids, QUERY, attention=att)
    arch = loaded.arch
    shape = (arch.n_layers, arch.n_heads, QUERY + 1)
    for name in ("mass", "contrib_norm", "loo_norm", "loo_out_norm", "dai_action_norm",
                 "dai_scaled_action_norm", "dai_action_out_norm", "score"):
        arr = getattr(upd, name)
        assert arr.shape == shape and arr.dtype == np.float32, name
        assert np.isfinite(arr).all(), name
    assert upd.dai_fro.shape == (arch.n_layers, arch.n_kv_heads, QUERY + 1)
    assert upd.dai_fro_per_query_head().shape == shape
    assert upd.contrib_sum_norm.shape == upd.loo_sum_norm.shape == (arch.n_layers, QUERY + 1)
    assert upd.dai_cos.shape == upd.dai_spearman.shape == (arch.n_layers, arch.n_heads)
    np.testing.assert_allclose(upd.mass.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(upd.dai_scaled_action_norm, upd.dai_action_norm * upd.scale,
                               rtol=1e-5)
    assert (np.abs(upd.dai_cos) <= 1 + 1e-6).all() and (np.abs(upd.dai_spearman) <= 1 + 1e-6).all()


def test_v1_scores_match_the_model(setup):
    (_, att), loaded, ids, cap, weights = setup
    from hooks import capture

    sites = [f"L{l}.attn.scores" for l in range(loaded.arch.n_layers)]
    with capture(loaded, sites, positions=[QUERY], dtype="float32") as store:
        loaded.bridge(ids)
    upd = token_updates(loaded, ids, QUERY, attention=att)
    for layer in range(loaded.arch.n_layers):
        model_scores = store[f"L{layer}.attn.scores"][:, 0, : QUERY + 1]
        # keys the model masks (outside a sliding window: Gemma's local layers) get p = 0 and a
        # masked score; the others equal the model's (scale and Gemma-2's soft-cap included)
        seen = torch.from_numpy(upd.mass[layer]).sum(0) > 0
        assert seen.sum() >= 8 and (upd.mass[layer][:, ~seen.numpy()] == 0).all()
        assert (model_scores[:, ~seen] < -1e30).all()
        assert _rel(torch.from_numpy(upd.score[layer])[:, seen], model_scores[:, seen]) <= REL
        # M2 norm equals ‖p W_O^h v_t‖ from the vectors; M1 equals the pattern row.
        t = layer_terms(cap, layer, weights[layer][0])
        np.testing.assert_allclose(upd.mass[layer], t["p"].numpy(), rtol=1e-6, atol=1e-7)


def test_v3_rank1_dual_form(setup):
    (_, att), loaded, ids, cap, weights = setup
    upd = token_updates(loaded, ids, QUERY, attention=att)
    G = loaded.arch.gqa_group
    for layer in range(loaded.arch.n_layers):
        t = layer_terms(cap, layer, weights[layer][0])
        k, v = cap.rot_k[layer].double(), cap.v[layer].double()          # [T, H_kv, d_h]
        for g in range(loaded.arch.n_kv_heads):
            outer = torch.einsum("ti,tj->tij", v[:, g], k[:, g])         # explicit ΔW_t (tiny)
            fro = outer.flatten(1).norm(dim=-1)
            assert _rel(torch.from_numpy(upd.dai_fro[layer, g]).double(), fro) <= REL
            # Incremental Frobenius (§0.4 prefix Gram) equals the direct cumulative norm.
            gram = (v[:, g] @ v[:, g].T) * (k[:, g] @ k[:, g].T)
            incremental = torch.cumsum(
                2 * torch.tril(gram, -1).sum(1) + gram.diagonal(), 0).sqrt()
            direct = torch.cumsum(outer, 0).flatten(1).norm(dim=-1)
            assert _rel(incremental, direct) <= 1e-6
            for h in range(g * G, (g + 1) * G):
                q = t["q"][h]
                action = outer @ q                                       # ΔW_t q̃  [T, d_h]
                assert _rel(torch.from_numpy(upd.dai_action_norm[layer, h]).double(),
                            action.norm(dim=-1)) <= REL
                # Σ_t ΔW_t q̃ == (Σ_t ΔW_t) q̃ == V_𝒯ᵀ (K̃_𝒯 q̃)
                lhs = action.sum(0)
                assert _rel(outer.sum(0) @ q, lhs) <= 1e-6
                assert _rel(v[:, g].T @ (k[:, g] @ q), lhs) <= 1e-6
                assert _rel(t["relaxed"][h], lhs / loaded.arch.d_head ** 0.5) <= 1e-6
                assert upd.scale == layer_views(loaded, what="test")[layer].attn_scale


def _knockout_z(loaded: LoadedModel, ids: torch.Tensor, layer: int, key: int) -> torch.Tensor:
    """z [H, d_h] at QUERY in `layer` with `key` removed from that layer's softmax row QUERY."""
    from hooks import capture

    def drop(scores: torch.Tensor, hook) -> torch.Tensor:
        scores = scores.clone()
        scores[:, :, QUERY, key] = float("-inf")
        return scores

    hook = (f"blocks.{layer}.attn.hook_attn_scores", drop)
    with (
        capture(loaded, [f"L{layer}.attn.z"], positions=[QUERY], dtype="float32") as store,
        loaded.bridge.hooks(fwd_hooks=[hook]),
    ):
        loaded.bridge(ids)
    return store[f"L{layer}.attn.z"][0]


@pytest.mark.parametrize("layer,key", [(0, 0), (0, 7), (0, 16), (1, 13), (1, QUERY)])
def test_v4_leave_one_out_equals_knockout(setup, layer, key):
    _, loaded, ids, cap, weights = setup
    t = layer_terms(cap, layer, weights[layer][0])
    z_knocked = _knockout_z(loaded, ids, layer, key)
    predicted = t["z"] - t["dz"][:, key]                                  # z^{(∖t)} = z − δz
    assert _rel(predicted, z_knocked) <= REL
    if float(t["p"][:, key].max()) > 0:
        assert _rel(t["z"], z_knocked) > 1e-4                             # the knockout did act
    else:                  # a key outside a sliding window (Gemma's local layers): δz = 0
        assert float(t["dz"][:, key].abs().max()) == 0.0
    # Residual-space LOO: attn_out changes by Σ_h W_O^h δz.
    w = weights[layer][0].detach().double()
    out_knocked = z_knocked.double().reshape(-1) @ w.T
    out_full = t["z"].reshape(-1) @ w.T
    assert _rel(out_full - t["dz_out"][:, key].sum(0), out_knocked) <= REL


def test_shared_capture_equals_separate_forward(setup):
    """`query_capture` hooked into a grad-enabled HF forward = `capture_query` (bridge, no grad),
    and `token_updates_from` on it = `token_updates` (sdpa: `sdpa_query_rows_capture` hooked into
    a grad-enabled forward of the view = `capture_query(attention="sdpa")`)."""
    (_, att), loaded, ids, cap, weights = setup
    if att == "eager":
        with query_capture(loaded, QUERY) as get, torch.enable_grad():
            loaded.hf_model(ids)
        shared = get()
    else:
        view = sdpa_view(loaded)
        with sdpa_query_rows_capture(view, [QUERY]) as get, torch.enable_grad():
            view(ids)
        shared = get().row(0)
    for name in ("rot_k", "v", "rot_q", "z", "pattern", "attn_out"):
        for a, b in zip(getattr(shared, name), getattr(cap, name)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    direct = token_updates(loaded, ids, QUERY, attention=att)
    again = token_updates_from(loaded, shared, weights)
    for name in ("mass", "contrib_sum_norm", "loo_sum_norm", "dai_fro", "dai_cos"):
        np.testing.assert_array_equal(getattr(again, name), getattr(direct, name))


def test_rejects_unsupported_inputs(setup):
    (_, att), loaded, ids, _, _ = setup
    with pytest.raises(UpdatesError):
        token_updates(loaded, ids, N_TOKENS, attention=att)
    with pytest.raises(UpdatesError, match="attention must be one of sdpa, eager"):
        token_updates(loaded, ids, QUERY, attention="flash")
    torch.manual_seed(0)
    neox = boot_model(
        AutoModelForCausalLM.from_config(GPTNeoXConfig(
            vocab_size=300, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=64), attn_implementation="eager"),
        byte_tokenizer(), spec="tiny-neox", device="cpu", dtype="float32")
    with pytest.raises(UpdatesError, match=r"^token_updates does not measure 'gpt_neox' models "
                                           r"yet: .*; supported: llama, .*gpt2, phi3, .*gemma2.*\.$"):
        token_updates(neox, ids, QUERY, attention=att)


def test_eager_capture_refuses_phi3_in_one_line():
    """The Phi-3 bridge does not fire hook_rot_q/k: the eager capture says so (the "sdpa" one
    measures Phi-3, see the fixture)."""
    loaded = _build(tiny_config("phi3"))
    ids = torch.randint(0, 257, (1, N_TOKENS), generator=torch.Generator().manual_seed(1))
    with pytest.raises(UpdatesError, match=r"no eager pass for 'phi3' models \(the Phi-3 bridge "
                                           r"does not fire hook_rot_q / hook_rot_k") as err:
        token_updates(loaded, ids, QUERY, attention="eager")
    assert "\n" not in str(err.value)
    assert token_updates(loaded, ids, QUERY, attention="sdpa").mass.shape == (2, 4, QUERY + 1)



def test_sdpa_capture_refuses_gemma2_in_one_line():
    """The fused kernel cannot soft-cap attention logits: the linear-memory capture says so (the
    eager one measures Gemma-2, see the fixture)."""
    from probes.measures.updates.sdpa_pass import LinearPassError

    loaded = _build(tiny_config("gemma2"))
    ids = torch.randint(0, 257, (1, N_TOKENS), generator=torch.Generator().manual_seed(1))
    with pytest.raises(LinearPassError, match=r"cannot apply attention logit soft-capping") as err:
        token_updates(loaded, ids, QUERY, attention="sdpa")
    assert "\n" not in str(err.value)
    assert token_updates(loaded, ids, QUERY, attention="eager").mass.shape == (2, 4, QUERY + 1)


ROWS = [17, 19, 21]  # several query rows (the last one is QUERY)
KEYS = list(range(4, 16))


def test_rows_capture_equals_single_row_captures(setup):
    """`capture_query_rows` (keys once, query side per row) and `query_rows_capture` hooked into
    a grad-enabled HF forward: each `row(i)` is the `capture_query` of that row (on both paths)."""
    (_, att), loaded, ids, _, _ = setup
    rows_cap = capture_query_rows(loaded, ids, ROWS, attention=att)
    if att == "eager":
        with query_rows_capture(loaded, ROWS) as get, torch.enable_grad():
            loaded.hf_model(ids)
    else:
        view = sdpa_view(loaded)
        with sdpa_query_rows_capture(view, ROWS) as get, torch.enable_grad():
            view(ids)
    shared = get()
    assert shared.rows == rows_cap.rows == ROWS
    assert rows_cap.rot_k[0].shape[0] == rows_cap.pattern[0].shape[-1] == max(ROWS) + 1
    for i, q in enumerate(ROWS):
        single = capture_query(loaded, ids, q, attention=att)
        for cap in (rows_cap.row(i), shared.row(i)):
            assert cap.query == q
            for name in ("rot_k", "v", "rot_q", "z", "pattern", "attn_out"):
                for x, y in zip(getattr(cap, name), getattr(single, name)):
                    torch.testing.assert_close(x, y, rtol=0, atol=0)


def _assert_close_f32(got: np.ndarray, ref: np.ndarray, name: str) -> None:
    scale = float(np.nanmax(np.abs(ref))) if np.isfinite(ref).any() else 1.0
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6 * scale, equal_nan=True,
                               err_msg=name)


def test_token_updates_rows_equal_single_rows(setup):
    (_, att), loaded, ids, _, weights = setup
    rows = token_updates_rows(loaded, ids, ROWS, attention=att)
    assert [u.query for u in rows] == ROWS
    again = token_updates_from(loaded, capture_query_rows(loaded, ids, ROWS, attention=att),
                               weights)
    for i, q in enumerate(ROWS):
        single = token_updates(loaded, ids, q, attention=att)
        assert rows[i].keys.tolist() == single.keys.tolist() == list(range(q + 1))
        assert rows[i].scale == single.scale and rows[i].gqa_group == single.gqa_group
        for name in ("mass", "contrib_norm", "contrib_sum_norm", "loo_norm", "loo_out_norm",
                     "loo_sum_norm", "dai_fro", "dai_action_norm", "dai_scaled_action_norm",
                     "dai_action_out_norm", "dai_spearman", "dai_cos", "score"):
            got, ref = getattr(rows[i], name), getattr(single, name)
            assert got.shape == ref.shape and got.dtype == np.float32, name
            _assert_close_f32(got, ref, name)
            np.testing.assert_array_equal(getattr(again[i], name), got)


def test_key_summary_equals_token_updates(setup, monkeypatch):
    """The head-aggregated quantities `updates` stores, at several rows and only the given keys."""
    (_, att), loaded, ids, _, weights = setup
    summ = key_summary_from(loaded, capture_query_rows(loaded, ids, ROWS, attention=att), KEYS,
                            weights)
    L = loaded.arch.n_layers
    assert summ.mass.shape == summ.contrib_sum_norm.shape == summ.loo_sum_norm.shape == (
        L, len(ROWS), len(KEYS))
    assert summ.dai_fro.shape == (L, len(KEYS))
    assert summ.rows.tolist() == ROWS and summ.keys.tolist() == KEYS
    for i, q in enumerate(ROWS):
        single = token_updates(loaded, ids, q, attention=att)
        _assert_close_f32(summ.mass[:, i], single.mass[:, :, KEYS].mean(axis=1), "mass")
        _assert_close_f32(summ.contrib_sum_norm[:, i], single.contrib_sum_norm[:, KEYS],
                          "contrib_sum_norm")
        _assert_close_f32(summ.loo_sum_norm[:, i], single.loo_sum_norm[:, KEYS], "loo_sum_norm")
        _assert_close_f32(summ.dai_fro, single.dai_fro[:, :, KEYS].sum(axis=1), "dai_fro")
    # zero exactly at keys outside a sliding window (Gemma's local layers), positive elsewhere
    assert ((summ.loo_sum_norm > 0) == (summ.mass > 0)).all() and (summ.mass > 0).mean() > 0.5
    assert not np.allclose(summ.mass[:, 0], summ.mass[:, -1])
    # rows in chunks of one (a tiny memory budget): the same values
    monkeypatch.setattr("probes.measures.updates.attention_rows._SUMMARY_BUDGET", 1)
    chunked = key_summary_from(loaded, capture_query_rows(loaded, ids, ROWS, attention=att), KEYS,
                               weights)
    for name in ("contrib_sum_norm", "loo_sum_norm"):
        np.testing.assert_allclose(getattr(chunked, name), getattr(summ, name), rtol=1e-12)
    # one matrix product per row (the path for few rows, e.g. --answer-rows first): the same
    monkeypatch.setattr("probes.measures.updates.attention_rows._FEW_ROWS", len(ROWS))
    per_row = key_summary_from(loaded, capture_query_rows(loaded, ids, ROWS, attention=att), KEYS,
                               weights)
    for name in ("mass", "contrib_sum_norm", "loo_sum_norm", "dai_fro"):
        np.testing.assert_allclose(getattr(per_row, name), getattr(summ, name), rtol=1e-12,
                                   atol=1e-300)


def test_rows_reject_bad_inputs(setup):
    (_, att), loaded, ids, _, weights = setup
    for rows in ([], [19, 17], [17, 17], [17, N_TOKENS]):
        with pytest.raises(UpdatesError):
            capture_query_rows(loaded, ids, rows, attention=att)
    cap = capture_query_rows(loaded, ids, ROWS, attention=att)
    with pytest.raises(UpdatesError):
        key_summary_from(loaded, cap, [4, ROWS[0] + 1], weights)   # a key after the first row
    with pytest.raises(UpdatesError):
        key_summary_from(loaded, cap, [5, 4], weights)
