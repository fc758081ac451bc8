"""Tests for probes.traces: record shapes, bad lines, tokenization into named spans."""

import json

import numpy as np
import pytest

from probes.errors import ProbesError, TraceFormatError
from probes.traces.read import Trace, extract_boxed, read_traces
from probes.traces.tokenize import (
    ANSWER_SUFFIX,
    DEFAULT_PROMPT_TEMPLATE,
    DEFAULT_SCAFFOLD,
    SPAN_NAMES,
    TraceTooLongError,
    tokenize_trace,
    tokenize_traces,
)

THINK_CLOSE_ID = 151668  # "</think>" in the Qwen3 tokenizer
THINK_OPEN_ID = 151667


def write_jsonl(path, lines):
    """Write raw lines (dicts are JSON-encoded) to a JSONL file and return its path."""
    path.write_text(
        "\n".join(json.dumps(x) if isinstance(x, (dict, list)) else x for x in lines) + "\n",
        encoding="utf-8",
    )
    return path


def make_trace(trajectory="<think>\nOkay. Wait, 2+2=4.\n</think>\n\nIt is 4.", answer="4"):
    return Trace("t0", "What is 2+2?", trajectory, answer, {}, 1)


# --------------------------------------------------------------------------------------------------
# Reading


def test_question_trajectory_shape(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [
        {"id": "a", "question": "Q1", "trajectory": "<think>\nT1\n</think>\n\nA", "answer": "1",
         "level": 3},
        {"question": "Q2", "trajectory": "T2 without think tags", "answer": 2},
    ])
    ts = read_traces(path)
    assert ts.problems == []
    assert [t.id for t in ts] == ["a", "line2"]
    a, b = ts.traces
    assert (a.question, a.trajectory, a.answer, a.meta, a.line_no) == (
        "Q1", "<think>\nT1\n</think>\n\nA", "1", {"level": 3}, 1)
    assert b.answer == "2" and b.trajectory == "T2 without think tags"


def test_a_utf8_bom_keeps_the_first_record(tmp_path):
    """Editors on Windows start a UTF-8 file with a BOM; it once turned line 1 into bad JSON."""
    records = [{"id": "a", "question": "Q1", "trajectory": "T1", "answer": "1"},
               {"id": "b", "question": "Q2", "trajectory": "T2 \ufeff inside", "answer": "2"}]
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in records).encode())
    ts = read_traces(path, strict=True)
    assert ts.problems == [] and [t.id for t in ts] == ["a", "b"]
    assert ts.traces[1].trajectory == "T2 \ufeff inside"  # only the file's first BOM is dropped


def test_problem_solution_shape(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [
        {"problem": "P", "solution": "S steps", "answer": 1.5, "source": "x"},
    ])
    (t,) = read_traces(path).traces
    assert (t.id, t.question, t.trajectory, t.answer, t.meta) == ("line1", "P", "S steps", "1.5",
                                                                  {"source": "x"})


def test_chat_shape(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [
        {"id": "plain", "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "old question"},
            {"role": "assistant", "content": "old answer"},
            {"role": "user", "content": "What is 1+1?"},
            {"role": "assistant", "content": "1+1=2, so \\boxed{\\frac{4}{2}} hmm, \\boxed{2}"},
        ]},
        {"id": "reasoning", "answer": "7", "tag": "r", "messages": [
            {"role": "user", "content": "Q?"},
            {"role": "assistant", "reasoning_content": "think hard", "content": "It is 7."},
        ]},
    ])
    ts = read_traces(path)
    assert ts.problems == []
    plain, reasoning = ts.traces
    assert plain.question == "What is 1+1?"
    assert plain.trajectory == "1+1=2, so \\boxed{\\frac{4}{2}} hmm, \\boxed{2}"
    assert plain.answer == "2"
    assert reasoning.trajectory == "<think>\nthink hard\n</think>\n\nIt is 7."
    assert reasoning.answer == "7"
    assert reasoning.meta == {"tag": "r"}


