"""`python -m probes.run grade TRACES.jsonl [--out GRADED.jsonl] [--json]`: grade traces you have.

Every record readable as a trace gains `model_answer` (`probes.traces.grading.extract_answer` of its
trajectory, plus its `response` where it has one) and `correct` (against its `answer`, with
math-verify or exact strings); the accuracy is printed, and where questions have several samples
(a `group` field, as `generate` writes) also Pass@k, mG-Pass@k and the length statistics
(`analyses.sampling`). A record that already had a `model_answer` is compared with the new one (the
agreement is reported). `--out` receives every line of the input in order, graded where it is a
trace and unchanged where not, written whole through a temporary file.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from analyses.sampling import sample_statistics
from probes.errors import ProbesError
from probes.jsonable import jsonable
from probes.traces.grading import DEFAULT_GRADE_METHOD, grade
from probes.traces.jsonl import check_out_path, encode, write_atomic
from probes.traces.read import Trace, read_traces

NAME = "grade"


SUMMARY_VARIANT = "summary"
"""Records of this `variant` (from `generate --summarize`) are not samples of a question."""


N_SHOWN = 10
"""Disagreements with a recorded `model_answer` listed in the report."""


@dataclass
class GradeResult:
    """What `grade_file` found.

    Attributes:
        path: The traces file.
        out: The graded copy ("" when none was written).
        method: The grading method.
        n_records: Records graded.
        n_correct: Of them, correct.
        n_no_answer: Of them, with no extractable answer.
        n_bad_lines: Lines that are not traces (copied unchanged to `out`).
        bad_lines: (line number, reason) of each.
        n_recorded: Graded records that already held a `model_answer`.
        n_agree_recorded: Of those, how many the extraction reproduces exactly.
        disagreements: (id, recorded, extracted) of the first `N_SHOWN` that differ.
        seconds: Wall time.
        statistics: `analyses.sampling.sample_statistics` over the question groups.
    """

    path: str = ""
    out: str = ""
    method: str = DEFAULT_GRADE_METHOD
    n_records: int = 0
    n_correct: int = 0
    n_no_answer: int = 0
    n_bad_lines: int = 0
    bad_lines: list[tuple[int, str]] = field(default_factory=list)
    n_recorded: int = 0
    n_agree_recorded: int = 0
    disagreements: list[tuple[str, str, str | None]] = field(default_factory=list)
    seconds: float = 0.0
    statistics: dict[str, Any] | None = None

    @property
    def accuracy(self) -> float | None:
        """Share of graded records that are correct."""
        return self.n_correct / self.n_records if self.n_records else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: every field plus `accuracy`."""
        return jsonable({**asdict(self), "accuracy": self.accuracy})


def graded_text(trace: Trace) -> str:
    """The text an answer is extracted from: the trajectory, then a `response` field if any."""
    response = trace.meta.get("response")
    return trace.trajectory + (response if isinstance(response, str) else "")


def grade_file(path: str | Path, *, out: str | Path | None = None, method: str = DEFAULT_GRADE_METHOD,
               strict: bool = False) -> GradeResult:
    """Grade every trace of `path`; with `out`, write the graded copy.

    Raises:
        ProbesError: A missing input, an existing or unwritable `out`, an unknown method, a bad line
            under `strict`.
    """
    t0 = time.perf_counter()
    path = Path(path)
    if out is not None:
        check_out_path(Path(out), resume=None, example="graded.jsonl")
    traceset = read_traces(path, strict=strict)
    result = GradeResult(path=str(path), method=method, n_bad_lines=len(traceset.problems),
                         bad_lines=[(b.line_no, b.reason) for b in traceset.problems])
    by_line = {t.line_no: t for t in traceset.traces}
    lines: list[bytes] = []
    records: list[dict[str, Any]] = []
    for line_no, raw in enumerate(io.BytesIO(path.read_bytes()), start=1):
        trace = by_line.get(line_no)
        if trace is None:
            lines.append(raw)
            continue
        record = json.loads(raw)
        _grade_record(record, trace, method, result)
        records.append(record)
        lines.append(encode(record))
    if not records:
        raise ProbesError(f"{path} holds no trace records ({result.n_bad_lines} other lines); each "
                          "needs a question, a trajectory and an answer (nothing was written)")
    if out is not None:
        write_atomic(out, lines)
        result.out = str(out)
    result.statistics = record_statistics(records)
    result.seconds = time.perf_counter() - t0
    return result


