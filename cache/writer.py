"""Append per-trace arrays to a cache, safely against kills and failed writes: `open_writer`.

Entry point: `with open_writer(path, metadata=...) as w: w.write_trace(trace_id, tokens=..., ...)`.

The store is segmented (`cache._store`; cache/SCHEMA.md#segmented-store): every committed write
(a whole trace, or arrays added to one) is one small HDF5 file in `<path>.segments/`, built in
memory and written with plain `os.write` under a temporary name, then renamed into place; the file
at `path` is an index of HDF5 external links that plain h5py and `cache.open_cache` read as one
store. A writer killed at any moment, or stopped by a full disk / file-size limit / I/O error,
leaves every committed trace readable bit-exact: HDF5 never writes to disk, so a failed write
can only leave a temporary file, which the next writer removes (`removed_incomplete`) and whose
trace is then redone. The index is derived from the segments and rewritten whole (atomically) at
most every `INDEX_INTERVAL_S` and on close; a reader rebuilds it when it is behind or damaged.

`fsync` is off by default: the rename makes a segment visible only complete, and the kernel keeps
it when the process dies (SIGKILL, OOM, Ctrl-C, an exception); only a kernel crash or power loss
can lose unsynced segments (a damaged segment is then removed and its trace redone). Pass
`fsync=True` to sync each segment and the folder before the rename.
"""

from __future__ import annotations

import fcntl
import os
import re
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import h5py
import numpy as np

from cache import _h5, _store, schema
from cache._meta import _check_identity, _fsync_dir, _normalize_metadata, _write_root
from cache._validate import (
    SiteArray,
    _check_attrs,
    _describe_layout,
    _group_layout,
    _prepare_array,
    _Prepared,
    _site_layout,
    prepare_trace,
)
from cache.errors import (
    CacheError,
    CacheInputError,
    CacheLockedError,
    CacheMismatchError,
    CacheWriteError,
    DuplicateTraceError,
    TraceNotFoundError,
)

__all__ = ["CacheWriter", "SiteArray", "WriteMode", "check_unlocked", "open_writer", "try_lock"]

WriteMode = Literal["append", "create", "overwrite"]
_MODES = ("append", "create", "overwrite")
_COMPRESSIONS = (None, "gzip")
_SHARD = re.compile(r"^[A-Za-z0-9]{1,32}$")
INDEX_INTERVAL_S = 5.0
"""Least seconds between two index rewrites while writing (and at least 10x the last rewrite's
time, so rewriting a large index costs under ~10%); it is always rewritten on close."""