def test_extract_boxed_is_balanced():
    assert extract_boxed(r"x \boxed{\frac{1}{2}} y") == r"\frac{1}{2}"
    assert extract_boxed(r"\boxed{1} then \boxed{\{a, b\}}") == r"\{a, b\}"
    assert extract_boxed(r"\boxed{3} and \boxed{unclosed") == "3"
    assert extract_boxed("no box") is None


def test_bad_lines_are_skipped_and_reported(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [
        {"id": "ok", "question": "Q", "trajectory": "T", "answer": "1"},   # 1
        "{not json",                                                        # 2
        "",                                                                 # 3 blank: ignored
        {"id": "m", "question": "Q", "answer": "1"},                        # 4 missing trajectory
        {"id": "e", "question": "Q", "trajectory": "T", "answer": "  "},    # 5 empty answer
        {"id": "ok", "question": "Q2", "trajectory": "T2", "answer": "2"},  # 6 duplicate id
        "[1, 2]",                                                           # 7 not an object
        {"messages": [{"role": "user", "content": "Q"},
                      {"role": "assistant", "content": "no box"}]},         # 8 no answer
        {"id": "ok2", "problem": "P", "solution": "S", "answer": "3"},      # 9
        {"foo": 1},                                                         # 10 no known shape
    ])
    ts = read_traces(path)
    assert [t.id for t in ts] == ["ok", "ok2"]
    reasons = {p.line_no: p.reason for p in ts.problems}
    assert sorted(reasons) == [2, 4, 5, 6, 7, 8, 10]
    assert reasons[2].startswith("invalid JSON")
    assert "missing field(s) 'trajectory'" in reasons[4]
    assert "accepted shapes" in reasons[4]
    assert reasons[5] == "empty 'answer'"
    assert reasons[6] == "duplicate id 'ok' (first on line 1)"
    assert reasons[7] == "expected a JSON object, got list"
    assert "no 'answer' field and no balanced \\boxed" in reasons[8]
    assert "missing field(s) 'question', 'trajectory', 'answer'" in reasons[10]


def test_strict_raises_on_first_bad_line(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [
        {"question": "Q", "trajectory": "T", "answer": "1"},
        {"question": "Q", "trajectory": "", "answer": "1"},
        "{not json",
    ])
    with pytest.raises(TraceFormatError, match=r"t\.jsonl:2: empty 'trajectory'"):
        read_traces(path, strict=True)


def test_missing_file(tmp_path):
    with pytest.raises(ProbesError, match=r"nope\.jsonl' does not exist"):
        read_traces(tmp_path / "nope.jsonl")


def test_real_trace_file_reads_cleanly(real_traces_path):
    ts = read_traces(real_traces_path, strict=True)
    assert len(ts) == 487
    assert all(t.trajectory.startswith("<think>") for t in ts)
    assert ts.traces[0].id == "MATH-problem_0" and "model_answer" in ts.traces[0].meta


# --------------------------------------------------------------------------------------------------
# Tokenizing (real Qwen3 tokenizer)


def assert_spans_cover(tt):
    starts = [tt.spans[n][0] for n in SPAN_NAMES]
    ends = [tt.spans[n][1] for n in SPAN_NAMES]
    assert starts[0] == 0 and ends[-1] == tt.n_tokens
    assert starts[1:] == ends[:-1]
    assert tt.ids.dtype == np.int64
    assert tt.trajectory_offsets.shape == (len(tt.ids[tt.span("trajectory")]), 2)


