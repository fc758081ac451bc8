"""`precision="float32"` (the default algebra of `updates`) against the float64 reference.

Every stored `upd_*` array, both passes and both `--answer-rows` modes, on seeded random-init
models of every family `updates` measures and on the trained tiny-reasoner (the tolerances are the
bounds docs/methods.md#precision states per array), and the float32 pieces on their own:
`answer_alignment`'s step norms / consecutive-step cosines (Gram products in float32) and
`key_summary_from`'s M1–M4 (float32 products on the few-rows path).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from probes.errors import ProbesError
from probes.measures.updates.alignment import AlignmentError, answer_alignment
from probes.measures.updates.attention import UpdatesError
from probes.measures.updates.attention_rows import key_summary_from
from probes.measures.updates.families import EAGER_MISSING, SDPA_MISSING
from probes.measures.updates.sdpa_pass import sdpa_query_rows_capture, sdpa_view
from probes.measures.updates.shared_pass import UPDATE_ARRAYS, RunConstants, trace_update_arrays
from probes.models.load import boot_model
from probes.models.tiny import UPDATE_FAMILIES, byte_tokenizer, tiny_config

N_TOKENS = 30
SPANS = {"trajectory": (4, 20), "answer": (23, 28)}
BOUND = {name: 1e-6 for name in UPDATE_ARRAYS}
"""Relative (‖float32 − float64‖ / ‖float64‖ per array) bound of docs/methods.md#precision;
measured ≤ 2e-7 on these models (and on the bench's 1k-token random-init Qwen2)."""
COS_ABS = 1e-6
"""Absolute bound on the cosines (`upd_cos_gate`, `upd_align_cos`): a cosine near 0 has no
relative precision in any dtype."""


def _build(family: str):
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(tiny_config(family), attn_implementation="eager")
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if name.endswith(("proj.bias", "c_attn.bias", "c_fc.bias")):
                param.normal_(0.0, 0.2)
    return boot_model(hf, byte_tokenizer(), spec="tiny-precision", device="cpu", dtype="float32")


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


def _rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert np.array_equal(np.isnan(a), np.isnan(b)), "NaN at different places"
    ok = ~np.isnan(b)
    return float(np.linalg.norm(a[ok] - b[ok]) / max(np.linalg.norm(b[ok]), 1e-30))


def _max_abs(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    ok = ~np.isnan(b)
    return float(np.abs(a[ok] - b[ok]).max(initial=0.0))


@pytest.mark.parametrize("answer_rows", ["first", "mean"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_stored_arrays_within_bound(setup, attention, answer_rows):
    name, loaded, tt = setup
    family = loaded.arch.family
    if (attention == "eager" and family in EAGER_MISSING) or (attention == "sdpa"
                                                              and family in SDPA_MISSING):
        pytest.skip(f"{family} has no {attention} pass")
    consts = RunConstants(loaded)
    f32, q32 = trace_update_arrays(loaded, tt, consts, attention=attention,
                                   answer_rows=answer_rows)                 # the default
    f64, q64 = trace_update_arrays(loaded, tt, consts, attention=attention,
                                   answer_rows=answer_rows, precision="float64")
    assert q32 == q64 and list(f32) == list(f64) == list(UPDATE_ARRAYS)
    for key in UPDATE_ARRAYS:
        assert f32[key].dtype == np.float32 and f32[key].shape == f64[key].shape
        assert _rel(f32[key], f64[key]) <= BOUND[key], (name, key, _rel(f32[key], f64[key]))
    for key in ("upd_cos_gate", "upd_align_cos"):
        assert _max_abs(f32[key], f64[key]) <= COS_ABS, (name, key)


def test_float64_is_the_reference_computation(setup):
    """precision="float64" is the code path the identity tests (V0–V9) check: the M6 quantities
    of `answer_alignment`'s default (float64) and the float32 step norms / cosines within bound."""
    name, loaded, tt = setup
    if loaded.arch.family in EAGER_MISSING:
        pytest.skip("no eager pass")
    ids, traj, answer = tt.ids, tuple(tt.spans["trajectory"]), tuple(tt.spans["answer"])
    ref = answer_alignment(loaded, ids, traj, answer)
    assert answer_alignment(loaded, ids, traj, answer, precision="float64").step_norm.tobytes() \
        == ref.step_norm.tobytes()
    new = answer_alignment(loaded, ids, traj, answer, precision="float32")
    np.testing.assert_array_equal(new.inner, ref.inner)         # float64 in both
    np.testing.assert_array_equal(new.m7, ref.m7)
    assert _rel(new.step_norm, ref.step_norm) <= 1e-6, name
    assert _max_abs(new.step_cos, ref.step_cos) <= COS_ABS, name
    assert _max_abs(new.cos, ref.cos) <= COS_ABS, name


def test_key_summary_float32_within_bound(setup):
    name, loaded, tt = setup
    if loaded.arch.family in SDPA_MISSING:
        pytest.skip("no linear-memory pass")
    ids = torch.as_tensor(np.asarray(tt.ids)).reshape(1, -1)
    a, b = tt.spans["trajectory"]
    q = int(tt.spans["answer"][0]) - 1
    view = sdpa_view(loaded)
    with sdpa_query_rows_capture(view, [q], device=None) as get:
        with torch.no_grad():
            view(ids)
    cap = get()
    ref = key_summary_from(loaded, cap, range(a, b))
    new = key_summary_from(loaded, cap, range(a, b), precision="float32")
    for key in ("mass", "contrib_sum_norm", "loo_sum_norm", "dai_fro"):
        assert getattr(new, key).dtype == np.float64
        assert _rel(getattr(new, key), getattr(ref, key)) <= 1e-6, (name, key)
    with pytest.raises(UpdatesError, match="precision must be one of float32, float64"):
        key_summary_from(loaded, cap, range(a, b), precision="half")


def test_unknown_precision_is_refused(setup):
    _, loaded, tt = setup
    with pytest.raises(ProbesError, match=r"precision must be one of float32, float64, got 'half'"):
        trace_update_arrays(loaded, tt, precision="half")
    with pytest.raises(AlignmentError, match="precision must be one of float32, float64"):
        answer_alignment(loaded, tt.ids, tuple(tt.spans["trajectory"]),
                         tuple(tt.spans["answer"]), precision="half")
