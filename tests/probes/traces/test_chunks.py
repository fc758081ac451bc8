"""Tests for probes.traces.chunks: the splitting rules (unit cases and the real R1-distill traces),
token spans, labels and the aggregation of per-token arrays to chunks."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest

from probes import arrays
from probes.errors import ProbesError
from probes.traces.categories import CATEGORY_CODES, categorize, load_lexicon
from probes.traces.chunks import (
    AGGREGATION,
    aggregate,
    aggregate_arrays,
    chunk_labels,
    per_token_arrays,
    split_text,
    token_chunks,
)
from probes.traces.read import read_traces
from probes.traces.tokenize import tokenize_traces


def _pieces(text: str) -> list[str]:
    return [text[a:b] for a, b in split_text(text)]


def test_split_rules_on_a_constructed_text():
    text = ("<think>\nOkay, so $x = 3.5. y$ is here. Next, e.g. this one.\n\n1. First item\n"
            "2. Is it? Yes! \\[a.\n b\\] end.</think>\nThe answer is $5$.")
    assert _pieces(text) == [
        "<think>",
        "\nOkay, so $x = 3.5. y$ is here.",  # no cut inside $...$, nor at a decimal point
        " Next, e.g. this one.",  # no cut after an abbreviation
        "\n\n1. First item",  # paragraph break; no cut after an enumeration number
        "\n2. Is it?",
        " Yes!",
        " \\[a.\n b\\] end.",  # display math is atomic, even across a line break
        "</think>",
        "\nThe answer is $5$.",
    ]


def test_split_covers_the_text_and_merges_blank_pieces():
    for text in ["", "a", "\n\n", "One. Two.  \n\n  ", "  lead. x"]:
        ranges = split_text(text)
        assert "".join(text[a:b] for a, b in ranges) == text
        assert all(text[a:b].strip() for a, b in ranges) or text.strip() == ""


@pytest.fixture(scope="module")
def real(qwen_tokenizer, real_traces_path):
    """The first 40 real traces, tokenized with the Qwen tokenizer."""
    traces = read_traces(real_traces_path, strict=True).traces[:40]
    tokenized, _ = tokenize_traces(traces, qwen_tokenizer)
    return tokenized


def test_real_traces_spans_cover_every_token_once(real):
    for tt in real:
        ch = token_chunks(tt)
        t = tt.spans["trajectory"][1] - tt.spans["trajectory"][0]
        assert ch.spans[0, 0] == 0 and ch.spans[-1, 1] == t
        assert (ch.spans[1:, 0] == ch.spans[:-1, 1]).all() and (ch.spans[:, 1] > ch.spans[:, 0]).all()
        assert len(ch.chunk_of_token()) == t
        assert "".join(ch.texts) == tt.trajectory_text


def test_real_traces_follow_the_rules(real):
    n_math = n_display = n_para = n_close = 0
    for tt in real:
        text = tt.trajectory_text
        ch = token_chunks(tt)
        starts = set(ch.chars[:, 0].tolist())
        cuts = [a for a, _ in split_text(text)]
        # no character boundary inside inline math
        for m in re.finditer(r"\$[^$\n]+\$", text):
            n_math += 1
            assert not any(m.start() < c < m.end() for c in cuts), text[m.start():m.end()]
        for m in re.finditer(r"\\\[.*?\\\]", text, re.S):  # display math \[...\]
            n_display += 1
            assert not any(m.start() < c < m.end() for c in cuts), text[m.start():m.end()]
        # a paragraph break opens a chunk (at the start of its newline run, or merged into the
        # token that holds the preceding sentence end)
        for m in re.finditer(r"\n\n+(?=\S)", text):
            n_para += 1
            assert any(m.start() - 2 <= s <= m.end() for s in starts)
        # </think> is a chunk of its own
        n = text.count("</think>")
        n_close += n
        assert [t.strip() for t in ch.texts].count("</think>") == n
    assert n_math > 10 and n_display > 10 and n_para > 200 and n_close > 10  # the rules were exercised


def test_real_traces_labels(real):
    lexicon = load_lexicon()
    counts = {name: 0 for name in ("reflection", "delimiter", "ordinary")}
    for tt in real:
        ch = token_chunks(tt)
        labels = chunk_labels(tt, ch, categorize(tt, lexicon))
        for text, code in zip(ch.texts, labels):
            first = text.strip().lstrip("*_-#> ")
            if re.match(r"(Wait|Alternatively|Hmm)\b", first):
                assert code == CATEGORY_CODES["reflection"], text
            if first.startswith("</think>") or re.match(r"(Therefore|Thus|Hence)\b", first):
                assert code == CATEGORY_CODES["delimiter"], text
            if first.startswith(("Okay", "Let's compute", "First")):
                assert code == CATEGORY_CODES["ordinary"], text
        for name in counts:
            counts[name] += int((labels == CATEGORY_CODES[name]).sum())
    assert counts["reflection"] > 50 and counts["delimiter"] > 20 and counts["ordinary"] > 1000


def test_aggregate_sum_telescopes_and_mean_skips_nan():
    rng = np.random.default_rng(0)
    lhat = rng.normal(size=11)
    spans = np.array([[0, 3], [3, 4], [4, 10]])
    delta = np.diff(lhat)
    np.testing.assert_allclose(aggregate(delta, spans, "sum"),
                               lhat[spans[:, 1]] - lhat[spans[:, 0]], atol=1e-12)
    x = np.array([[1.0, np.nan, 3.0, np.nan, 1, 1, 1, 1, 1, 5.0]])
    out = aggregate(x, spans, "mean")
    np.testing.assert_allclose(out[0], [2.0, np.nan, 10 / 6])
    with pytest.raises(ProbesError, match="cover tokens"):
        aggregate(delta[:5], spans, "sum")
    with pytest.raises(ProbesError, match="'sum' or 'mean'"):
        aggregate(delta, spans, "max")


def test_every_per_token_array_has_a_rule():
    groups = itertools.chain(arrays.LABELS, arrays.LHAT, arrays.UPDATES, arrays.ANCHORS)
    per_token = set(per_token_arrays())
    for decl in groups:
        if decl.name in per_token:
            assert AGGREGATION.get(decl.name) in ("sum", "mean"), decl.name


def test_aggregate_arrays_by_rule_and_refuses_unstated():
    spans = np.array([[0, 2], [2, 5]])
    stored = {"lhat_delta": np.arange(5.0), "upd_loo": np.ones((2, 5)), "lhat": np.zeros(6)}
    out = aggregate_arrays(stored, spans)
    assert set(out) == {"lhat_delta", "upd_loo"}  # lhat has no T axis
    np.testing.assert_allclose(out["lhat_delta"], [1.0, 9.0])
    np.testing.assert_allclose(out["upd_loo"], np.ones((2, 2)))
    unruled = [n for n in per_token_arrays() if n not in AGGREGATION]
    if unruled:
        with pytest.raises(ProbesError, match="no chunk aggregation rule"):
            aggregate_arrays({unruled[0]: np.zeros(5)}, spans)


def test_empty_trajectory_is_refused(qwen_tokenizer):
    from probes.traces.read import Trace
    from probes.traces.tokenize import tokenize_trace

    tt = tokenize_trace(Trace("e", "q?", "", "1", {}, 1), qwen_tokenizer)
    if tt.spans["trajectory"][1] == tt.spans["trajectory"][0]:
        with pytest.raises(ProbesError, match="empty trajectory"):
            token_chunks(tt)
