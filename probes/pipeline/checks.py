"""The write loop's checks (`probes.pipeline.loop`): what is refused before the model is loaded
(the output path, repeated ids, a stored file of other settings) and what an existing store holds
(`Stored`: which traces are done, which tokens they have).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cache import (
    CacheError,
    CacheLockedError,
    CacheMismatchError,
    check_segments_folder,
    check_unlocked,
    open_cache,
    store_exists,
)
from probes.errors import ProbesError
from probes.pipeline.job import WriteJob
from probes.pipeline.shards import current_shard
from probes.traces.tokenize import ANSWER_SUFFIX

if TYPE_CHECKING:
    from probes.traces.read import TraceSet
    from probes.traces.tokenize import TokenizedTrace

TOKENIZATION_KEYS: tuple[str, ...] = ("prompt_format", "scaffold", "answer_suffix")
"""Config keys that decide a trace's tokens: every command must use the stored ones."""


def check_out(out: Path, *, resume: bool, overwrite: bool = False) -> None:
    """Refuse an `--out` that cannot be written as asked (before any work).

    Raises:
        CacheError: A folder, a missing parent folder, or an existing file without `resume`.
    """

    if not out.parent.is_dir():
        raise CacheError(f"cannot create {out}: folder {out.parent} does not exist; create it "
                         f"first (mkdir -p {out.parent}) or choose another --out")
    name_max = os.pathconf(out.parent, "PC_NAME_MAX")
    if len(out.name.encode("utf-8")) + len(".99999.tmp") > name_max:
        raise CacheError(f"--out name {out.name[:40]!r}... is too long for its folder ({name_max} "
                         f"bytes at most); choose a shorter --out")
    if out.is_dir():
        raise CacheError(f"--out {out} is a directory; give a file path such as {out / 'run.h5'}")
    if out.exists() and not (resume or overwrite):
        raise CacheError(f"{out} already exists; pass --resume to add to it (what it holds "
                         f"complete is kept), or choose another --out")
    target = out if out.exists() else out.parent
    if not os.access(target, os.W_OK):
        raise CacheError(f"cannot write {out}: {'the file' if out.exists() else 'its folder'} is "
                         f"not writable for this user; choose another --out or fix the permissions")


def same_settings(out: Path, done_key: str, own: Mapping[str, Any], what: str,
                  error: type[Exception] = ProbesError) -> Callable[[Any], None]:
    """A `WriteJob.check_stored` for a command that keeps its settings as trace attributes:
    refuses an existing `out` whose first trace holding `done_key` was made with other settings
    (naming every differing one); a cache without the command's arrays yet gains them.

    Args:
        out: The cache (named in the message).
        done_key: The array that marks the command's arrays complete in a trace.
        own: The settings of this run, as stored in the trace attributes.
        what: The arrays' name in the message ("effects arrays").
        error: The error type to raise (a `ProbesError`).
    """
    def check(reader: Any) -> None:
        for tr in reader:
            if done_key in tr.names():
                diff = [f"{k}: stored {tr.attrs.get(k)!r}, given {v!r}" for k, v in own.items()
                        if tr.attrs.get(k) != v]
                if diff:
                    raise error(f"{out} holds {what} made with other settings "
                                f"({'; '.join(diff)}): pass the same flags or write to another "
                                f"--out")
                return

    return check


def check_unique_ids(traceset: TraceSet) -> None:
    """Refuse a traces file that repeats an id (nothing is written), naming both lines."""
    dupes = [bad for bad in traceset.problems if bad.reason.startswith("duplicate id")]
    if dupes:
        first = dupes[0]
        more = f" ({len(dupes) - 1} more repeated ids)" if len(dupes) > 1 else ""
        raise ProbesError(
            f"{traceset.path}:{first.line_no}: {first.reason}{more}; a cache needs unique trace "
            f"ids: fix the input (nothing was written)"
        )


@dataclass
class Stored:
    """What an existing cache holds: its metadata and, per complete trace, tokens and array names."""

    metadata: dict[str, Any]
    traces: dict[str, tuple[np.ndarray, frozenset[str]]]
    has_sites: bool

    @property
    def config(self) -> dict[str, Any]:
        """The stored run config."""
        return dict(self.metadata.get("config", {}))


def read_stored(job: WriteJob) -> Stored | None:
    """The existing `job.out` (None when it is new or replaced); runs `job.check_stored` on it.

    Opening it also reports a locked, truncated, foreign or other-version file before the model
    is loaded.
    """

    if job.overwrite or not (job.out.exists() or (job.resume and store_exists(job.out))):
        return None  # (segments without their index file are replaced unless --resume)
    try:
        if current_shard() is None:
            check_unlocked(job.out, "s")
        check_segments_folder(job.out)  # another store's segments beside a single file
        with open_cache(job.out) as reader:
            if job.check_stored is not None:
                job.check_stored(reader)
            return Stored(metadata=dict(reader.metadata),
                          traces={tr.id: (np.asarray(tr.tokens), frozenset(tr.names()))
                                  for tr in reader},
                          has_sites=bool(reader.sites))
    except CacheLockedError:
        raise CacheLockedError(
            f"{job.out} is open by another process (HDF5 file lock, errno 11), e.g. another run "
            f"writing it; wait for it to finish, or choose another --out"
        ) from None


def new_file_config(job: WriteJob, *, prompt_format: str | None, scaffold: str) -> dict[str, Any]:
    """The `/meta/config` of a file this job creates: activation-site defaults (none), the
    tokenization, then the command's own settings."""
    return {"sites": {}, "positions": "none", "storage_dtype": None,
            "prompt_format": prompt_format, "scaffold": scaffold, "answer_suffix": ANSWER_SUFFIX,
            **dict(job.config)}


def check_tokens(out: Path, stored: Stored, tokenized: Iterable[TokenizedTrace],
                  traces_path: Path) -> None:
    """Refuse (before anything is written) a trace whose stored tokens differ."""

    for tt in tokenized:
        prior = stored.traces.get(tt.trace.id)
        if prior is not None and not np.array_equal(prior[0], tt.ids):
            raise CacheMismatchError(
                f"{out} holds trace {tt.trace.id!r} with other tokens ({len(prior[0])}) than "
                f"{traces_path}:{tt.trace.line_no} gives now ({tt.n_tokens}); the cache was made "
                f"from other traces or settings: use another --out (nothing was written)"
            )


def done_or_absent(job: WriteJob, stored: Stored | None, writer: Any, trace_id: str) -> str:
    """"done", a reason to leave the trace out, or "" (to do)."""
    if job.done_key is None:
        return "done" if writer.has_complete(trace_id) else ""
    prior = stored.traces.get(trace_id) if stored is not None else None
    if prior is not None and job.done_key in prior[1]:
        return "done"
    if prior is None and stored is not None and stored.has_sites:
        return "not in the activation cache"
    return ""