def test_tokenize_spans_and_decodes(qwen_tokenizer):
    tok = qwen_tokenizer
    trace = make_trace()
    tt = tokenize_trace(trace, tok)
    assert_spans_cover(tt)
    # Qwen3's template does not open <think> itself: the trajectory keeps its own.
    assert tt.prompt_text.endswith("<|im_start|>assistant\n")
    assert tt.trajectory_text == trace.trajectory
    assert tok.decode(tt.ids[tt.span("trajectory")]) == trace.trajectory
    assert tok.decode(tt.ids[tt.span("scaffold")]) == DEFAULT_SCAFFOLD
    assert tok.decode(tt.ids[tt.span("answer")]) == "4" + ANSWER_SUFFIX == "4}"
    assert tok.decode(tt.ids[tt.span("prompt")]) == tt.prompt_text
    traj = tt.ids[tt.span("trajectory")]
    assert traj[0] == THINK_OPEN_ID
    assert (traj == THINK_CLOSE_ID).sum() == 1  # "</think>" is one special token
    # Offsets index the trajectory text.
    k = int(np.flatnonzero(traj == THINK_CLOSE_ID)[0])
    s, e = tt.trajectory_offsets[k]
    assert tt.trajectory_text[s:e] == "</think>"
    assert tok.bos_token_id is None  # Qwen adds no BOS: the sequence starts with <|im_start|>
    assert tt.ids[0] == tok.convert_tokens_to_ids("<|im_start|>")


def test_chat_template_strips_duplicated_think(qwen_tokenizer_dir):
    r1_template = (qwen_tokenizer_dir / "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja").read_text(
        encoding="utf-8")
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(qwen_tokenizer_dir)  # own copy: we edit it
    tok.chat_template = r1_template
    trace = make_trace()
    tt = tokenize_trace(trace, tok)
    assert tt.prompt_text.endswith("<｜Assistant｜><think>\n")
    assert tt.trajectory_text == "Okay. Wait, 2+2=4.\n</think>\n\nIt is 4."
    assert tok.decode(tt.ids[: tt.spans["trajectory"][1]]) == tt.prompt_text + tt.trajectory_text
    assert (tt.ids == THINK_OPEN_ID).sum() == 1
    # Without <think> in the trajectory nothing is stripped.
    plain = tokenize_trace(make_trace(trajectory="Okay, 4."), tok)
    assert plain.trajectory_text == "Okay, 4."


def test_prompt_format_override(qwen_tokenizer):
    trace = make_trace()
    tt = tokenize_trace(trace, qwen_tokenizer, prompt_format="Q: {question}\nA:")
    assert tt.prompt_text == "Q: What is 2+2?\nA:"
    default = tokenize_trace(trace, qwen_tokenizer, prompt_format=DEFAULT_PROMPT_TEMPLATE)
    assert default.prompt_text == "Question: What is 2+2?\nAnswer: "
    with pytest.raises(ProbesError, match="has no '{question}' field"):
        tokenize_trace(trace, qwen_tokenizer, prompt_format="Q:")


def test_too_long_raises_and_is_reported(qwen_tokenizer):
    short = make_trace()
    long = Trace("long", "Q", "word " * 200, "1", {}, 2)
    n = tokenize_trace(long, qwen_tokenizer).n_tokens
    with pytest.raises(TraceTooLongError, match=rf"'long' has {n} tokens .* over max_tokens=100"):
        tokenize_trace(long, qwen_tokenizer, max_tokens=100)
    kept, too_long = tokenize_traces([short, long], qwen_tokenizer, max_tokens=100)
    assert [t.trace.id for t in kept] == ["t0"]
    assert [(r.trace_id, r.line_no, r.n_tokens, r.limit) for r in too_long] == [("long", 2, n, 100)]
    assert tokenize_trace(long, qwen_tokenizer, max_tokens=n).n_tokens == n  # limit is inclusive


