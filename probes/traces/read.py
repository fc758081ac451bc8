"""Reasoning traces: read JSONL records into `Trace`s.

Entry point: `read_traces(path)` accepts three record shapes (question/trajectory/answer,
problem/solution/answer, chat `messages`); bad lines are skipped and reported with their number and
reason, or raise with `strict=True`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from probes.errors import ProbesError, TraceFormatError

THINK_OPEN = "<think>"


_ACCEPTED_SHAPES = (
    "{id?, question, trajectory, answer, ...}, {id?, problem, solution, answer, ...} or "
    "{id?, messages: [{role, content}, ...], answer?, ...}"
)


@dataclass(frozen=True)
class Trace:
    """One reasoning trace.

    Attributes:
        id: Unique id within its file (`"line{N}"` when the record has none).
        question: The problem statement.
        trajectory: The model's reasoning text (may start with `<think>` and contain `</think>`).
        answer: The gold answer, as text.
        meta: Every other field of the record, unchanged (an integer `group` as a string).
        line_no: 1-based line number in the JSONL file.
    """

    id: str
    question: str
    trajectory: str
    answer: str
    meta: dict
    line_no: int

    @property
    def group(self) -> str | None:
        """The optional `group` field: traces of one question (e.g. paired variants)."""
        return self.meta.get("group")

    @property
    def variant(self) -> str | None:
        """The optional `variant` field within a group, e.g. original / summary / direct."""
        return self.meta.get("variant")


@dataclass(frozen=True)
class BadLine:
    """A JSONL line that was skipped, with the reason."""

    line_no: int
    reason: str

    def __str__(self) -> str:
        return f"line {self.line_no}: {self.reason}"


@dataclass
class TraceSet:
    """The traces read from one file plus the lines that were skipped."""

    traces: list[Trace]
    problems: list[BadLine]
    path: Path

    def __len__(self) -> int:
        return len(self.traces)

    def __iter__(self) -> Iterator[Trace]:
        return iter(self.traces)


def read_traces(path: str | Path, *, strict: bool = False) -> TraceSet:
    """Read reasoning traces from a JSONL file.

    Accepted record shapes (one JSON object per line; blank lines are ignored):

    - `{id?, question, trajectory, answer, ...}`;
    - `{id?, problem, solution, answer, ...}` (the solution is the trajectory);
    - chat: `{id?, messages: [{role, content}, ...], answer?, ...}`. The trajectory is the last
      assistant turn (`"<think>\\n" + reasoning + "\\n</think>\\n\\n" + content` when it has a
      `reasoning_content` or `reasoning` field), the question is the last user turn before it, and
      a missing `answer` is taken from the last balanced `\\boxed{...}` of the assistant content.

    The file is UTF-8, with or without a BOM. Numeric answers are converted with `str()`. A missing
    id becomes `f"line{line_no}"`. Fields not used above go to `Trace.meta`.

    Args:
        path: The JSONL file.
        strict: Raise on the first bad line instead of skipping it.

    Returns:
        A `TraceSet` with the traces in file order and one `BadLine` per skipped line (invalid
        JSON or UTF-8, not an object, missing or empty fields, duplicate id).

    Raises:
        ProbesError: The file does not exist or is not a file.
        TraceFormatError: With `strict=True`, on the first bad line (`"{path}:{line_no}: reason"`).
    """
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise ProbesError(
            f"Trace file {str(path)!r} {what}. Pass a JSONL file with one trace per line, "
            f"shaped {_ACCEPTED_SHAPES}."
        )
    traces: list[Trace] = []
    problems: list[BadLine] = []
    first_line_of_id: dict[str, int] = {}
    with path.open("rb") as fh:
        for line_no, raw in enumerate(fh, start=1):
            try:  # utf-8-sig on line 1: a file saved with a BOM keeps its first record
                text = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                trace, reason = None, f"not valid UTF-8 ({exc.reason} at byte {exc.start})"
            else:
                if not text.strip():
                    continue
                trace, reason = _parse_line(text, line_no)
            if trace is not None and trace.id in first_line_of_id:
                reason = f"duplicate id {trace.id!r} (first on line {first_line_of_id[trace.id]})"
                trace = None
            if trace is None:
                if strict:
                    raise TraceFormatError(
                        f"{path}:{line_no}: {reason}. Fix the line, or drop --strict to skip bad "
                        "lines."
                    )
                problems.append(BadLine(line_no, reason))
                continue
            first_line_of_id[trace.id] = line_no
            traces.append(trace)
    return TraceSet(traces=traces, problems=problems, path=path)


def trace_from_record(record: dict, number: int) -> tuple[Trace | None, str]:
    """One record (a dict of a JSONL line's shape) as a `Trace`, with the same checks as a line of
    a file; returns (trace, "") or (None, reason). `number` stands for the line number."""
    try:
        text = json.dumps(record, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        return None, f"not JSON-serialisable ({exc})"
    return _parse_line(text, number)


def _parse_line(text: str, line_no: int) -> tuple[Trace | None, str]:
    """Parse one non-blank line; returns (trace, "") or (None, reason)."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, f"invalid JSON ({exc.msg} at column {exc.colno})"
    except RecursionError:
        return None, "invalid JSON (nested too deeply)"
    if not isinstance(record, dict):
        return None, f"expected a JSON object, got {type(record).__name__}"
    if "messages" in record:
        fields, reason = _fields_from_chat(record)
    else:
        fields, reason = _fields_from_flat(record)
    if fields is None:
        return None, reason
    question, trajectory, answer, used = fields

    for name, value in (("question", question), ("trajectory", trajectory)):
        if not isinstance(value, str):
            return None, f"field {name!r} must be a string, got {type(value).__name__}"
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str):
        return None, f"field 'answer' must be a string or a number, got {type(answer).__name__}"
    empty = [n for n, v in (("question", question), ("trajectory", trajectory), ("answer", answer))
             if not v.strip()]
    if empty:
        return None, f"empty {', '.join(repr(n) for n in empty)}"

    trace_id = record.get("id")
    if trace_id is None:
        trace_id = f"line{line_no}"
    elif isinstance(trace_id, int) and not isinstance(trace_id, bool):
        trace_id = str(trace_id)
    elif not isinstance(trace_id, str) or not trace_id:
        return None, f"field 'id' must be a non-empty string or an integer, got {trace_id!r}"
    for name, value in (("id", trace_id), ("question", question), ("trajectory", trajectory),
                        ("answer", answer)):
        bad = _not_text(value)
        if bad:
            return None, f"field {name!r} {bad}"
    meta = {k: v for k, v in record.items() if k not in used and k != "id"}
    reason = _group_fields(meta)
    if reason:
        return None, reason
    return Trace(trace_id, question, trajectory, answer, meta, line_no), ""


