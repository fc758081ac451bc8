"""Questions to sample trajectories for: JSONL records `{id?, question | problem, answer, ...}`.

Entry point: `read_questions(path)`. A trace file is a questions file too (its trajectory and other
fields are ignored), so `tiny_reasoner_traces.jsonl` or the real MATH traces can be re-sampled.
Bad lines are skipped and reported with their number and reason (`strict=True` raises on the
first); a repeated id is refused (each question is a `group` of the samples drawn for it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from probes.errors import ProbesError, TraceFormatError
from probes.traces.read import BadLine

QUESTIONS_SHAPE = "{id?, question, answer, ...} or {id?, problem, answer, ...}"


@dataclass(frozen=True)
class Question:
    """One question with its gold answer.

    Attributes:
        id: Its id (`"line{N}"` when the record has none).
        question: The question text.
        answer: The gold answer, as text.
        line_no: 1-based line number in its file.
    """

    id: str
    question: str
    answer: str
    line_no: int


def read_questions(path: str | Path, *, strict: bool = False) -> tuple[list[Question], list[BadLine]]:
    """Read questions from a JSONL file (see the module docstring).

    Args:
        path: The JSONL file.
        strict: Raise on the first bad line instead of skipping it.

    Returns:
        The questions in file order and the skipped lines.

    Raises:
        ProbesError: The file is missing, or an id repeats (naming both lines).
        TraceFormatError: With `strict`, the first bad line.
    """
    path = Path(path)
    if not path.is_file():
        raise ProbesError(f"questions file {str(path)!r} does not exist or is not a file; pass a JSONL "
                          f"file with one question a line, shaped {QUESTIONS_SHAPE}")
    questions: list[Question] = []
    bad: list[BadLine] = []
    first_line: dict[str, int] = {}
    with path.open("rb") as fh:
        for line_no, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            question, reason = _parse(raw, line_no)
            if question is None:
                if strict:
                    raise TraceFormatError(f"{path}:{line_no}: {reason}. Fix the line, or drop --strict "
                                           "to skip bad lines.")
                bad.append(BadLine(line_no, reason))
                continue
            if question.id in first_line:
                raise ProbesError(f"{path}:{line_no}: duplicate id {question.id!r} (first on line "
                                  f"{first_line[question.id]}); question ids must be unique (nothing "
                                  "was generated)")
            first_line[question.id] = line_no
            questions.append(question)
    return questions, bad


def _parse(raw: bytes, line_no: int) -> tuple[Question | None, str]:
    try:
        record = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return None, f"invalid JSON or UTF-8 ({exc})"
    if not isinstance(record, dict):
        return None, f"expected a JSON object, got {type(record).__name__}"
    text = record.get("question", record.get("problem"))
    answer = record.get("answer")
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    for name, value in (("question", text), ("answer", answer)):
        if not isinstance(value, str) or not value.strip():
            return None, f"missing or empty {name!r} (a string); accepted shape: {QUESTIONS_SHAPE}"
    qid = record.get("id", f"line{line_no}")
    if isinstance(qid, int) and not isinstance(qid, bool):
        qid = str(qid)
    if not isinstance(qid, str) or not qid:
        return None, f"field 'id' must be a non-empty string or an integer, got {qid!r}"
    return Question(qid, text, answer, line_no), ""
