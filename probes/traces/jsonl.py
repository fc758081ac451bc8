"""JSONL record files written safely: appended one whole line at a time, resumable after kill -9.

Entry points: `open_out(path, resume=...)` checks an output path and, on resume, reads the complete
records it holds (dropping a partial last line, the only thing an interrupted writer can leave);
`Appender` appends records, each line with one `write` and an `fsync`; `write_atomic` replaces a
whole file through a temporary one. Both write through `probes.safe_output` (a failed write is one
`ProbesError` and loses no complete record). Records are JSON objects, one a line, UTF-8 (not escaped).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from probes.errors import ProbesError
from probes.safe_output import LineAppender, check_writable, write_file


@dataclass
class Existing:
    """What an output file held when it was opened.

    Attributes:
        records: Its complete records, in file order.
        dropped_bytes: Bytes of a partial last line that was cut off (0: none).
    """

    records: list[dict[str, Any]] = field(default_factory=list)
    dropped_bytes: int = 0


def check_out_path(path: Path, *, resume: bool | None, example: str = "out.jsonl") -> None:
    """Refuse an output path that cannot be written as asked (before any work).

    Args:
        path: The output file.
        resume: Whether an existing file may be extended; None: the command cannot resume, an
            existing file is always refused.
        example: A file name for the message about a folder.

    Raises:
        ProbesError: A folder, a missing parent folder, an existing file without `resume`, or
            an output this user cannot write (`probes.safe_output.check_writable`).
    """
    if path.is_dir():
        raise ProbesError(f"--out {path} is a directory; give a file path such as {path / example}")
    if not path.parent.is_dir():
        raise ProbesError(f"cannot create {path}: folder {path.parent} does not exist; create it first "
                          f"(mkdir -p {path.parent}) or choose another --out")
    if path.exists() and not resume:
        fix = "" if resume is None else "pass --resume to add to it (what it holds is kept), or "
        raise ProbesError(f"{path} already exists; {fix}choose another --out")
    check_writable(path, "--out", append=resume is not None, example=example)


def open_out(path: str | Path, *, resume: bool) -> Existing:
    """Check `path` (`check_out_path`) and, when it exists, read it for a resumed run.

    A last line without its newline is an interrupted write: it is cut off the file (so the next
    record starts on a line of its own) and counted in `dropped_bytes`.

    Raises:
        ProbesError: See `check_out_path`; or a complete line that is not a JSON object.
    """
    path = Path(path)
    check_out_path(path, resume=resume)
    if not path.exists():
        return Existing()
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1
    if keep < len(data):
        os.truncate(path, keep)
    return Existing(records=_parse(path, data[:keep]), dropped_bytes=len(data) - keep)


def _parse(path: Path, data: bytes) -> list[dict[str, Any]]:
    records = []
    for line_no, raw in enumerate(data.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            record, reason = None, f"not valid JSON ({exc})"
        else:
            reason = f"a JSON {type(record).__name__}, not an object"
        if not isinstance(record, dict):
            raise ProbesError(f"{path}:{line_no}: {reason}; this file was not written by this tool or "
                              f"was edited: fix or remove the line, or choose another --out")
        records.append(record)
    return records


def encode(record: dict[str, Any]) -> bytes:
    """One record as one JSONL line (UTF-8, newline-terminated)."""
    return (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")


class Appender:
    """Appends records to a JSONL file, each durable (flushed and fsynced) before the next.

    Each line is written with a single `write` on an `O_APPEND` descriptor, so a kill -9 leaves at
    most the line being written incomplete (`open_out` drops it on resume); a failed write (full
    disk, `ulimit -f`) is cut off at once and raises one `ProbesError`
    (`probes.safe_output.LineAppender`).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file = LineAppender(self.path)

    def write(self, record: dict[str, Any]) -> None:
        """Append one record and fsync it.

        Raises:
            ProbesError: The write failed; the file keeps every complete record.
        """
        self._file.write(encode(record))

    def close(self) -> None:
        """Close the file (idempotent)."""
        self._file.close()

    def __enter__(self) -> Appender:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def write_atomic(path: str | Path, lines: Iterable[bytes]) -> int:
    """Write `lines` to a temporary file beside `path`, fsync it and rename it onto `path`
    (`probes.safe_output.write_file`).

    Returns:
        Bytes written.

    Raises:
        ProbesError: The write failed; `path` is unchanged.
    """
    return write_file(path, lines)