def open_writer(
    path: str | os.PathLike[str],
    *,
    metadata: Mapping[str, Any],
    mode: WriteMode = "append",
    compression: Literal["gzip"] | None = None,
    fsync: bool = False,
    shard: str = "s",
    index: bool = True,
) -> CacheWriter:
    """Open (or create) a cache for writing; one writer per shard at a time.

    Args:
        path: The .h5 index file. Its folder must exist; segments go to `<path>.segments/`.
        metadata: What identifies the run (see `cache.schema.METADATA_KEYS`): required `model`
            (str), `architecture` (dict, `ArchInfo.to_dict()`), `model_dtype`, `weight_convention`,
            `tokenizer_fingerprint`, `lexicon_fingerprint` (str), `category_codes` (dict name ->
            uint8 code), `config` (JSON-able dict: sites, positions, storage dtype, prompt/scaffold
            templates, ...); optional `versions` (dict package -> version, e.g. transformers,
            transformer_lens, torch), `info` (JSON-able dict, e.g. the lexicon JSON) and
            `weights_fingerprint` (str). The identity keys must equal the stored ones to append
            (`weights_fingerprint` where the file has one); `versions`/`info` are recorded at
            creation only.
        mode: "append": create the store, or resume it (skip complete traces, remove interrupted
            ones). "create": the file must not exist, and is checked again once this writer holds
            the lock (a store another writer created meanwhile is refused and left as it is).
            "overwrite": replace any existing store (also checked again under the lock).
            Appending to a single-file cache (an older toolkit's, or `pack`'s) first moves its
            complete traces into segments; the file stays intact until all are moved, and an
            interrupted move is resumed (cache/SCHEMA.md#segmented-store).
        compression: None (default; fastest) or "gzip" (shuffle + gzip 4, ~25 MB/s, 6–15% smaller;
            docs/tooling.md#compression). Blosc2-zstd via hdf5plugin is a possible later opt-in.
        fsync: Also sync each segment (and the folder) to disk (survives power loss, not just a
            killed process).
        shard: Name of this writer's segments (letters and digits); several writers with
            different shards may write one store at once (e.g. one per torchrun rank).
        index: Whether this writer maintains the index file (one writer of a sharded run does;
            the others only add segments).

    Returns:
        A `CacheWriter` (a context manager).

    Raises:
        CacheLockedError: Another writer of the same shard has the store open.
        CacheMismatchError: Appending with a different model / tokenizer / config than stored.
        NotACacheError, CacheVersionError, CacheCorruptError: The existing file can't be appended.
        CacheInputError: Bad metadata, mode, compression or shard.
        CacheError: The path is a folder, its folder is missing, or (mode="create") it exists,
            also when another writer created it after the first check; a single-file cache with
            another store's segments folder beside it.
        CacheWriteError: Moving a single-file cache into segments failed (the file is unchanged).
    """
    path = Path(path)
    if mode not in _MODES:
        raise CacheInputError(f"mode must be one of {list(_MODES)}, got {mode!r}")
    if compression not in _COMPRESSIONS:
        raise CacheInputError(
            f"compression must be one of {list(_COMPRESSIONS)}, got {compression!r} "
            f"(Blosc2 via hdf5plugin is not supported yet)"
        )
    if not isinstance(shard, str) or not _SHARD.match(shard):
        raise CacheInputError(f"shard must be 1-32 letters or digits, got {shard!r}")
    meta = _normalize_metadata(metadata)
    _h5.check_file_path(path, creating=True)
    folder = _store.segments_dir(path)
    exists = path.exists() or folder.is_dir()
    if exists and mode == "create":
        raise _exists(path)
    if exists and mode == "overwrite":
        check_unlocked(path)
        _store.remove_store(path)
        path.unlink(missing_ok=True)
    if path.exists() and not folder.is_dir():
        with _h5.open_file(path, "r", writing=True) as f:  # locked / foreign / corrupt: one line
            if _store.SEGMENTS_DATASET in f:
                raise CacheError(
                    f"{path} is the index of a segmented cache whose segments folder is not next "
                    f"to it ({folder.name}/); move or copy that folder next to it to add to the "
                    f"cache, or write to another --out"
                )
    if index:
        _store.remove_stale_temps(path)
    created = not folder.is_dir()
    try:
        folder.mkdir(exist_ok=True)
    except OSError as exc:
        raise CacheWriteError(f"cannot create {folder}: {_store.describe_os_error(exc)}; "
                              f"{_store.fix_hint(exc)}") from None
    lock = _lock(folder, shard, path)  # a folder another writer locked is not ours to remove
    try:
        if mode != "append":
            _check_still_new(path, folder, shard)
        kind = _store.file_kind(path)  # decided under the lock: no other move runs
        if kind == "unreadable" and _store.migration_marked(path):
            _refuse_unreadable(path)  # a single file mid-move: never replaced by a partial index
        single = kind == "single"
        if single:
            _store.check_segments_folder(path)
            if not index:
                raise CacheError(
                    f"{path} is a single-file cache: the writer that keeps the index (index=True; "
                    f"rank 0 of a distributed run) moves it into segments first; open that one "
                    f"before the others"
                )
        writer = CacheWriter(path, meta, lock=lock, compression=compression, fsync=fsync,
                             shard=shard, index=index, legacy=single)
    except _StoreTaken:
        os.close(lock)
        raise _exists(path) from None
    except BaseException:
        os.close(lock)
        if created and not _store.list_segments(folder):  # creating it failed: leave nothing
            _store.remove_store(path)
        raise
    return writer