def _group_fields(meta: dict) -> str:
    """Validate the optional `group` / `variant` fields in place ("" when fine): `group` a
    non-empty string or an integer (stored as a string), `variant` a non-empty string."""
    group = meta.get("group")
    if isinstance(group, int) and not isinstance(group, bool):
        meta["group"] = str(group)
    elif group is not None and (not isinstance(group, str) or not group.strip()):
        return f"field 'group' must be a non-empty string or an integer, got {group!r}"
    variant = meta.get("variant")
    if variant is not None and (not isinstance(variant, str) or not variant.strip()):
        return f"field 'variant' must be a non-empty string, got {variant!r}"
    return ""


def _not_text(value: str) -> str:
    """Why `value` cannot be stored and tokenized as text ("" when it can): a lone surrogate
    (valid JSON, e.g. truncated model output, but not Unicode text) or a NUL character."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        return (f"holds a lone surrogate ({value[exc.start]!r} at character {exc.start}): not "
                f"valid Unicode text")
    if "\x00" in value:
        return f"holds a NUL character at character {value.index(chr(0))}"
    return ""


_FLAT_SHAPES = (("question", "trajectory", "answer"), ("problem", "solution", "answer"))


def _fields_from_flat(record: dict) -> tuple[tuple | None, str]:
    """Fields of the question/trajectory or problem/solution shapes; picks the closer shape."""
    best = max(_FLAT_SHAPES, key=lambda shape: sum(record.get(k) is not None for k in shape))
    missing = [k for k in best if record.get(k) is None]
    if missing:
        return None, (
            f"missing field(s) {', '.join(repr(k) for k in missing)}; accepted shapes: "
            f"{_ACCEPTED_SHAPES}"
        )
    return (record[best[0]], record[best[1]], record[best[2]], set(best)), ""


def _message_text(content: Any) -> str | None:
    """Message content as text: a string, or a list of `{"type": "text", "text": ...}` parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        for p in content
    ):
        return "".join(p["text"] for p in content)
    return None


def _fields_from_chat(record: dict) -> tuple[tuple | None, str]:
    """Fields of the chat shape: question, trajectory and answer from `messages`."""
    messages = record["messages"]
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages
    ):
        return None, "field 'messages' must be a list of objects with a string 'role'"
    assistant_idx = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not assistant_idx:
        return None, "'messages' has no assistant message (the trajectory)"
    last = assistant_idx[-1]
    user_idx = [i for i in range(last) if messages[i]["role"] == "user"]
    if not user_idx:
        return None, "'messages' has no user message (the question) before the last assistant one"
    question = _message_text(messages[user_idx[-1]].get("content"))
    assistant = messages[last]
    content = _message_text(assistant.get("content"))
    if question is None or content is None:
        which = "user" if question is None else "assistant"
        return None, f"the {which} message's 'content' must be a string or a list of text parts"
    reasoning = assistant.get("reasoning_content") or assistant.get("reasoning")
    if reasoning is not None and not isinstance(reasoning, str):
        return None, "the assistant message's reasoning field must be a string"
    trajectory = f"<think>\n{reasoning}\n</think>\n\n{content}" if reasoning else content
    answer = record.get("answer")
    if answer is None:
        answer = extract_boxed(content)
        if answer is None:
            return None, (
                "no 'answer' field and no balanced \\boxed{...} in the last assistant message; "
                "add an 'answer' field"
            )
    return (question, trajectory, answer, {"messages", "answer"}), ""


def extract_boxed(text: str) -> str | None:
    """Return the content of the last balanced `\\boxed{...}` in `text`, or None.

    Braces escaped with a backslash (`\\{`, `\\}`) do not count towards the balance.

    Example:
        >>> extract_boxed(r"so \\boxed{1} or rather \\boxed{\\frac{1}{2}}")
        '\\\\frac{1}{2}'
    """
    for match in reversed(list(re.finditer(r"\\boxed\s*\{", text))):
        depth, i = 1, match.end()
        while i < len(text):
            ch = text[i]
            if ch == "\\":
                i += 2
                continue
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    return text[match.end() : i]
            i += 1
    return None
