"""Questions files: both shapes, numeric answers and ids, bad lines, repeated ids."""

from __future__ import annotations

import pytest

from probes import DATA_DIR
from probes.errors import ProbesError, TraceFormatError
from probes.traces.questions import read_questions


def test_shapes_and_bad_lines(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text("\n".join([
        '{"id": "a", "question": "1+1?", "answer": 2}',
        '{"problem": "2+2?", "answer": "4", "level": 1}',
        '{"id": 7, "question": "x?", "answer": "x"}',
        '{"id": "b", "question": "no answer"}',
        "{oops",
        "",
    ]))
    questions, bad = read_questions(path)
    assert [(q.id, q.question, q.answer, q.line_no) for q in questions] == [
        ("a", "1+1?", "2", 1), ("line2", "2+2?", "4", 2), ("7", "x?", "x", 3)]
    assert [b.line_no for b in bad] == [4, 5]
    assert "missing or empty 'answer'" in bad[0].reason
    with pytest.raises(TraceFormatError, match=r"q.jsonl:4: missing or empty 'answer'"):
        read_questions(path, strict=True)


def test_repeated_id_and_missing_file(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"id": "a", "question": "q", "answer": "1"}\n'
                    '{"id": "a", "question": "r", "answer": "2"}\n')
    with pytest.raises(ProbesError, match=r"q.jsonl:2: duplicate id 'a' \(first on line 1\)"):
        read_questions(path)
    with pytest.raises(ProbesError, match="does not exist"):
        read_questions(tmp_path / "none.jsonl")


def test_a_traces_file_is_a_questions_file():
    questions, bad = read_questions(DATA_DIR / "tiny_reasoner_traces.jsonl")
    assert len(questions) == 200 and not bad