def _exists(path: Path) -> CacheError:
    return CacheError(
        f"{path} already exists; rerun with --resume to add to it (library: mode='append'), or "
        f"choose another --out; nothing of it was changed (another writer may have created it "
        f"after this run checked that it was new, e.g. a second run on the same --out)"
    )


class _StoreTaken(Exception):
    """A store meant to be new holds another writer's work (found under the writer lock)."""


def _check_still_new(path: Path, folder: Path, shard: str) -> None:
    """Under this writer's lock: raise `_StoreTaken` if the store that was new (or just replaced)
    when `open_writer` looked at it has an index, segments or another live writer by now."""
    if path.exists() or _store.list_segments(folder):
        raise _StoreTaken
    for name in os.listdir(folder):
        other = name[len(".lock-"):]
        if name.startswith(".lock-") and other != shard:
            fd = try_lock(folder / name)
            if fd is None:
                raise _StoreTaken
            os.close(fd)


def _refuse_unreadable(path: Path) -> None:
    """Raise the one-line error (locked, not HDF5, not a cache, corrupt) of an unreadable file
    (read only: a truncated file is not extended as `open_file(writing=True)` would)."""
    with _h5.open_file(path, "r", writing=False) as f:
        try:
            _h5.read_root_metadata(f, path)
            f[schema.TRACES_GROUP].keys()
        except (OSError, RuntimeError, KeyError, ValueError) as exc:
            raise _h5.corrupt_error(path, exc) from None
    raise _h5.corrupt_error(path, RuntimeError("no readable /traces group"))


@dataclass
class _NewTrace:
    """One trace of a `write_traces` group, validated: what its segment group holds."""

    trace_id: str
    name: str
    prepared: Any        # prepare_trace's (group attrs, core arrays, text items, datasets)
    members: dict[str, str]
    size: int


def try_lock(lock_file: Path) -> int | None:
    """Take the exclusive `flock` of `lock_file` (created if absent) without waiting.

    The one lock of every single-writer file of the toolkit: a cache shard (`<out>.segments/
    .lock-<shard>`) and a JSONL output (`probes.traces.jsonl`). The kernel releases it when the
    descriptor is closed or the process dies (kill -9 included), so a stale lock never blocks.

    Returns:
        The open descriptor holding the lock (close it to release), or None when another process
        holds it.
    """
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _lock(folder: Path, shard: str, path: Path) -> int:
    lock = folder / f".lock-{shard}"
    try:
        fd = try_lock(lock)
    except OSError as exc:  # an unwritable lock file or folder: one line, before any work
        raise CacheWriteError(f"cannot open the lock file {lock} of {path}: "
                              f"{_store.describe_os_error(exc)}; "
                              f"{_store.fix_hint(exc)}") from None
    if fd is None:
        raise CacheLockedError(
            f"{path} is open by another writer (another process holds {folder.name}/.lock-"
            f"{shard}); wait for it or write to another file (--out other.h5)"
        )
    return fd


def check_unlocked(path: Path, shard: str | None = None) -> None:
    """Raise `CacheLockedError` if a writer (of `shard`, or of any shard) holds the store."""
    with holding_locks(path, shard):
        pass


@contextmanager
def holding_locks(path: Path, shard: str | None = None) -> Iterator[None]:
    """Hold the lock of every writer (of `shard`, or of any shard) of the store meanwhile.

    Raises:
        CacheLockedError: A writer holds one.
    """
    folder = _store.segments_dir(path)
    held: list[int] = []
    try:
        for name in (sorted(os.listdir(folder)) if folder.is_dir() else []):
            if name.startswith(".lock-") and shard in (None, name[len(".lock-"):]):
                held.append(_lock(folder, name[len(".lock-"):], path))
        yield
    finally:
        for fd in held:
            os.close(fd)


