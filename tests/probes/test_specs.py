"""The configs are the single source: `ModelSpec` (which model, where) and `TraceSource` (which
traces, how tokenized) are shared by every runner, checked on construction, and the write loop
takes a handful of arguments."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from probes.errors import ProbesError
from probes.models.spec import ModelSpec, model_spec
from probes.pipeline.configs import LhatConfig, TraceSource, trace_source
from probes.pipeline.loop import write_traces


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"name": ""}, r"^model: expected a name or folder, got ''"),
    ({"device_map": "everywhere"}, r"^--device-map 'everywhere' is not one of auto, balanced"),
    ({"device": "cpu", "max_memory": "0=1GiB"}, r"^--device cpu and --device-map auto conflict"),
    ({"max_memory": "0:1GiB"}, r"^--max-memory: cannot read '0:1GiB'"),
])
def test_model_spec_refuses_bad_values(kwargs, message):
    with pytest.raises(ProbesError, match=message):
        ModelSpec(**{"name": "tiny-reasoner", **kwargs})


def test_model_spec_routes_the_older_keywords():
    """A name with `device=` / `dtype=` (the runners' older calling convention) becomes a spec;
    with a spec the keywords replace its own; a loaded model passes as it is."""
    assert model_spec("m", device="cpu", dtype="float16") == ModelSpec("m", "cpu", "float16")
    assert model_spec(ModelSpec("m", dtype="bfloat16"), device="cuda:1") == ModelSpec(
        "m", "cuda:1", "bfloat16")
    assert model_spec(Path("some/folder")) == ModelSpec("some/folder")
    loaded = object()
    assert model_spec(loaded) is loaded  # type: ignore[arg-type]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"limit": 0}, r"^--limit must be a positive integer, got 0"),
    ({"limit": True}, r"^--limit must be a positive integer, got True"),
    ({"prompt_format": "Q: {q}"}, r"^prompt_format 'Q: \{q\}' has no '\{question\}' field"),
    ({"prompt_format": "{question} {x}"}, r"^prompt_format .* cannot be filled with only a question"),
])
def test_trace_source_refuses_bad_values(kwargs, message):
    with pytest.raises(ProbesError, match=message):
        TraceSource(Path("t.jsonl"), **kwargs)


def test_trace_source_reads_and_takes_the_older_config_keywords(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"id": "a", "question": "q", "trajectory": "t", "answer": "1"}\nnot json\n')
    source = TraceSource(path, lexicon=[tmp_path / "x.json"])
    assert source.lexicon == (str(tmp_path / "x.json"),)
    assert [t.id for t in source.read().traces] == ["a"]
    with pytest.raises(ProbesError, match=r"t\.jsonl:2: invalid JSON"):
        TraceSource(path, strict=True).read()
    old = LhatConfig(limit=2, scaffold=" => ", seed=1)  # the settings the configs used to hold
    assert trace_source(str(path), old) == TraceSource(path, limit=2, scaffold=" => ")
    assert trace_source(path, LhatConfig()) == TraceSource(path)
    assert trace_source(source, LhatConfig()) is source
    with pytest.raises(ProbesError, match=r"^--limit must be a positive integer, got 0"):
        LhatConfig(limit=0)  # the older keywords are checked when the config is made
    with pytest.raises(ProbesError, match=r"^limit, scaffold: given both in the TraceSource and "
                                          r"in the LhatConfig"):
        trace_source(source, old)


def test_write_traces_takes_a_handful_of_arguments():
    assert len(inspect.signature(write_traces).parameters) <= 6
