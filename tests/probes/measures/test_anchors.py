"""Tests for probes.measures.anchors.receivers: chunk-wise receiver patterns against the full attention
pattern, the receiver-head statistics against scipy, batched suppression against real masked
forwards, and a planted case on tiny-reasoner where one known chunk carries the answer."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch
from transformers import AutoModelForCausalLM

from hooks.edit import edit, mask_keys, mask_keys_per_row
from hooks.errors import HooksError
from probes import DATA_DIR
from probes.errors import ProbesError
from probes.measures.anchors import receivers as anc
from probes.models.load import boot_model, load_model
from probes.models.tiny import TINY_FAMILIES, byte_tokenizer, tiny_config
from probes.traces.read import Trace, read_traces
from probes.traces.tokenize import SPAN_NAMES, TokenizedTrace, tokenize_trace

N_PROMPT, N_TRAJ, N_SCAFFOLD, N_ANSWER = 6, 40, 3, 2
SPANS = np.array([[0, 5], [5, 6], [6, 14], [14, 20], [20, 27], [27, 33], [33, 40]])


def _build(family: str):
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(tiny_config(family), attn_implementation="eager")
    return boot_model(hf, byte_tokenizer(), spec=f"tiny-{family}", device="cpu", dtype="float32")


@pytest.fixture(scope="module", params=sorted(TINY_FAMILIES))
def tiny(request):
    return _build(request.param)


def _trace(seed: int = 0) -> TokenizedTrace:
    rng = np.random.default_rng(seed)
    lengths = (N_PROMPT, N_TRAJ, N_SCAFFOLD, N_ANSWER)
    ids = rng.integers(1, 257, size=sum(lengths)).astype(np.int64)
    spans, start = {}, 0
    for name, n in zip(SPAN_NAMES, lengths):
        spans[name] = (start, start + n)
        start += n
    return TokenizedTrace(trace=Trace(f"syn-{seed}", "q", "t", "a", {}, 1), ids=ids, spans=spans,
                          trajectory_offsets=np.zeros((N_TRAJ, 2), dtype=np.int64),
                          trajectory_text="", prompt_text="")


def _full_patterns(loaded, ids) -> list[np.ndarray]:
    pats: dict[int, np.ndarray] = {}

    def rec(layer):
        def fn(x, hook):
            pats[layer] = x[0].detach().double().numpy()
        return fn

    with torch.inference_mode(), edit(loaded, [(f"L{layer}.attn.pattern", rec(layer))
                                               for layer in range(loaded.arch.n_layers)]):
        loaded.bridge(torch.as_tensor(ids)[None])
    return [pats[layer] for layer in range(loaded.arch.n_layers)]


def test_chunk_attention_equals_full_pattern_average(tiny):
    tt = _trace()
    spans = SPANS + N_PROMPT
    got = anc.chunk_attention(tiny, tt.ids, spans)
    full = _full_patterns(tiny, tt.ids)
    c = len(spans)
    assert got.shape == (tiny.arch.n_layers, tiny.arch.n_heads, c, c)
    for layer, p in enumerate(full):
        for a in range(c):
            for b in range(c):
                ref = p[:, spans[a, 0]:spans[a, 1], spans[b, 0]:spans[b, 1]].mean((1, 2))
                if b <= a:
                    np.testing.assert_allclose(got[layer, :, a, b], ref, atol=1e-6)
                else:
                    assert np.isnan(got[layer, :, a, b]).all()
    assert np.nanstd(got) > 1e-3  # not trivially uniform


def test_vertical_scores_and_kurtosis_against_direct_formulas():
    rng = np.random.default_rng(1)
    c = 12
    pat = np.tril(rng.random((3, 2, c, c)))
    pat[..., np.triu_indices(c, 1)[0], np.triu_indices(c, 1)[1]] = np.nan
    vs = anc.vertical_scores(pat, 4)
    for b in range(c):
        rows = [a for a in range(c) if a >= b + 4]
        ref = pat[..., rows, b].mean(-1) if rows else np.full((3, 2), np.nan)
        np.testing.assert_allclose(vs[..., b], ref, atol=1e-12)
    k = anc.head_kurtosis(vs)
    ref = scipy.stats.kurtosis(vs, axis=-1, fisher=True, bias=True, nan_policy="omit")
    np.testing.assert_allclose(k, np.asarray(ref), atol=1e-10)
    heads, mean = anc.receiver_heads([k, k + 1.0], k=4)
    np.testing.assert_allclose(mean, k + 0.5)
    assert [mean[tuple(h)] for h in heads] == sorted(mean.ravel(), reverse=True)[:4]
    score = anc.receiver_scores(vs, heads)
    sel = vs[heads[:, 0], heads[:, 1]]
    for b in range(c):
        col = sel[:, b][~np.isnan(sel[:, b])]
        if col.size:
            assert score[b] == pytest.approx(col.mean())
        else:
            assert np.isnan(score[b])


def test_mask_keys_per_row_equals_single_masks(tiny):
    tt = _trace(2)
    ids = torch.as_tensor(tt.ids)[None]
    key_sets = [[8, 9, 10], [20, 21], [30]]
    masks = torch.zeros(3, tt.n_tokens, dtype=torch.bool)
    for r, keys in enumerate(key_sets):
        masks[r, keys] = True
    layers = range(tiny.arch.n_layers)
    with torch.inference_mode():
        with edit(tiny, [(f"L{layer}.attn.scores", mask_keys_per_row(masks)) for layer in layers]):
            batched = tiny.bridge(ids.expand(3, -1))
        for r, keys in enumerate(key_sets):
            fn = mask_keys(range(tt.n_tokens), keys, "cpu")
            with edit(tiny, [(f"L{layer}.attn.scores", fn) for layer in layers]):
                single = tiny.bridge(ids)
            torch.testing.assert_close(batched[r], single[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(HooksError, match="do not fit"):
        with torch.inference_mode(), edit(tiny, [("L0.attn.scores", mask_keys_per_row(masks))]):
            tiny.bridge(ids)


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_suppression_equals_real_masked_forwards(tiny, batch_size):
    tt = _trace(3)
    res = anc.suppression(tiny, tt, SPANS, batch_size=batch_size)
    t0 = N_PROMPT
    a0, a1 = tt.spans["answer"]
    base = anc.masked_forward_reference(tiny, tt, [])
    answer = torch.as_tensor(tt.ids[a0:a1])

    def nll(lp):
        return float(-lp[a0 - 1:a1 - 1].gather(-1, answer[:, None]).mean())

    c = len(SPANS)
    assert res.kl.shape == (c, c) and res.dl.shape == (c,)
    assert res.n_forwards == 1 + -(-c // batch_size) and res.n_rows == 1 + c
    for i in range(c):
        keys = range(SPANS[i, 0] + t0, SPANS[i, 1] + t0)
        lp = anc.masked_forward_reference(tiny, tt, keys)
        assert res.dl[i] == pytest.approx(nll(lp) - nll(base), abs=1e-5)
        kl_t = (base.exp() * (base - lp)).sum(-1).double().numpy()  # [N]
        for j in range(c):
            if j <= i:
                assert np.isnan(res.kl[j, i])
                continue
            ref = kl_t[SPANS[j, 0] + t0:SPANS[j, 1] + t0].mean()
            assert res.kl[j, i] == pytest.approx(ref, abs=1e-5, rel=1e-4)
    assert np.nanmax(res.kl) > 1e-3  # masking changes something


def test_suppression_refuses_bad_input(tiny):
    tt = _trace(4)
    with pytest.raises(ProbesError, match="contiguous"):
        anc.suppression(tiny, tt, np.array([[0, 5], [6, 40]]))
    with pytest.raises(ProbesError, match="temperature"):
        anc.suppression(tiny, tt, SPANS, temperature=0.0)


PLANTED = [
    ("What is 12 + 3 + 4?", "Start with 12.\n12 + 3 = 15.\n15 + 4 = 19.\n\nSo the answer is 47.", "47"),
    ("Compute 30 - 5 + 2.", "First, take 30.\n30 - 5 = 25.\n25 + 2 = 27.\n\nThus the total is 61.", "61"),
    ("Evaluate 55 + 6.", "We start from 55.\n55 + 6 = 61.\n\nTherefore, the result is 38.", "38"),
]


@pytest.mark.parametrize(("question", "body", "answer"), PLANTED)
def test_planted_answer_chunk_on_tiny_reasoner(question, body, answer):
    """A tiny-reasoner trace whose gold answer appears in exactly one chunk, the conclusion (the
    steps compute something else): suppressing that chunk, and no other, raises the answer NLL
    by nats."""
    from probes.traces.chunks import token_chunks

    loaded = _reasoner()
    trace = Trace("planted", question, f"<think>\n{body}\n</think>", answer, {}, 1)
    tt = tokenize_trace(trace, loaded.tokenizer)
    ch = token_chunks(tt)
    carrier = [i for i, t in enumerate(ch.texts) if answer in t]
    assert len(carrier) == 1
    res = anc.suppression(loaded, tt, ch.spans, batch_size=3)
    assert int(np.argmax(res.dl)) == carrier[0]
    assert res.dl[carrier[0]] > 2.0
    assert np.abs(np.delete(res.dl, carrier[0])).max() < 0.05 * res.dl[carrier[0]]


_LOADED: dict = {}


def _reasoner():
    if "m" not in _LOADED:
        _LOADED["m"] = load_model("tiny-reasoner", device="cpu")
    return _LOADED["m"]


def test_sample_traces_conclusion_anchors_the_answer():
    """On real sample traces the conclusion chunk ("... the answer is N.") has the largest ΔL."""
    from probes.traces.chunks import token_chunks

    loaded = _reasoner()
    for trace in read_traces(DATA_DIR / "tiny_reasoner_traces.jsonl").traces[:4]:
        tt = tokenize_trace(trace, loaded.tokenizer)
        ch = token_chunks(tt)
        res = anc.suppression(loaded, tt, ch.spans)
        carrier = max(i for i, t in enumerate(ch.texts) if trace.answer in t)
        assert ch.texts[carrier].strip().endswith(f"{trace.answer}.")
        assert int(np.argmax(res.dl)) == carrier
