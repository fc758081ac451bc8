"""The linear-memory pass (`probes.measures.updates.sdpa_pass`) equals the eager reference.

Every stored `upd_*` array (both `--answer-rows` modes), every captured tensor of the M1–M4 and M5
captures, and the pattern-row recomputation, on seeded random-init models of every family
`updates` measures (Qwen2 / Llama / Qwen3 / Mistral / GPT-2 / Phi-3; fp32, GQA, non-zero biases)
and the built-in trained tiny-reasoner; tolerance 1e-5 relative (float32). Phi-3 has no eager
M1–M4 capture (its bridge does not fire hook_rot_q/k): its linear-memory captures are compared with
the bridge's v / z / pattern / attn_out, and `updates` refuses its eager pass in one line. Gemma-2
has no linear-memory pass (the fused kernel cannot soft-cap): refused in one line, `auto` picks
eager. Gemma-3's sliding-window layer is recomputed with its window.
The identity tests of test_alignment.py / test_attention.py run on both paths too; the M5
identities (V5a/V5b/V9) are checked here on the new capture.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from hooks import capture
from probes.errors import ProbesError
from probes.measures.updates.attention import UpdatesError, capture_query_rows
from probes.measures.updates.families import EAGER_MISSING, SDPA_MISSING
from probes.measures.updates.mlp import capture_rows, layer_weights, mlp_updates_from
from probes.measures.updates.sdpa_pass import (
    LinearPassError,
    pattern_rows,
    record_attention,
    sdpa_query_rows_capture,
    sdpa_row_capture,
    sdpa_view,
)
from probes.measures.updates.shared_pass import (
    EAGER_PATTERN_BUDGET,
    UPDATE_ARRAYS,
    RunConstants,
    choose_attention,
    trace_update_arrays,
)
from probes.models.load import boot_model
from probes.models.tiny import UPDATE_FAMILIES, byte_tokenizer, tiny_config

N_TOKENS = 30
SPANS = {"trajectory": (4, 20), "answer": (23, 28)}
REL = 1e-5
AMPLIFYING_ARRAYS = ("upd_align_cos", "upd_dl_pred", "upd_m7", "upd_loo")
GRAD_REL_TRAINED = 1e-4
"""Tolerance of the float32 arrays that amplify rounding on the trained tiny-reasoner (answer loss
≈ 1e-4 nats, attention rows with p → 1): the gradient-derived M6/M7 arrays, whose float32 values on
EITHER path are 1e-3 .. 7e-3 from a float64 evaluation (the paths agree to <= 5e-5, measured on 4
traces), and `upd_loo` (p/(1 − p)) in the "mean" mode, where the eager reference is 5e-5 from float64
and the new path 2.6e-5. `test_alignment_equal_in_float64`
checks the same computation with float64 weights to 1e-5."""


def _build(family: str):
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(tiny_config(family), attn_implementation="eager")
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if name.endswith(("proj.bias", "c_attn.bias", "c_fc.bias")):
                param.normal_(0.0, 0.2)
            elif name.endswith(("layernorm.weight", "ln_1.weight", "ln_2.weight")):
                param.normal_(1.0, 0.3)
    return boot_model(hf, byte_tokenizer(), spec="tiny-sdpa", device="cpu", dtype="float32")


@pytest.fixture(scope="module", params=[*sorted(UPDATE_FAMILIES), "tiny-reasoner"])
def setup(request):
    """(name, loaded model, tokenized-trace-like object)."""
    if request.param == "tiny-reasoner":
        from probes import DATA_DIR
        from probes.models import load_model
        from probes.traces.read import read_traces
        from probes.traces.tokenize import tokenize_trace

        loaded = load_model("tiny-reasoner", device="cpu")
        trace = next(iter(read_traces(DATA_DIR / "tiny_reasoner_traces.jsonl")))
        return request.param, loaded, tokenize_trace(trace, loaded.tokenizer)
    loaded = _build(request.param)
    ids = torch.randint(0, 257, (N_TOKENS,), generator=torch.Generator().manual_seed(1))
    return request.param, loaded, SimpleNamespace(ids=ids.numpy(), spans=SPANS)


def _softmax_keep_f64(orig):
    def softmax(x, dim=None, _stacklevel=3, dtype=None):
        return orig(x, dim=dim, dtype=None if x.dtype == torch.float64 else dtype)
    return softmax


def _rms_forward(self, x: torch.Tensor) -> torch.Tensor:
    var = x.pow(2).mean(-1, keepdim=True)
    return self.weight * (x * torch.rsqrt(var + self.variance_epsilon))


def _rel(a, b) -> float:
    a, b = torch.as_tensor(np.asarray(a), dtype=torch.float64), torch.as_tensor(np.asarray(b),
                                                                                dtype=torch.float64)
    ok = ~(torch.isnan(a) | torch.isnan(b))
    assert torch.equal(torch.isnan(a), torch.isnan(b)), "NaN at different places"
    return float((a[ok] - b[ok]).norm() / b[ok].norm().clamp_min(1e-30))


@pytest.mark.parametrize("answer_rows", ["first", "mean"])
def test_stored_arrays_equal_reference(setup, answer_rows):
    name, loaded, tt = setup
    consts = RunConstants(loaded)
    if loaded.arch.family in EAGER_MISSING:       # no eager reference: refused in one line
        with pytest.raises(UpdatesError, match=r"^updates: no eager pass for 'phi3' models"):
            trace_update_arrays(loaded, tt, consts, answer_rows=answer_rows, attention="eager")
        new, _ = trace_update_arrays(loaded, tt, consts, answer_rows=answer_rows)   # auto: sdpa
        assert all(np.isfinite(new[k]).any() for k in UPDATE_ARRAYS)
        return
    if loaded.arch.family in SDPA_MISSING:        # no linear-memory pass: refused in one line
        with pytest.raises(UpdatesError, match=r"^updates: no linear-memory pass for 'gemma2' "
                                               r"models \(attention logit soft-capping"):
            trace_update_arrays(loaded, tt, consts, answer_rows=answer_rows, attention="sdpa")
        new, _ = trace_update_arrays(loaded, tt, consts, answer_rows=answer_rows)  # auto: eager
        assert all(np.isfinite(new[k]).any() for k in UPDATE_ARRAYS)
        return
    ref, q_ref = trace_update_arrays(loaded, tt, consts, answer_rows=answer_rows, attention="eager")
    new, q_new = trace_update_arrays(loaded, tt, consts, answer_rows=answer_rows, attention="sdpa")
    assert q_new == q_ref
    assert list(new) == list(ref) == list(UPDATE_ARRAYS)
    for key in UPDATE_ARRAYS:
        assert new[key].dtype == np.float32 and new[key].shape == ref[key].shape
        tol = GRAD_REL_TRAINED if name == "tiny-reasoner" and key in AMPLIFYING_ARRAYS else REL
        assert _rel(new[key], ref[key]) < tol, (name, key, _rel(new[key], ref[key]))


def _refuses_softcap(loaded, ids) -> bool:
    """For a family without a linear-memory pass (Gemma-2): check that a recorded forward of the
    view is refused in one line naming the soft-capping, and say so."""
    if loaded.arch.family not in SDPA_MISSING:
        return False
    view = sdpa_view(loaded)
    with (pytest.raises(LinearPassError, match=r"^the linear-memory pass cannot apply attention "
                                               r"logit soft-capping"),
          torch.no_grad(), record_attention([int(ids.shape[1]) - 1])):
        view(ids)
    return True


def test_captures_equal_bridge_captures(setup):
    name, loaded, tt = setup
    ids = torch.as_tensor(np.asarray(tt.ids)).reshape(1, -1)
    if _refuses_softcap(loaded, ids):
        return
    rows = list(range(tt.spans["answer"][0] - 1, tt.spans["answer"][1] - 1))
    eager_q = loaded.arch.family not in EAGER_MISSING
    ref_q = capture_query_rows(loaded, ids, rows) if eager_q else _bridge_query_side(loaded, ids,
                                                                                    rows)
    ref_r = capture_rows(loaded, ids, rows)
    view = sdpa_view(loaded)
    with (torch.no_grad(), sdpa_query_rows_capture(view, rows) as get_q,
          sdpa_row_capture(view, rows) as get_r):
        logits = view(ids).logits
    new_q, new_r = get_q(), get_r(logits)
    for field in ("rot_k", "v", "rot_q", "z", "pattern", "attn_out") if eager_q else (
            "v", "z", "pattern", "attn_out"):
        for a, b in zip(getattr(new_q, field), getattr(ref_q, field), strict=True):
            assert a.shape == b.shape and _rel(a, b) < REL, (name, field)
    for field in ("v", "pattern", "resid_pre", "resid_mid", "ln2_out", "mlp_pre",
                  "mlp_pre_linear", "mlp_post"):
        if getattr(ref_r, field) is None:                 # a plain MLP has no up projection
            assert getattr(new_r, field) is None and loaded.arch.mlp == "plain", (name, field)
            continue
        for a, b in zip(getattr(new_r, field), getattr(ref_r, field), strict=True):
            assert a.shape == b.shape and _rel(a, b) < REL, (name, field)
    # the model itself is untouched: still the bridge's eager attention, no hooks left behind
    assert loaded.hf_model.config._attn_implementation == "eager"
    with torch.no_grad():
        assert _rel(logits, loaded.bridge(ids)) < REL


def _bridge_query_side(loaded, ids, rows) -> SimpleNamespace:
    """v / z / pattern / attn_out at `rows` from the bridge's own hooks (what the Phi-3 bridge
    fires; its rotated q/k hooks do not)."""
    L, last = loaded.arch.n_layers, rows[-1]
    with (capture(loaded, [f"L{l}.attn.v" for l in range(L)], positions=slice(0, last + 1),
                  dtype="float32") as kv,
          capture(loaded, [f"L{l}.{c}" for l in range(L) for c in ("attn.z", "attn.pattern",
                                                                    "attn_out")],
                  positions=rows, dtype="float32") as qs):
        loaded.bridge(ids)
    return SimpleNamespace(v=[kv[f"L{l}.attn.v"] for l in range(L)],
                           z=[qs[f"L{l}.attn.z"] for l in range(L)],
                           pattern=[qs[f"L{l}.attn.pattern"][:, :, : last + 1] for l in range(L)],
                           attn_out=[qs[f"L{l}.attn_out"] for l in range(L)])


def test_m5_identities_on_new_capture(setup):
    """V9 (the restricted-prefix rebuild ends at the captured u) and V5b's rank-1 norms hold on
    the sdpa capture as on the bridge one: `mlp_updates_from` equals the reference."""
    name, loaded, tt = setup
    ids = torch.as_tensor(np.asarray(tt.ids)).reshape(1, -1)
    q = tt.spans["answer"][0] - 1
    traj = list(range(*tt.spans["trajectory"]))
    if _refuses_softcap(loaded, ids):
        return
    weights = layer_weights(loaded, any_layout=True)
    ref = mlp_updates_from(capture_rows(loaded, ids, [q]), weights, traj)
    view = sdpa_view(loaded)
    with torch.no_grad(), sdpa_row_capture(view, [q]) as get:
        view(ids)
    new = mlp_updates_from(get(), weights, traj)
    names = weights[0].names                               # ("gate", "up") or ("in",)
    for key in ("down_fro", "delta_norm", "u_base", *(f"{s}_{n}" for n in names for s in (
            "sigma", "cos", "cum_fro", "total_fro"))):
        assert _rel(getattr(new, key), getattr(ref, key)) < REL, (name, key)
    # V9: the cumulative patch after the last token is the whole-trajectory patch
    for n in names:
        np.testing.assert_allclose(new.get(f"cum_fro_{n}")[:, -1], new.get(f"total_fro_{n}"),
                                   rtol=1e-6)


def test_alignment_equal_in_float64():
    """M6/M7 of the trained tiny-reasoner on both paths in float64 end to end (softmax and RMSNorm
    kept in float64; the bridge's eager attention and RoPE tables still round through float32 in
    places): equal to 1e-5, so the fp32 gap above is rounding, not a different sum."""
    from probes import DATA_DIR
    from probes.measures.updates.alignment import answer_alignment
    from probes.models import load_model
    from probes.traces.read import read_traces
    from probes.traces.tokenize import tokenize_trace

    loaded = load_model("tiny-reasoner", device="cpu")
    trace = list(read_traces(DATA_DIR / "tiny_reasoner_traces.jsonl"))[2]
    tt = tokenize_trace(trace, loaded.tokenizer)
    hf = loaded.hf_model
    norm_cls = type(hf.model.norm)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.nn.functional, "softmax", _softmax_keep_f64(torch.nn.functional.softmax))
        mp.setattr(norm_cls, "forward", _rms_forward)
        try:
            hf.to(torch.float64)
            spans = (tt.spans["trajectory"], tt.spans["answer"])
            ref = answer_alignment(hf, tt.ids, *spans)
            new = answer_alignment(loaded, tt.ids, *spans, attention="sdpa")
        finally:
            hf.to(torch.float32)
    for key in ("inner", "step_norm", "cos", "m7", "m7_head", "mass", "grad_norm", "step_cos"):
        assert _rel(getattr(new, key), getattr(ref, key)) < REL, key
    assert abs(new.loss - ref.loss) < 1e-6 * ref.loss


def test_pattern_rows_is_the_eager_softmax():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(4, 3, 8, generator=g, dtype=torch.float64)
    k = torch.randn(2, 10, 8, generator=g, dtype=torch.float64)
    rows = torch.tensor([2, 5, 9])
    p = pattern_rows(q, k, rows, 0.3)
    kk = k.repeat_interleave(2, dim=0)
    for i, r in enumerate(rows.tolist()):
        ref = torch.softmax(torch.einsum("hd,hkd->hk", q[:, i], kk[:, : r + 1]) * 0.3, dim=-1)
        torch.testing.assert_close(p[:, i, : r + 1], ref)
        assert float(p[:, i, r + 1:].abs().sum()) == 0.0


def test_refusals(setup):
    _, loaded, tt = setup
    with pytest.raises(ProbesError, match="attention must be one of auto, sdpa, eager"):
        trace_update_arrays(loaded, tt, attention="flash")
    with pytest.raises(LinearPassError, match="strictly increasing"):
        with record_attention([3, 2]):
            pass
    view = sdpa_view(loaded)
    ids = torch.as_tensor(np.asarray(tt.ids)).reshape(1, -1)
    first = "soft-capping" if loaded.arch.family in SDPA_MISSING else "explicit mask"
    with pytest.raises(LinearPassError, match=first):
        with torch.no_grad(), record_attention([1]):
            mask = torch.zeros(1, 1, ids.shape[1], ids.shape[1])
            view(ids, attention_mask=mask)


def test_auto_picks_eager_for_short_and_sdpa_for_long_traces(setup):
    _, loaded, _ = setup
    arch = loaded.arch
    per_token2 = arch.n_layers * arch.n_heads * 4                       # float32 patterns
    edge = int((EAGER_PATTERN_BUDGET / per_token2) ** 0.5)
    if arch.family in EAGER_MISSING:                  # the linear-memory pass at every length
        assert choose_attention(loaded, 10) == choose_attention(loaded, edge + 1) == "sdpa"
        return
    if arch.family in SDPA_MISSING:                   # the eager pass at every length
        assert choose_attention(loaded, 10) == choose_attention(loaded, edge + 1) == "eager"
        return
    assert choose_attention(loaded, edge) == "eager"
    assert choose_attention(loaded, edge + 1) == "sdpa"
    assert choose_attention(loaded, 10, "sdpa") == "sdpa"
    assert choose_attention(loaded, 10**6, "eager") == "eager"