def _grade_record(record: dict[str, Any], trace: Trace, method: str, result: GradeResult) -> None:
    recorded = record.get("model_answer")
    g = grade(graded_text(trace), trace.answer, method=method)
    record["model_answer"], record["correct"] = g.model_answer, g.correct
    result.n_records += 1
    result.n_correct += g.correct
    result.n_no_answer += g.model_answer is None
    if isinstance(recorded, str):
        result.n_recorded += 1
        if recorded.strip() == (g.model_answer or ""):
            result.n_agree_recorded += 1
        elif len(result.disagreements) < N_SHOWN:
            result.disagreements.append((trace.id, recorded, g.model_answer))


def record_statistics(records: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """Sample statistics of graded records grouped by `group` (each record alone without one).

    Records with a boolean `correct` count, except summaries; lengths come from `n_tokens` and
    truncation from `finish_reason` when every counted record has them. None: nothing to count.
    """
    used = [r for r in records
            if isinstance(r.get("correct"), bool) and r.get("variant") != SUMMARY_VARIANT]
    if not used:
        return None
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in used:
        groups.setdefault(str(r.get("group", r.get("id"))), []).append(r)
    rows = list(groups.values())
    has_tokens = all(isinstance(r.get("n_tokens"), int) for r in used)
    has_finish = all(r.get("finish_reason") in ("stop", "length") for r in used)
    return jsonable(sample_statistics(
        list(groups),
        [[r["correct"] for r in row] for row in rows],
        [[r["n_tokens"] for r in row] for row in rows] if has_tokens else None,
        [[r["finish_reason"] == "length" for r in row] for row in rows] if has_finish else None,
    ))


def _ci(entry: dict[str, Any], spec: str = ".3f") -> str:
    lo, hi = entry["ci"]
    if lo is None or hi is None:
        return format(entry["value"], spec)
    return f"{entry['value']:{spec}} [{lo:{spec}}, {hi:{spec}}]"


def format_statistics(s: dict[str, Any]) -> list[str]:
    """Report lines of `record_statistics` (CIs: bootstrap over questions)."""
    lo, hi = s["samples_per_question"]
    per = f"{lo}" if lo == hi else f"{lo}-{hi}"
    level = f"{s['ci_level']:.0%}"
    lines = [f"accuracy {_ci(s['accuracy'])} over {s['n_questions']} questions x {per} samples "
             f"({level} CIs, questions resampled); all samples correct for {s['all_correct']} "
             f"questions, none for {s['none_correct']}"]
    if len(s["pass_at_k"]) > 1:
        lines.append("  ".join(f"pass@{k} {_ci(v)}" for k, v in s["pass_at_k"].items()))
    if s["mg_pass_at_k"]:
        lines.append("  ".join(f"mG-pass@{k} {_ci(v)}" for k, v in s["mg_pass_at_k"].items()))
    if "length" in s:
        ln = s["length"]
        q = ln["quantiles"]
        by = "; ".join(f"{name} {ln[key]:.0f}" for name, key in (("correct", "mean_correct"),
                                                                   ("incorrect", "mean_incorrect"))
                       if ln[key] is not None)
        lines.append(f"tokens per sample: mean {_ci(ln, '.1f')}; p10 {q['0.1']:.0f}, median "
                     f"{q['0.5']:.0f}, p90 {q['0.9']:.0f}; range {ln['min']}-{ln['max']}; mean {by}")
    if "truncated" in s:
        lines.append(f"truncated at the token limit: {_ci(s['truncated'])}")
    return lines
