"""Property test: no input line can crash the traces reader or the token categories.

Random JSON values, random bytes, lone surrogates, NULs, huge numbers and deep nesting: every
line is either accepted or skipped with its number and a reason; `--strict` turns the first skip
into one `TraceFormatError`. Seeded and bounded so it runs the same way in CI.
"""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from probes.errors import ProbesError, TraceFormatError
from probes.traces.categories import categorize, load_lexicon
from probes.traces.read import read_traces
from probes.traces.tokenize import tokenize_traces

TEXT = st.one_of(
    st.text(max_size=40),
    st.lists(st.sampled_from(["a", " ", "Wait", "\\boxed{", "}", "<think>", "\x00", "\ud83d",
                              "\udc00", "\u2028", "é", "問"]), max_size=12).map("".join),
)
"""Any text, with lone surrogates, NUL, line separators and the lexicon's markers mixed in."""

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(10**40), max_value=10**40)
    | st.floats(allow_nan=True, allow_infinity=True) | TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)
FIELD = st.sampled_from(["id", "question", "trajectory", "answer", "problem", "solution",
                         "messages", "role", "content"])
RECORD = st.dictionaries(FIELD, JSON | TEXT, max_size=5)
CHAT = st.fixed_dictionaries({"messages": st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system"]),
                           "content": TEXT | JSON}), max_size=3)})
GOOD = st.fixed_dictionaries({"id": TEXT | st.integers(), "question": TEXT, "trajectory": TEXT,
                              "answer": TEXT | st.integers() | st.floats()})


def _line(value) -> bytes:
    text = json.dumps(value, ensure_ascii=True, allow_nan=True)  # surrogates survive as \\udXXX
    return text.encode("ascii")


LINES = st.lists(
    st.one_of(JSON.map(_line), RECORD.map(_line), CHAT.map(_line), GOOD.map(_line),
              st.binary(max_size=30),
              st.integers(1, 3000).map(lambda n: b"[" * n + b"]" * n)),
    min_size=1, max_size=8,
)

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def tokenizer():
    from probes.models import load_tokenizer

    return load_tokenizer("tiny-reasoner")


@SETTINGS
@given(lines=LINES)
def test_every_line_is_accepted_or_skipped_with_its_number(lines, tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("fuzz") / "t.jsonl"
    path.write_bytes(b"\n".join(line.replace(b"\n", b" ") for line in lines) + b"\n")
    traceset = read_traces(path)
    numbered = {t.line_no for t in traceset.traces} | {b.line_no for b in traceset.problems}
    non_blank = {i for i, line in enumerate(path.read_bytes().split(b"\n")[:-1], start=1)
                 if line.strip()}
    assert numbered == non_blank
    assert all(b.reason for b in traceset.problems)
    lexicon = load_lexicon()
    tokenized, _too_long = tokenize_traces(traceset, tokenizer)
    for tt in tokenized:
        cats = categorize(tt, lexicon)
        assert len(cats.category) == tt.n_tokens
    if traceset.problems:
        first = traceset.problems[0]
        with pytest.raises(TraceFormatError, match=f":{first.line_no}: "):
            read_traces(path, strict=True)


def test_surrogates_nul_and_deep_nesting_are_named(tmp_path):
    path = tmp_path / "t.jsonl"
    ok = {"id": "a", "question": "q", "trajectory": "t", "answer": "1"}
    path.write_text("\n".join([
        json.dumps(ok),
        json.dumps({**ok, "id": "b", "trajectory": "cut \ud83d"}),
        json.dumps({**ok, "id": "c\ud83d"}),
        json.dumps({**ok, "id": "d", "question": "q\x00"}),
        "[" * 5000 + "]" * 5000,
    ]) + "\n")
    traceset = read_traces(path)
    assert [t.id for t in traceset.traces] == ["a"]
    reasons = {b.line_no: b.reason for b in traceset.problems}
    assert "lone surrogate" in reasons[2] and "'trajectory'" in reasons[2]
    assert "lone surrogate" in reasons[3] and "'id'" in reasons[3]
    assert "NUL" in reasons[4]
    assert "nested too deeply" in reasons[5]
    with pytest.raises(ProbesError, match=":2: field 'trajectory' holds a lone surrogate"):
        read_traces(path, strict=True)
