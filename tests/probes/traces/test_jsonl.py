"""Safe JSONL records: whole-line appends, a partial last line dropped on resume, atomic rewrites."""

from __future__ import annotations

import json

import pytest

from probes.errors import ProbesError
from probes.traces.jsonl import Appender, open_out, write_atomic


def test_append_then_resume_keeps_complete_records(tmp_path):
    out = tmp_path / "out.jsonl"
    assert open_out(out, resume=False).records == []
    with Appender(out) as app:
        app.write({"id": "a", "text": "ü\n"})
        app.write({"id": "b"})
    existing = open_out(out, resume=True)
    assert [r["id"] for r in existing.records] == ["a", "b"] and existing.dropped_bytes == 0
    assert existing.records[0]["text"] == "ü\n"


def test_partial_last_line_is_dropped_and_the_next_record_starts_clean(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "a"}\n{"id": "b", "trajec')  # a kill -9 in the middle of a write
    existing = open_out(out, resume=True)
    assert [r["id"] for r in existing.records] == ["a"]
    assert existing.dropped_bytes == len('{"id": "b", "trajec')
    with Appender(out) as app:
        app.write({"id": "b"})
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["a", "b"]


def test_a_bad_complete_line_is_refused(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "a"}\nnot json\n')
    with pytest.raises(ProbesError, match=r"out.jsonl:2: not valid JSON"):
        open_out(out, resume=True)
    out.write_text('[1, 2]\n')
    with pytest.raises(ProbesError, match=r":1: a JSON list, not an object"):
        open_out(out, resume=True)


def test_out_path_rules(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text("")
    with pytest.raises(ProbesError, match="already exists; pass --resume"):
        open_out(out, resume=False)
    with pytest.raises(ProbesError, match="is a directory"):
        open_out(tmp_path, resume=False)
    with pytest.raises(ProbesError, match="does not exist; create it first"):
        open_out(tmp_path / "missing" / "out.jsonl", resume=False)


def test_write_atomic_replaces_whole(tmp_path):
    out = tmp_path / "graded.jsonl"
    assert write_atomic(out, [b"1\n", b"2\n"]) == 4
    assert out.read_text() == "1\n2\n"
    assert [p.name for p in tmp_path.iterdir()] == ["graded.jsonl"]
