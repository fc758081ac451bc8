"""JSONL record files written safely: appended one whole line at a time, resumable after kill -9.

Entry points: `open_out(path, resume=...)` checks an output path and, on resume, reads the complete
records it holds (dropping a partial last line, the only thing an interrupted writer can leave);
`Appender` appends records, each line with one `write` and an `fsync`; `write_atomic` replaces a
whole file through a temporary one. Both write through `probes.safe_output` (a failed write is one
`ProbesError` and loses no complete record). Records are JSON objects, one a line, UTF-8 (not
escaped).

One writer at a time: an `Appender` holds the file's exclusive lock (`cache.try_lock`, the lock of
a cache's writer too) while it is open, and reads what the file holds under it; `open_out` reads
under it as well. A second run on the same file is refused in one line, whether it finds the file
locked or finds it created after its own check (a fresh `Appender` creates the file exclusively).
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
    lock = _lock(path)
    try:
        return _read(path)
    finally:
        os.close(lock)


def _lock(path: Path) -> int:
    """Hold `path`'s writer lock (close the descriptor to release it), or refuse in one line."""
    from cache import try_lock  # here, not at the top: keeps h5py out of reading traces

    fd = try_lock(path)
    if fd is None:
        raise ProbesError(f"{path} is locked: another run is writing it; wait for it to finish "
                          f"(then pass --resume to add to it), or choose another --out")
    return fd


def _read(path: Path) -> Existing:
    """The complete records of `path` (held locked), cutting off a partial last line."""
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
    (`probes.safe_output.LineAppender`). The file's lock is held
    from opening to `close`, so what `existing` lists is what the file holds before this writer's
    records, whatever another run did before it.

    Args:
        path: The JSONL file (created if absent).
        fresh: The file must not exist yet (a run without --resume): one that another run created
            after this run's own check is refused, untouched.

    Attributes:
        existing: The records the file held when opened, read under the lock.

    Raises:
        ProbesError: The file exists (`fresh`), or another run holds its lock.
    """

    def __init__(self, path: str | Path, *, fresh: bool = False) -> None:
        self.path = Path(path)
        self._file: LineAppender | None = None
        if fresh:
            try:
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            except FileExistsError:
                raise ProbesError(
                    f"{self.path} already exists; pass --resume to add to it (what it holds is "
                    f"kept), or choose another --out; nothing of it was changed (another run may "
                    f"have created it after this one checked that it was new)"
                ) from None
        self._lock = _lock(self.path)
        try:
            self.existing = _read(self.path)
            self._file = LineAppender(self.path)
        except BaseException:
            os.close(self._lock)
            raise

    def write(self, record: dict[str, Any]) -> None:
        """Append one record and fsync it.

        Raises:
            ProbesError: The write failed; the file keeps every complete record.
        """
        assert self._file is not None, "the appender is closed"
        self._file.write(encode(record))

    def close(self) -> None:
        """Close the file and release its lock (idempotent)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._lock >= 0:
            os.close(self._lock)
            self._lock = -1

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
