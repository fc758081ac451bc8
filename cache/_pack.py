"""`pack_cache`: a segmented store as one self-contained HDF5 file (private to `cache/`).

The copy is written by a forked child process, so that an HDF5 failure on a full disk (which can
crash the library) cannot take the caller down; see cache/SCHEMA.md#segmented-store.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import sys
from collections.abc import Iterable
from pathlib import Path

import h5py

from cache import schema
from cache._store import (
    Root,
    describe_os_error,
    fix_hint,
    remove_stale_temps,
    remove_store,
    temp_path,
)
from cache.errors import CacheError, CacheWriteError
from cache.reader import open_cache
from cache.writer import check_unlocked, holding_locks

_PR_SET_PDEATHSIG = 1


def pack_cache(source: str | os.PathLike[str], target: str | os.PathLike[str], *,
               trace_ids: Iterable[str] | None = None) -> int:
    """Copy the complete traces of cache `source` into one self-contained HDF5 file `target`.

    The copy holds the same root metadata and trace groups (datasets bit-exact, with the same
    dtypes, chunks and compression) and no external link; it is written to a temporary file next
    to `target` by a forked child process (an HDF5 failure on a full disk cannot crash the caller),
    then renamed; on failure the temporary file is removed and `target` is untouched. When
    `target` was a segmented store (or a single file with a move into segments under way), its
    segments folder is removed once the new file has replaced it. The temporary files of earlier
    packs that were killed (`<target>.<pid>.tmp` of a dead process) are removed first.
    `open_cache` and plain h5py read it; appending to it (`--resume`) first moves it back into
    segments.

    Args:
        source: A cache (segmented store or single file).
        target: The new file (replaced if it exists).
        trace_ids: Traces to copy (default: every complete one).

    Returns:
        The number of traces copied.

    Raises:
        CacheLockedError: A writer has the store at `target` open.
        CacheWriteError: The copy could not be written (names the cause and the fix).
    """
    source, target = Path(source), Path(target)
    ids = None if trace_ids is None else list(trace_ids)
    remove_stale_temps(target)  # the copies of packs that were killed
    check_unlocked(target)  # an existing store at `target` that a writer holds: refused now
    tmp = temp_path(target)
    parent = os.getpid()
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child writes the file: an HDF5 failure cannot take the caller down
        os.close(read_fd)
        _die_with_parent(parent)
        code = 0
        try:
            message = str(_pack_into(source, tmp, ids))
        except CacheError as exc:  # the source cannot be read
            message, code = f"{type(exc).__name__}\t{exc}", 4
        except BaseException as exc:  # writing failed (OSError, or HDF5's RuntimeError)
            found = re.search(r"errno = (\d+)", str(exc))
            number = exc.errno if isinstance(exc, OSError) else None
            number = number or (int(found.group(1)) if found else 0)
            message, code = f"{number}\t{' '.join(str(exc).split())}", 3
        os.write(write_fd, message.encode("utf-8", "replace"))
        os._exit(code)
    os.close(write_fd)
    try:
        with os.fdopen(read_fd, "rb") as pipe:
            message = pipe.read().decode("utf-8", "replace")
        _, status = os.waitpid(pid, 0)
    except BaseException:  # Ctrl-C: the copy is abandoned and leaves nothing
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    code = os.waitstatus_to_exitcode(status)
    if code == 0:
        try:
            with holding_locks(target):  # no writer opens the old store meanwhile
                os.replace(tmp, target)
                # The segments of the store the file replaces (or of an interrupted move of the
                # file into segments) are not this file's: plain h5py and `open_cache` agree.
                remove_store(target)
            return int(message)
        except OSError as exc:
            cause = describe_os_error(exc)
            fix = fix_hint(exc)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    elif code == 4:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise CacheError(message.split("\t", 1)[-1])
    elif code == 3:
        number = int(message.split("\t", 1)[0] or 0)
        error = OSError(number, os.strerror(number)) if number else OSError(message)
        cause, fix = describe_os_error(error), fix_hint(error)
    else:
        cause = (f"the HDF5 writer process died with signal {-code}" if code < 0
                 else f"the HDF5 writer process failed (exit {code}): {message}")
        fix = "check free space and the disk"
    with contextlib.suppress(OSError):
        os.unlink(tmp)
    fix = fix.replace(", then rerun with --resume", "")
    raise CacheWriteError(
        f"packing {source} into {target} failed: {cause}; {target} was not written and {source} "
        f"is unchanged: {fix}, then pack again"
    )


def _die_with_parent(parent: int) -> None:
    """Make this forked child die with its parent (Linux `PR_SET_PDEATHSIG`; best effort), so that
    a killed `pack` does not go on writing its temporary file (`remove_stale_temps` removes it)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the prctl
        os._exit(1)


def _pack_into(source: Path, tmp: Path, trace_ids: list[str] | None) -> int:
    n_copied = 0
    with open_cache(source) as reader:
        src = reader._require_open()
        root = Root.read(src)
        with h5py.File(tmp, "w") as dst:
            root.write(dst)
            for trace_id in (reader.trace_ids() if trace_ids is None else trace_ids):
                name = schema.escape_trace_id(trace_id)
                dst[schema.TRACES_GROUP].copy(src[schema.TRACES_GROUP][name], name,
                                              expand_external=True)
                n_copied += 1
    return n_copied
