"""Every file the toolkit writes outside a cache store, written one safe way.

(A cache store has its own mechanism, `cache` / cache/SCHEMA.md#segmented-store.)

* `check_writable(path, flag)`: before any work, refuse an output that could not be written (a
  folder, a missing or unwritable folder, an unwritable file, a name too long for its temporary
  twin), naming the flag, the path and the fix.
* `write_file(path, data)` / `write_text`: the bytes go to a temporary file beside `path`
  (`tmp_path`), are fsynced and renamed onto `path`; a report, a JSON result, a graded copy.
* `save_figure(fig, path)`: a Matplotlib figure rendered to PNG bytes in memory (`figure_png`),
  then `write_file`.
* `LineAppender(path)`: appends whole lines to a file (JSONL records), each one `write` on an
  `O_APPEND` descriptor and fsynced; a failed append is cut off again, so the file ends with its
  last complete line.

Any `OSError` (full disk, `ulimit -f`, no permission, I/O error) becomes one `ProbesError` naming
the file, the cause (`[Errno 28] No space left on device (ENOSPC)`) and the fix; the target keeps
what it held before and no temporary file is left. A write past `ulimit -f` returns EFBIG rather
than killing the process: Python ignores SIGXFSZ from its start.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from probes.errors import ProbesError

_write = os.write
"""The one call that writes output bytes to disk (tests replace it to inject write errors)."""

TMP_SUFFIX_BYTES = len("..4294967295.tmp")
"""Bytes a temporary name (`tmp_path`) adds to the target's name, at most."""


def tmp_path(path: Path) -> Path:
    """The temporary file `write_file` writes before renaming it onto `path`."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_error(path: Path, exc: OSError, *, flag: str = "--out", then: str = "rerun",
                kept: str = "") -> ProbesError:
    """The one-line error of a failed write of `path`: cause and fix (`cache.fix_hint`).

    Args:
        path: The output file.
        exc: The error of the write.
        flag: The flag that named the output (the fix may be to choose another).
        then: What to do once it is fixed.
        kept: What the failed write did not lose (" after 3 new records (every complete one is
            kept)").
    """
    from cache import describe_os_error, fix_hint  # here: keeps h5py out of the light modules

    return ProbesError(f"cannot write {path}: {describe_os_error(exc)}{kept}; "
                       f"{fix_hint(exc, flag=flag, then=then)}")


def nearest_existing(path: Path) -> Path:
    """`path` or its nearest parent that exists (where missing folders would be created)."""
    for parent in (path, *path.parents):
        if parent.exists():
            return parent
    return Path(".")


def check_writable(path: Path, flag: str, *, make_parents: bool = False, append: bool = False,
                   example: str = "out.json") -> None:
    """Refuse an output file that cannot be written, before any work.

    Args:
        path: The output file.
        flag: The flag that named it ("--out").
        make_parents: Missing folders are created at write time (their nearest existing folder
            must be writable); otherwise a missing folder is refused.
        append: The file is appended to in place (it must be writable; its folder only when the
            file is new); otherwise it is replaced through a temporary file in its folder.
        example: A file name for the message about a folder.

    Raises:
        ProbesError: One line naming `flag`, the path and the fix.
    """
    path = Path(path)
    if path.is_dir():
        raise ProbesError(f"{flag} {path} is a directory; give a file path such as "
                          f"{path / example}")
    folder = path.parent
    if not folder.is_dir():
        base = nearest_existing(folder)
        if not make_parents:
            raise ProbesError(f"{flag} {path}: folder {folder} does not exist; create it first "
                              f"(mkdir -p {folder}) or choose another {flag}")
        if not base.is_dir():
            raise ProbesError(f"{flag} {path}: {base} is a file, so the folder cannot be created; "
                              f"choose another {flag}")
        if not os.access(base, os.W_OK | os.X_OK):
            raise ProbesError(f"cannot write {flag} {path}: {base} is not writable for this user; "
                              f"choose another {flag} or fix the permissions")
        return
    if append and path.exists():
        target, what = path, "the file"
    else:
        target, what = folder, "its folder"
    if not os.access(target, os.W_OK | (0 if target is path else os.X_OK)):
        raise ProbesError(f"cannot write {flag} {path}: {what} is not writable for this user; "
                          f"choose another {flag} or fix the permissions")
    extra = 0 if append else TMP_SUFFIX_BYTES
    if len(path.name.encode("utf-8")) + extra > os.pathconf(folder, "PC_NAME_MAX"):
        raise ProbesError(f"{flag} name {path.name[:40]!r}... is too long for its folder; choose a "
                          f"shorter {flag}")


def _write_all(fd: int, data: bytes) -> int:
    view = memoryview(data)
    n = 0
    while view:
        written = _write(fd, view)
        view = view[written:]
        n += written
    return n


def write_file(path: str | Path, data: bytes | Iterable[bytes], *, flag: str = "--out",
               then: str = "rerun", fsync: bool = True, make_parents: bool = False) -> int:
    """Write `data` to a temporary file beside `path`, fsync it and rename it onto `path`.

    Args:
        path: The output file (replaced if present).
        data: Its bytes, or an iterable of chunks.
        flag: The flag that named it (for the error message).
        then: What the user does once the cause is fixed (for the error message).
        fsync: Make the bytes durable before the rename.
        make_parents: Create missing parent folders.

    Returns:
        Bytes written.

    Raises:
        ProbesError: The write failed; `path` is unchanged and the temporary file removed.
    """
    path = Path(path)
    tmp = tmp_path(path)
    chunks = [data] if isinstance(data, (bytes, bytearray, memoryview)) else data
    try:
        if make_parents:
            path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            n = sum(_write_all(fd, bytes(chunk)) for chunk in chunks)
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise write_error(path, exc, flag=flag, then=then) from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return n


def write_text(path: str | Path, text: str, **kwargs: Any) -> int:
    """`write_file` of `text` in UTF-8 (same arguments)."""
    return write_file(path, text.encode("utf-8"), **kwargs)


def figure_png(fig: Any, *, dpi: int = 110, close: bool = True) -> bytes:
    """A Matplotlib figure rendered to PNG bytes in memory (Agg; released afterwards if `close`,
    from pyplot too when it has it)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    if not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    if close and "matplotlib.pyplot" in sys.modules:
        sys.modules["matplotlib.pyplot"].close(fig)
    return buf.getvalue()