def test_a_runaway_trace_is_too_long_before_it_is_tokenized(qwen_tokenizer, monkeypatch):
    """A 50 MB line once took minutes in the tokenizer before it was called too long: a text of
    more characters than max_tokens x the longest vocabulary entry is left out untokenized."""
    import probes.traces.tokenize as tok

    per_token = tok.max_chars_per_token(qwen_tokenizer)
    assert per_token == max(len(t) for t in qwen_tokenizer.get_vocab())
    short = make_trace()
    runaway = Trace("big", "Q", "7" * (100 * per_token), "1", {}, 2)
    encoded: list[int] = []
    real = tok._encoders

    class Spy:
        def __init__(self, enc):
            self.enc = enc

        def encode_batch(self, texts, **kw):
            encoded.extend(len(t) for t in texts)
            return self.enc.encode_batch(texts, **kw)

        def encode(self, text, **kw):
            encoded.append(len(text))
            return self.enc.encode(text, **kw)

    monkeypatch.setattr(tok, "_encoders", lambda t: tuple(Spy(e) for e in real(t)))
    kept, too_long = tokenize_traces([short, runaway], qwen_tokenizer, max_tokens=100)
    assert [t.trace.id for t in kept] == ["t0"] and max(encoded) < 100 * per_token
    (bad,) = too_long
    assert (bad.trace_id, bad.line_no, bad.n_tokens, bad.limit) == ("big", 2, None, 100)
    assert bad.n_chars > bad.max_chars == 100 * per_token
    assert "over max_tokens=100, not tokenized" in bad.reason
    with pytest.raises(TraceTooLongError, match=r"'big' has [\d,]+ characters .* max_tokens=100"):
        tokenize_trace(runaway, qwen_tokenizer, max_tokens=100)
    # Without a limit, and under the bound, it is tokenized as before.
    assert tokenize_trace(runaway, qwen_tokenizer).n_tokens > 100


def test_real_traces_tokenize(qwen_tokenizer, real_tokenized_traces):
    tts = real_tokenized_traces  # tokenize_traces on the whole file, no max_tokens
    assert len(tts) == 487
    n_think_close = 0
    for tt in tts:
        assert_spans_cover(tt)
        assert tt.ids[tt.spans["trajectory"][0]] == THINK_OPEN_ID
        n_think_close += int((tt.ids[tt.span("trajectory")] == THINK_CLOSE_ID).sum())
    assert n_think_close == 365  # every finished trace has exactly one </think> special token
    sample = tts[::50]
    for tt in sample:
        assert qwen_tokenizer.decode(tt.ids[tt.span("trajectory")]) == tt.trajectory_text
        assert qwen_tokenizer.decode(tt.ids[tt.span("answer")]) == tt.trace.answer + "}"


# --------------------------------------------------------------------------------------------------
# A SentencePiece tokenizer without a chat template (stories260K)


@pytest.fixture(scope="module")
def stories_tokenizer(stories260k_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(stories260k_dir)


def test_default_prompt_and_single_bos(stories_tokenizer):
    tok = stories_tokenizer
    assert tok.is_fast and not tok.chat_template
    trace = Trace("s", "Who?", "Once upon a time", "3", {}, 1)
    tt = tokenize_trace(trace, tok)
    assert_spans_cover(tt)
    assert tt.prompt_text == "Question: Who?\nAnswer: "
    assert tt.ids[0] == tok.bos_token_id
    assert (tt.ids == tok.bos_token_id).sum() == 1
    # No space is invented at the start of trajectory, scaffold or answer.
    assert tok.decode(tt.ids, skip_special_tokens=True) == (
        "Question: Who?\nAnswer: Once upon a time\n\n**Final Answer**\n\\boxed{3}")
    for name in ("trajectory", "scaffold", "answer"):
        first = tok.convert_ids_to_tokens(int(tt.ids[tt.spans[name][0]]))
        assert not first.startswith("\u2581"), (name, first)
    # A prompt that already starts with BOS text does not get a second one.
    tt2 = tokenize_trace(trace, tok, prompt_format="<s>{question}")
    assert (tt2.ids == tok.bos_token_id).sum() == 1


def test_slow_tokenizer_is_refused():
    class SlowTokenizer:
        is_fast = False
        chat_template = None
        bos_token_id = None

    with pytest.raises(ProbesError, match="fast tokenizer"):
        tokenize_trace(make_trace(), SlowTokenizer())
