"""The optional `group` / `variant` fields of trace records: read, validated, exposed."""

from __future__ import annotations

import json

import pytest

from probes.errors import TraceFormatError
from probes.traces.read import read_traces

BASE = {"question": "q", "trajectory": "t", "answer": "1"}


def _write(tmp_path, *records) -> str:
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_group_and_variant_are_read(tmp_path):
    ts = read_traces(_write(tmp_path, {**BASE, "id": "a", "group": "q1", "variant": "summary"},
                            {**BASE, "id": "b", "group": 7}, {**BASE, "id": "c"},
                            {**BASE, "id": "d", "group": None, "variant": None}))
    a, b, c, d = ts.traces
    assert (a.group, a.variant) == ("q1", "summary") and a.meta["group"] == "q1"
    assert (b.group, b.variant) == ("7", None)  # an integer group becomes a string
    assert (c.group, c.variant) == (None, None) and (d.group, d.variant) == (None, None)
    assert ts.problems == []


@pytest.mark.parametrize(("extra", "needle"), [
    ({"group": ""}, "field 'group' must be a non-empty string or an integer"),
    ({"group": True}, "field 'group'"),
    ({"group": ["q"]}, "field 'group'"),
    ({"variant": 3}, "field 'variant' must be a non-empty string"),
    ({"variant": "  "}, "field 'variant'"),
])
def test_bad_group_fields_are_bad_lines(tmp_path, extra, needle):
    path = _write(tmp_path, {**BASE, "id": "ok"}, {**BASE, "id": "bad", **extra})
    ts = read_traces(path)
    assert [t.id for t in ts.traces] == ["ok"]
    assert len(ts.problems) == 1 and ts.problems[0].line_no == 2 and needle in ts.problems[0].reason
    with pytest.raises(TraceFormatError, match=f":2: {needle}"):
        read_traces(path, strict=True)
