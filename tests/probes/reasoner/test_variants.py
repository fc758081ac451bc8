"""The reasoner's paired trajectory variants: the shipped file is what the generator writes, the
originals are the sample traces unchanged, direct ones have no detours, summaries merge steps."""

from __future__ import annotations

import json
import re

import pytest

from probes.reasoner.task import generate_problems
from probes.reasoner.train import SAMPLES_PATH
from probes.reasoner.variants import (
    N_VARIANT_GROUPS,
    VARIANTS,
    VARIANTS_PATH,
    parse_steps,
    variant_problems,
    variant_records,
    write_variants,
)
from probes.traces.read import read_traces


def test_shipped_file_is_the_generators_output(tmp_path):
    out = tmp_path / "v.jsonl"
    assert write_variants(out) == N_VARIANT_GROUPS * len(VARIANTS)
    assert out.read_bytes() == VARIANTS_PATH.read_bytes()


def test_originals_are_the_sample_traces():
    samples = {t.id: t for t in read_traces(SAMPLES_PATH, strict=True)}
    ts = read_traces(VARIANTS_PATH, strict=True)
    groups: dict[str, dict[str, object]] = {}
    for t in ts:
        assert t.id == f"{t.group}/{t.variant}"
        groups.setdefault(t.group, {})[t.variant] = t
    assert len(groups) == N_VARIANT_GROUPS
    for g, by in groups.items():
        assert tuple(by) == VARIANTS
        s = samples[g]
        assert by["original"].trajectory == s.trajectory
        assert {(t.question, t.answer) for t in by.values()} == {(s.question, s.answer)}


_LINE = re.compile(r"^(\d+)((?: [+-] \d)+) = (\d+)\.$")


@pytest.mark.parametrize("p", variant_problems(), ids=lambda p: p.id)
def test_direct_and_summary_are_correct_and_shorter(p):
    assert p.n_mistakes + p.n_confirmations > 0  # only problems with a detour
    recs = {r["variant"]: r for r in variant_records(p)}
    start, steps = parse_steps(p.question)
    for name, merge in (("direct", 1), ("summary", 2)):
        lines = recs[name]["trajectory"].split("\n")
        assert lines[1] == p.trajectory.split("\n")[1]  # the same opening
        assert lines[-2] == p.trajectory.split("\n")[-2]  # the same conclusion
        step_lines = [ln for ln in lines if _LINE.match(ln)]
        assert len(step_lines) == -(-len(steps) // merge)
        value = start
        for ln in step_lines:  # every line is right: left side evaluates to the stated value
            a, ops, r = _LINE.match(ln).groups()
            assert int(a) == value
            value = eval(a + ops)  # only digits and + / -, matched above
            assert value == int(r)
        assert str(value) == p.answer
        assert not re.search(r"Wait|Hold on|Hmm|Let me|Alternatively", recs[name]["trajectory"])
        assert len(recs[name]["trajectory"]) < len(recs["original"]["trajectory"])


def test_parse_steps_refuses_other_text():
    assert parse_steps("Compute 37 + 8 - 5.") == (37, [("+", 8), ("-", 5)])
    with pytest.raises(ValueError, match="no running-sum"):
        parse_steps("What is the capital of France?")
    assert len(generate_problems(3, seed=2)) == 3
    json.dumps(variant_records(generate_problems(1, seed=2)[0]))