class CacheWriter:
    """Writes traces into a segmented store; create it with `open_writer`.

    Attributes:
        path: The index file.
        removed_incomplete: Ids of interrupted traces removed when the store was opened (redo them).
    """

    def __init__(self, path: Path, meta: dict[str, Any], *, lock: int,
                 compression: Literal["gzip"] | None, fsync: bool, shard: str, index: bool,
                 legacy: bool) -> None:
        """Use `open_writer`."""
        self.path = path
        self._folder = _store.segments_dir(path)
        self._lock: int | None = lock
        self._compression = compression
        self._fsync = fsync
        self._shard = shard
        self._index = index
        self._seen: set[str] = set()
        self._codes = set(meta[schema.ATTR_CATEGORY_CODES].values())
        self._last_dump = 0.0
        self._dump_seconds = 0.0
        self._dirty = False
        self._moving = legacy  # moving a single file into segments: no index until all moved
        removed = self._remove_pending()
        if legacy:
            removed = []  # those traces are still in the single file (moved again below)
        self._state = _store.scan(self._folder)
        removed += self._remove_damaged()
        root = self._stored_root()
        if root is None:
            self._root = _store.Root.read_image(lambda f: _write_root(f, meta))
            self._dirty = True
        else:
            self._root = root
            _check_identity(path, self._root.metadata(path), meta)
        self._seq = max((_store.segment_key(s)[0] for s in _store.list_segments(self._folder)
                         if s.startswith(f"{shard}-")), default=0)
        if legacy:
            removed += self._adopt_single_file()
        self.removed_incomplete: tuple[str, ...] = tuple(removed)
        self._layout = self._stored_layout()
        if self._dirty or not self._index_current():
            self._dump_index(force=True)
        if self._index:
            self._moving = False
            _store.remove_migration_marker(path)  # the index has replaced the single file

    # -- context manager -------------------------------------------------------------------------
    def __enter__(self) -> CacheWriter:
        """Return self."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the store (committed traces stay; an uncommitted one is redone on resume)."""
        self.close(quiet=exc is not None)

    def close(self, *, quiet: bool = False) -> None:
        """Rewrite the index (from every shard's segments) and release the lock; idempotent.

        Args:
            quiet: Do not raise when the index cannot be rewritten (closing after another error;
                the segments are kept and any reader or `--resume` rebuilds the index).
        """
        if self._lock is None:
            return
        try:
            if self._index:
                known = len(self._state.segments)
                _store.scan(self._folder, self._state)  # other shards' segments too
                self._dirty |= len(self._state.segments) != known
                if self._dirty or not self._index_current():
                    self._dump_index(force=True)
        except CacheWriteError:
            if not quiet:
                raise
        finally:
            os.close(self._lock)
            self._lock = None

    def flush(self) -> None:
        """Rewrite the index now (every committed trace is already on disk)."""
        self._open()
        self._dump_index(force=True)

    # -- queries ---------------------------------------------------------------------------------
    def has_complete(self, trace_id: str) -> bool:
        """Whether `trace_id` is stored and committed (resume skips these)."""
        self._open()
        return schema.escape_trace_id(trace_id) in self._state.entries

    def complete_ids(self) -> list[str]:
        """Ids of every committed trace, in write order."""
        self._open()
        return [entry.trace_id for entry in self._state.entries.values()]

    # -- writing ---------------------------------------------------------------------------------
    def write_trace(
        self,
        trace_id: str,
        *,
        tokens: np.ndarray,
        category: np.ndarray,
        positions: np.ndarray | None = None,
        spans: Mapping[str, tuple[int, int]] | None = None,
        sites: Mapping[str, np.ndarray | SiteArray] | None = None,
        arrays: Mapping[str, np.ndarray | SiteArray] | None = None,
        text: Mapping[str, str] | None = None,
        source: str = "",
        attrs: Mapping[str, str | int | float | bool] | None = None,
    ) -> bool:
        """Write one trace and commit it (one segment), or skip it if already complete.

        Shapes: tokens/category [n_tokens]; positions [n_sel] (default: every token); each site
        [n_sel, ...], typically [n_sel, n_layers, d] float16/float32 or bf16 bits.

        Args:
            trace_id: Unique id (any string; escaped for HDF5, kept verbatim in attr `trace_id`).
            tokens: Token ids, stored as int32.
            category: Category code per token (values of the root `category_codes`), uint8.
            positions: Strictly increasing token indices the site rows belong to.
            spans: Half-open token ranges, e.g. {"prompt": (0, 12), "trajectory": (12, 300)}.
            sites: Site name -> array (or `SiteArray` for bf16 bits / explicit layers). Every trace
                of a file has the same sites with the same dtypes, row shapes and layers.
            arrays: Extra per-trace arrays (e.g. "lhat" float32 [T+1]), stored as given.
            text: Strings such as {"question": ..., "answer": ...}.
            source: Where the trace came from, e.g. "traces.jsonl:12".
            attrs: Small extra attributes (str / int / float / bool).

        Returns:
            True if written, False if the file already held it complete (a resumed run).

        Raises:
            DuplicateTraceError: `trace_id` was already written (or skipped) by this writer.
            CacheInputError: An array, name or attribute that can't be stored as given.
            CacheMismatchError: Sites differing from the ones already in the file.
            CacheWriteError: The disk refused the write (full, file-size limit, I/O error); every
                trace committed before stays, and a rerun with --resume redoes this one.
        """
        return self.write_traces([{
            "trace_id": trace_id, "tokens": tokens, "category": category, "positions": positions,
            "spans": spans, "sites": sites, "arrays": arrays, "text": text, "source": source,
            "attrs": attrs,
        }])[0]

    def write_traces(self, traces: Sequence[Mapping[str, Any]]) -> list[bool]:
        """Write several traces and commit them together (one segment: all of them or none).

        Writing short traces in groups pays the per-commit cost (a segment file, its root
        metadata) once per group; a kill or a refused write loses at most the uncommitted group.

        Args:
            traces: One mapping of `write_trace`'s keyword arguments per trace.

        Returns:
            Per trace: True if written, False if the file already held it complete.

        Raises:
            The errors of `write_trace`; on any of them nothing of the group is kept.
        """
        self._open()
        parts: list[_NewTrace] = []
        names: set[str] = set()
        written = []
        for kw in traces:
            trace_id = kw["trace_id"]
            name = schema.escape_trace_id(trace_id)
            if trace_id in self._seen or name in names:
                raise DuplicateTraceError(
                    f"trace id {trace_id!r} was already written to {self.path} in this run; "
                    f"trace ids must be unique (check the input for a repeated id)"
                )
            if name in self._state.entries:
                self._seen.add(trace_id)
                written.append(False)
                continue
            prepared = prepare_trace(
                self._codes, trace_id, tokens=kw["tokens"], category=kw["category"],
                positions=kw.get("positions"), spans=kw.get("spans"), sites=kw.get("sites"),
                arrays=kw.get("arrays"), text=kw.get("text"), source=kw.get("source", ""),
                attrs=kw.get("attrs"),
            )
            group_attrs, core, text_items, datasets = prepared
            self._check_layout(trace_id, datasets)
            if self._layout is None:
                self._layout = _site_layout(datasets)
            members = {key: "" for key in core}
            members.update({item.name: item.attrs[schema.ATTR_KIND] for item in datasets})
            if text_items:
                members[schema.TEXT_GROUP] = "group"
            size = sum(a.nbytes for a in core.values()) + sum(d.data.nbytes for d in datasets)
            parts.append(_NewTrace(trace_id, name, prepared, members, size))
            names.add(name)
            written.append(True)
        if not parts:
            return written

        def fill(f: h5py.File) -> None:
            for part in parts:
                group_attrs, core, text_items, datasets = part.prepared
                group = self._segment_group(f, _store.KIND_TRACE, part.name)
                group.attrs[schema.ATTR_COMPLETE] = np.bool_(True)
                _h5.set_attrs(group, group_attrs)
                for key, array in core.items():
                    group.create_dataset(key, data=array)
                if text_items:
                    text_group = group.create_group(schema.TEXT_GROUP)
                    for key, value in text_items.items():
                        text_group.create_dataset(key, data=value, dtype=_h5.STRING_DTYPE)
                for item in datasets:
                    self._create_dataset(group, item.name, item)

        try:
            self._commit([(p.name, {schema.ATTR_COMPLETE: np.bool_(True), **p.prepared[0]},
                           p.members) for p in parts],
                         [p.trace_id for p in parts], fill, _store.KIND_TRACE,
                         size_hint=sum(p.size for p in parts))
        except CacheWriteError:
            if not self._state.entries:
                self._layout = None  # the first group was refused: no layout is stored yet
            raise
        self._seen.update(p.trace_id for p in parts)
        return written

    def add_to_trace(
        self,
        trace_id: str,
        arrays: Mapping[str, np.ndarray | SiteArray],
        *,
        attrs: Mapping[str, str | int | float | bool] | None = None,
    ) -> None:
        """Add (or replace) per-trace arrays and attrs of a committed trace, e.g. an L̂ curve.

        They are committed together as one segment: a failure leaves the old arrays.

        Args:
            trace_id: A complete trace of this file.
            arrays: Name -> array (or `SiteArray(bits, dtype="bfloat16")`), stored as given.
            attrs: Small attributes to set on the trace (str / int / float / bool).

        Raises:
            TraceNotFoundError: No complete trace `trace_id`.
            CacheInputError: A reserved or site name, or an array that can't be stored.
            CacheWriteError: The disk refused the write; nothing of it is kept.
        """
        self._open()
        name = schema.escape_trace_id(trace_id)
        entry = self._state.entries.get(name)
        if entry is None:
            raise TraceNotFoundError(
                f"no complete trace {trace_id!r} in {self.path}; write it with write_trace first"
            )
        prepared = [_prepare_array(key, value, kind=schema.KIND_ARRAY, n_rows=None)
                    for key, value in arrays.items()]
        for item in prepared:
            if entry.kinds.get(item.name) == schema.KIND_SITE:
                raise CacheInputError(
                    f"{item.name!r} is a site of trace {trace_id!r}; add_to_trace adds metric "
                    f"arrays and can't replace captured sites; choose another name"
                )
        clean_attrs = _check_attrs(attrs)

        def fill(f: h5py.File) -> None:
            group = self._segment_group(f, _store.KIND_ADD, name)
            for key, value in clean_attrs.items():
                group.attrs[key] = value
            for item in prepared:
                self._create_dataset(group, item.name, item)

        self._commit([(name, clean_attrs,
                       {item.name: item.attrs[schema.ATTR_KIND] for item in prepared})],
                     trace_id, fill, _store.KIND_ADD,
                     size_hint=sum(item.data.nbytes for item in prepared))

    # -- internals -------------------------------------------------------------------------------
    def _open(self) -> None:
        if self._lock is None:
            raise CacheError(f"the writer of {self.path} is closed; open it again with open_writer")

    def _segment_group(self, f: h5py.File, kind: str, name: str) -> h5py.Group:
        """A new trace group in segment `f` (the root metadata is written with the first)."""
        if schema.TRACES_GROUP not in f:
            self._root.write(f)
            f.attrs[_store.ATTR_SEGMENT_KIND] = kind
        return f[schema.TRACES_GROUP].create_group(name)

    def _commit(self, entries: str | Sequence[tuple[str, Mapping[str, Any], Mapping[str, str]]],
                trace_ids: str | Sequence[str], fill: Any, kind: str | None = None,
                size_hint: int = 0) -> None:
        """Build a segment in memory, write it under a temporary name, rename it into place.

        `entries` ((name, attrs, members) per trace group) and `kind` describe what `fill`
        writes, so the state is updated without reading the segment back; a bare name (or no
        `kind`): read it back.
        """
        image = _store.build_image(fill, size_hint)
        self._seq += 1
        seg = f"{self._shard}-{self._seq:06d}.h5"
        ids = [trace_ids] if isinstance(trace_ids, str) else list(trace_ids)
        first = entries if isinstance(entries, str) else entries[0][0]
        try:
            _store.write_file(image, self._folder / seg,
                              self._folder / _store.tmp_name(seg, first), fsync=self._fsync)
            if self._fsync:
                _fsync_dir(self._folder)
        except OSError as exc:
            what = (f"trace {ids[0]!r}" if len(ids) == 1 else
                    f"{len(ids)} traces ({ids[0]!r} to {ids[-1]!r})")
            if self._moving:
                raise self._moving_error(f"writing {what} to {self._folder / seg}", exc) from None
            raise CacheWriteError(
                f"writing {what} to {self._folder / seg} failed: "
                f"{_store.describe_os_error(exc)}; the {len(self._state.entries)} traces "
                f"committed to {self.path} before are kept: {_store.fix_hint(exc)}"
            ) from None
        if kind is None or isinstance(entries, str):
            self._state.apply(self._folder, seg)
        else:
            self._state.add(seg, [(name, kind, dict(attrs), dict(members))
                                  for name, attrs, members in entries])
        self._dirty = True
        self._dump_index(force=False)

    def _dump_index(self, *, force: bool) -> None:
        """Rewrite the index file (atomically) if this writer keeps it and it is due."""
        due = max(INDEX_INTERVAL_S, 10 * self._dump_seconds)  # rewrites cost at most ~10%
        if not self._index or not (force or time.monotonic() - self._last_dump >= due):
            return
        if not (force or self._dirty) or (self._moving and not force):
            return  # (while moving a single file, the index would replace it half moved)
        t0 = time.monotonic()
        image = _store.index_image(self._root, self._state, self._folder, absolute=False)
        try:
            _store.write_file(image, self.path, _store.temp_path(self.path), fsync=self._fsync)
        except OSError as exc:
            if self._moving:
                raise self._moving_error(f"replacing {self.path} by its index", exc) from None
            if not force:
                return  # the index lags; readers rebuild it and the next rewrite catches up
            raise CacheWriteError(
                f"rewriting the index {self.path} failed: {_store.describe_os_error(exc)}; every "
                f"committed trace is kept in {self._folder} (readers rebuild the index): "
                f"{_store.fix_hint(exc)}"
            ) from None
        self._last_dump = time.monotonic()
        self._dump_seconds = self._last_dump - t0
        self._dirty = False

    def _index_current(self) -> bool:
        """Whether the index on disk lists exactly the segments, in this store's folder."""
        try:
            with h5py.File(self.path, "r") as f:
                listed = f[_store.SEGMENTS_DATASET]
                return ([_h5.as_str(x) for x in listed[()]] == self._state.segments
                        and _h5.as_str(listed.attrs.get("folder")) == self._folder.name)
        except (OSError, KeyError, ValueError):
            return False

    def _remove_pending(self) -> list[str]:
        removed = []
        for file_name, trace_id in _store.list_pending(self._folder, self._shard):
            (self._folder / file_name).unlink(missing_ok=True)
            removed.append(trace_id)
        return removed

    def _remove_damaged(self) -> list[str]:
        """Remove this shard's unreadable segments (torn by a power loss without fsync)."""
        removed = []
        for seg in self._state.damaged:
            if seg.startswith(f"{self._shard}-"):
                (self._folder / seg).unlink(missing_ok=True)
                removed.append(f"(damaged segment {seg})")
        if removed:
            self._state = _store.scan(self._folder)
            self._dirty = True
        return removed

    def _stored_root(self) -> _store.Root | None:
        """The root of the existing index, else of the first segment, else of a single file."""
        if self.path.exists():
            try:
                with h5py.File(self.path, "r") as f:
                    _h5.read_root_metadata(f, self.path)
                    return _store.Root.read(f)
            except OSError:
                self._dirty = True  # a damaged index: rebuilt from the segments
        return self._state.root

    def _moving_error(self, what: str, exc: OSError) -> CacheWriteError:
        """The error of a failed write while moving the single file into segments."""
        return CacheWriteError(
            f"moving the single-file cache {self.path} into segments failed ({what}): "
            f"{_store.describe_os_error(exc)}; {self.path} is unchanged and keeps every trace "
            f"(the {len(self._state.entries)} traces moved so far stay in {self._folder} and "
            f"are reused): {_store.fix_hint(exc)}"
        )

    def _adopt_single_file(self) -> list[str]:
        """Move the complete traces of a single-file cache at `path` into segments.

        The single file stays as it is until every trace is in a segment; then the caller's one
        index rewrite replaces it (atomically). The marker `.migrating` names the file, so that an
        interrupted move is resumed (the traces already moved are skipped) and a folder of another
        store is never adopted (`check_segments_folder`). No index is written meanwhile: a
        reader reads the single file (`is_segmented`).
        """
        removed = []
        if not _store.is_migration_of(self.path):
            try:
                _store.write_migration_marker(self.path, fsync=self._fsync)
            except OSError as exc:
                raise self._moving_error(f"writing {self._folder / _store.MIGRATION_MARKER}",
                                         exc) from None
        with _h5.open_file(self.path, "r", writing=False) as src:
            for name in list(src[schema.TRACES_GROUP]):
                try:
                    group = src[schema.TRACES_GROUP][name]
                    complete = bool(group.attrs.get(schema.ATTR_COMPLETE, False))
                except (OSError, KeyError, RuntimeError, ValueError):
                    group, complete = None, False
                trace_id = schema.unescape_trace_id(name)
                if not complete or group is None:
                    removed.append(trace_id)
                    continue
                if name in self._state.entries:
                    continue

                def fill(f: h5py.File, group: h5py.Group = group, name: str = name) -> None:
                    self._root.write(f)
                    f.attrs[_store.ATTR_SEGMENT_KIND] = _store.KIND_TRACE
                    f[schema.TRACES_GROUP].copy(group, name)

                self._commit(name, _h5.as_str(group.attrs.get(schema.ATTR_TRACE_ID, trace_id)),
                             fill)
        self._dirty = True
        return removed

    def _create_dataset(self, group: h5py.Group, name: str, item: _Prepared) -> None:
        options: dict[str, Any] = {"chunks": item.chunks}
        if self._compression == "gzip":
            options.update(compression="gzip", compression_opts=schema.GZIP_LEVEL, shuffle=True,
                           chunks=item.chunks or True)
        dataset = group.create_dataset(name, data=item.data, **options)
        _h5.set_attrs(dataset, item.attrs)

    def _stored_layout(self) -> dict[str, tuple[str, tuple[int, ...], tuple[int, ...]]] | None:
        """Sites of the first stored trace: name -> (dtype, row shape, layers); None if empty."""
        for name, entry in self._state.entries.items():
            seg = entry.datasets.get(schema.TOKENS)
            if seg is None:
                continue
            with h5py.File(self._folder / seg, "r") as f:
                return _group_layout(f[schema.TRACES_GROUP][name])
        return None

    def _check_layout(self, trace_id: str, datasets: Iterable[_Prepared]) -> None:
        given = _site_layout(datasets)
        if self._layout is None:
            return
        problems = []
        for site in sorted(set(self._layout) | set(given)):
            stored, new = self._layout.get(site), given.get(site)
            if stored != new:
                problems.append(f"{site}: stored {_describe_layout(stored)}, "
                                f"given {_describe_layout(new)}")
        if problems:
            raise CacheMismatchError(
                f"trace {trace_id!r} has sites different from the ones in {self.path} ("
                + "; ".join(problems) + "); every trace of a cache has the same sites, dtypes, "
                "shapes and layers: write to another file (--out other.h5) or use the same sites"
            )


def remove_cache(path: str | os.PathLike[str]) -> None:
    """Delete the cache at `path`: its file and its segments folder (nothing if absent).

    Raises:
        CacheLockedError: A writer has it open.
    """
    path = Path(path)
    check_unlocked(path)
    _store.remove_store(path)
    path.unlink(missing_ok=True)
