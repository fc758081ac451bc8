"""Tests for probes.measures.anchors.resampling: the importance formulas on hand-made samples, and sampling
with tiny-reasoner (seeded, graded, forced answers when a continuation is cut)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from probes import DATA_DIR
from probes.errors import ProbesError
from probes.measures.anchors import resampling as rs
from probes.measures.anchors.resampling import Sample, importance


def _s(i, first, answer, gold="5"):
    return Sample(prefix=i, first_chunk=first, answer=answer, correct=answer == gold, forced=False,
                  n_tokens=1)


ORIGINALS = ["Start.", "Wait, 2 + 3 = 5.", "So 5."]
SAMPLES = [
    # prefix 0: all keep the original first chunk
    _s(0, "Start.", "5"), _s(0, "Start.", "4"),
    # prefix 1: one similar (correct), two dissimilar (wrong, different answers)
    _s(1, "Wait,  2 + 3 = 5.", "5"), _s(1, "So 6.", "6"), _s(1, "Hmm 7.", "7"),
    # prefix 2: one similar, one dissimilar
    _s(2, "So 5.", "5"), _s(2, "So 4.", "4"),
    # prefix 3 (after the trajectory)
    _s(3, "", "5"), _s(3, "", "5"),
]


def test_importance_formulas_exact_filter():
    imp = importance(SAMPLES, ORIGINALS)
    np.testing.assert_allclose(imp.acc, [0.5, 1 / 3, 0.5, 1.0])
    np.testing.assert_allclose(imp.resampling, [1 / 3 - 0.5, 0.5 - 1 / 3, 0.5])
    assert imp.n_dissimilar.tolist() == [0, 2, 1]
    assert np.isnan(imp.ci_acc[0]) and np.isnan(imp.ci_kl[0])  # nothing dissimilar
    # chunk 1: dissimilar {6, 7} all wrong; next = prefix 2 (acc 0.5)
    assert imp.ci_acc[1] == pytest.approx(0.0 - 0.5)
    # KL(p_dis || p_ref), p_dis = {6: 1/2, 7: 1/2}; ref = prefix 2 ∪ similar at 1 = {5: 2, 4: 1}
    a, v = rs.SMOOTHING, 4
    p = {"6": (1 + a) / (2 + a * v), "7": (1 + a) / (2 + a * v), "5": a / (2 + a * v),
         "4": a / (2 + a * v)}
    q = {"6": a / (3 + a * v), "7": a / (3 + a * v), "5": (2 + a) / (3 + a * v),
         "4": (1 + a) / (3 + a * v)}
    assert imp.ci_kl[1] == pytest.approx(sum(p[k] * math.log(p[k] / q[k]) for k in p), rel=1e-9)
    # chunk 2: dissimilar {4} wrong; next = prefix 3 (acc 1)
    assert imp.ci_acc[2] == pytest.approx(-1.0)


def test_importance_prob_true_and_embedding_filter():
    imp = importance(SAMPLES, ORIGINALS, prob_true=True)
    a = rs.SMOOTHING
    p, q = a / (1 + 2 * a), (2 + 3 * a) / (3 * (1 + 2 * a))  # P(correct): 0 vs 2/3
    ref = p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))
    assert imp.ci_kl[1] == pytest.approx(ref, rel=1e-6)

    def embed(texts):  # "similar" = same first word
        vocab = sorted({t.split()[0] if t.split() else "" for t in texts})
        return np.eye(len(vocab))[[vocab.index(t.split()[0] if t.split() else "") for t in texts]]

    imp = importance(SAMPLES, ORIGINALS, similarity="embedding", embed=embed)
    assert imp.n_dissimilar.tolist() == [0, 2, 0]  # "So 4." counts as similar to "So 5."
    with pytest.raises(ProbesError, match="needs an embedding model"):
        importance(SAMPLES, ORIGINALS, similarity="embedding")
    with pytest.raises(ProbesError, match="unknown similarity"):
        importance(SAMPLES, ORIGINALS, similarity="cosine")


def test_first_chunk():
    assert rs.first_chunk(" verify: 3 = 3. Yes.\n4 + 1 = 5.") == "verify: 3 = 3."
    assert rs.first_chunk("\n\n") == ""


@pytest.fixture(scope="module")
def reasoner():
    from probes.models.load import load_model
    from probes.traces.read import read_traces
    from probes.traces.tokenize import tokenize_trace

    loaded = load_model("tiny-reasoner", device="cpu")
    trace = read_traces(DATA_DIR / "tiny_reasoner_traces.jsonl").traces[1]
    return loaded, tokenize_trace(trace, loaded.tokenizer)


def test_resample_is_seeded_and_graded(reasoner):
    from probes.traces.chunks import token_chunks

    loaded, tt = reasoner
    ch = token_chunks(tt)
    spans = ch.spans[-4:] - 0  # the last chunks only: short continuations
    spans = np.vstack([[0, spans[0, 0]], spans])  # keep spans covering the trajectory start
    settings = rs.ResampleSettings(k=3, temperature=1.0, seed=7, batch_rows=5)
    a = rs.resample(loaded, tt, spans, settings)
    b = rs.resample(loaded, tt, spans, rs.ResampleSettings(k=3, temperature=1.0, seed=7,
                                                           batch_rows=64))
    assert [(s.prefix, s.answer, s.first_chunk) for s in a] == \
        [(s.prefix, s.answer, s.first_chunk) for s in b]  # the batch does not change a sample
    assert len(a) == (len(spans) + 1) * 3
    assert [s.prefix for s in a] == [i for i in range(len(spans) + 1) for _ in range(3)]
    for s in a:
        assert s.answer is not None and s.correct == (s.answer == tt.trace.answer)
    assert all(s.correct for s in a if s.prefix == len(spans))  # after the full trajectory
    c = rs.resample(loaded, tt, spans, rs.ResampleSettings(k=3, temperature=1.0, seed=8))
    assert [s.first_chunk for s in c] != [s.first_chunk for s in a]


def test_cut_continuations_get_a_forced_answer(reasoner):
    loaded, tt = reasoner
    n = tt.spans["trajectory"][1] - tt.spans["trajectory"][0]
    spans = np.array([[0, n - 8], [n - 8, n]])
    out = rs.resample(loaded, tt, spans, rs.ResampleSettings(k=2, max_new_tokens=3))
    assert all(s.forced for s in out)  # every continuation was cut
    late = [s for s in out if s.prefix == 1]  # cut 3 tokens before the end: forced = gold answer
    assert late and all(s.answer == tt.trace.answer and s.correct for s in late)
    with pytest.raises(ProbesError, match="--top-p"):
        rs.resample(loaded, tt, spans, rs.ResampleSettings(top_p=0.0))
