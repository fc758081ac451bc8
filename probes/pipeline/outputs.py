"""Output paths of the report commands, checked before any work, and plot file names from ids.

`check_output_file(path, flag)` (e.g. `fit --out`) and `check_plot_folder(path)` (`--plots`) raise
one `ProbesError` naming the flag, the path and the fix, so nothing is computed for a result that
could not be saved (the files themselves are written by `probes.safe_output`).
`plot_file_name(prefix, trace_id)` turns any trace id into a safe, short, unique PNG name.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from probes.errors import ProbesError
from probes.safe_output import check_writable, nearest_existing

MAX_STEM_CHARS = 60
"""Characters of an id kept in a plot file name (the rest is replaced by a hash)."""


def check_output_file(path: Path, flag: str, *, make_parents: bool = False) -> None:
    """Refuse an output file that cannot be written (a folder, missing folder, unwritable, name
    too long): `probes.safe_output.check_writable` for a file replaced through a temporary one.

    Raises:
        ProbesError: One line naming `flag`, the path and the fix.
    """
    check_writable(Path(path), flag, make_parents=make_parents, example="report.json")


def check_plot_folder(path: Path, flag: str = "--plots") -> None:
    """Refuse a plot folder that is an existing file or lies in an unwritable folder.

    Raises:
        ProbesError: One line naming `flag`, the path and the fix.
    """
    if path.exists() and not path.is_dir():
        raise ProbesError(f"{flag} {path} is an existing file; give a folder (created if missing) "
                          f"for the PNG plots")
    base = nearest_existing(path)
    if not base.is_dir():
        raise ProbesError(f"{flag} {path}: {base} is a file, so the folder cannot be created; "
                          f"choose another {flag}")
    if not os.access(base, os.W_OK | os.X_OK):
        raise ProbesError(f"cannot write {flag} {path}: {base} is not writable for this user; "
                          f"choose another {flag} or fix the permissions")


def plot_file_name(prefix: str, trace_id: str, suffix: str = ".png") -> str:
    """`<prefix>_<id>.png` with the id escaped (letters, digits, `-_.` kept, the rest `_`) and
    cut to `MAX_STEM_CHARS`; an id that was changed or cut gets 10 hex digits of its SHA-1, so
    different ids never share a name and every name stays far below the 255-byte file-name limit.
    """
    safe = "".join(c if (c.isascii() and c.isalnum()) or c in "-_." else "_" for c in trace_id)
    if safe != trace_id or len(safe) > MAX_STEM_CHARS or safe.startswith("."):
        digest = hashlib.sha1(trace_id.encode("utf-8", "surrogatepass")).hexdigest()[:10]
        safe = f"{safe[:MAX_STEM_CHARS]}-{digest}"
    return f"{prefix}_{safe}{suffix}"