def save_figure(fig: Any, path: str | Path, *, dpi: int = 110, flag: str = "--plots",
                then: str = "rerun", close: bool = True) -> Path:
    """Render a Matplotlib figure to PNG in memory (`figure_png`) and `write_file` it (parent
    folders created).

    Args:
        fig: A `matplotlib.figure.Figure`.
        path: The PNG file.
        dpi: Resolution.
        flag: The flag that named the folder (for the error message).
        then: What the user does once the cause is fixed.
        close: Release the figure afterwards (pyplot's, if it has one).

    Returns:
        `path`.
    """
    path = Path(path)
    write_file(path, figure_png(fig, dpi=dpi, close=close), flag=flag, then=then, make_parents=True)
    return path


class LineAppender:
    """Appends whole lines to a file, each durable (one `write` on an `O_APPEND` descriptor, then
    fsync) before the next.

    A kill -9 leaves at most the line being written incomplete; a failed append (full disk,
    `ulimit -f`, I/O error) is cut off again at once, so the file ends with its last complete
    line, and raises one `ProbesError` saying how many lines this run kept.
    """

    def __init__(self, path: str | Path, *, flag: str = "--out", then: str = "rerun with --resume",
                 what: str = "records") -> None:
        self.path = Path(path)
        self.flag, self.then, self.what = flag, then, what
        self.n_written = 0
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as exc:
            raise write_error(self.path, exc, flag=flag, then=then) from None

    def write(self, line: bytes) -> None:
        """Append one line (ending in a newline) and fsync it."""
        try:
            size = os.fstat(self._fd).st_size
        except OSError as exc:
            raise write_error(self.path, exc, flag=self.flag, then=self.then) from None
        try:
            _write_all(self._fd, line)
            os.fsync(self._fd)
        except OSError as exc:
            try:
                os.ftruncate(self._fd, size)
                kept = "every complete one is kept"
            except OSError:  # `probes.traces.jsonl.open_out` drops it when the file is resumed
                kept = "every complete one is kept, the partial last line is dropped on --resume"
            raise write_error(self.path, exc, flag=self.flag, then=self.then,
                              kept=f" after {self.n_written} new {self.what} ({kept})") from None
        self.n_written += 1

    def close(self) -> None:
        """Close the file (idempotent)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> LineAppender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
