"""Append per-trace arrays to one HDF5 cache, crash-safely and resumably: `open_writer`.

Entry point: `with open_writer(path, metadata=...) as w: w.write_trace(trace_id, tokens=..., ...)`.
Commit protocol per trace: create the group (attr `complete=False`), write every dataset and attr,
`flush()`, flip `complete` to True in place, `flush()` again. A writer killed at any moment leaves
every committed trace readable; on the next `open_writer(..., mode="append")` the interrupted trace
is deleted and the caller redoes it (`has_complete` tells which to skip). Default HDF5 file format
(never `libver="latest"`, which needs `h5clear` after a crash; docs/tooling.md#crash-safety).

`fsync` is off by default: `flush()` hands the data to the operating system, which survives the
writer process being killed (SIGKILL, OOM, Ctrl-C, an exception); only a kernel crash or power loss
(e.g. a preempted VM) can lose flushed-but-unsynced traces. Pass `fsync=True` for that, at the cost
of two disk syncs per trace. Deleted (interrupted or replaced) data leaves unused space in the file;
`h5repack` reclaims it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import h5py
import numpy as np

from cache import _h5, schema
from cache._meta import _check_identity, _create_file, _normalize_metadata
from cache._validate import (
    SiteArray,
    _check_attrs,
    _check_spans,
    _describe_layout,
    _group_layout,
    _int_vector,
    _is_complete,
    _prepare_array,
    _Prepared,
    _site_layout,
    _trace_id,
)
from cache.errors import (
    CacheError,
    CacheInputError,
    CacheMismatchError,
    DuplicateTraceError,
    TraceNotFoundError,
)

__all__ = ["CacheWriter", "SiteArray", "WriteMode", "open_writer"]

WriteMode = Literal["append", "create", "overwrite"]
WriteMode = Literal["append", "create", "overwrite"]


WriteMode = Literal["append", "create", "overwrite"]


WriteMode = Literal["append", "create", "overwrite"]


_MODES = ("append", "create", "overwrite")


_COMPRESSIONS = (None, "gzip")
_RESERVE_SLACK = 4 << 20
"""Bytes `_reserve` adds beyond a trace's data for the metadata HDF5 may allocate with it."""


def open_writer(
    path: str | os.PathLike[str],
    *,
    metadata: Mapping[str, Any],
    mode: WriteMode = "append",
    compression: Literal["gzip"] | None = None,
    fsync: bool = False,
) -> CacheWriter:
    """Open (or create) a cache for writing; the only process with the file open until closed.

    Args:
        path: The .h5 file. Its folder must exist.
        metadata: What identifies the run (see `cache.schema.METADATA_KEYS`): required `model`
            (str), `architecture` (dict, `ArchInfo.to_dict()`), `model_dtype`, `weight_convention`,
            `tokenizer_fingerprint`, `lexicon_fingerprint` (str), `category_codes` (dict name ->
            uint8 code), `config` (JSON-able dict: sites, positions, storage dtype, prompt/scaffold
            templates, ...); optional `versions` (dict package -> version, e.g. transformers,
            transformer_lens, torch) and `info` (JSON-able dict, e.g. the lexicon JSON). The
            identity keys must equal the stored ones to append; `versions`/`info` are recorded
            at creation only.
        mode: "append": create the file, or resume it (skip complete traces, delete interrupted
            ones). "create": the file must not exist. "overwrite": replace any existing file.
        compression: None (default; fastest) or "gzip" (shuffle + gzip 4, ~25 MB/s, 6–15% smaller;
            docs/tooling.md#compression). Blosc2-zstd via hdf5plugin is a possible later opt-in.
        fsync: Also `os.fsync` after each flush (survives power loss, not just a killed process).

    Returns:
        A `CacheWriter` (a context manager).

    Raises:
        CacheLockedError: Another process has the file open (HDF5 lock, errno 11).
        CacheMismatchError: Appending with a different model / tokenizer / config than stored.
        NotACacheError, CacheVersionError, CacheCorruptError: The existing file can't be appended.
        CacheInputError: Bad metadata, mode or compression.
        CacheError: The path is a folder, its folder is missing, or (mode="create") it exists.
    """
    path = Path(path)
    if mode not in _MODES:
        raise CacheInputError(f"mode must be one of {list(_MODES)}, got {mode!r}")
    if compression not in _COMPRESSIONS:
        raise CacheInputError(
            f"compression must be one of {list(_COMPRESSIONS)}, got {compression!r} "
            f"(Blosc2 via hdf5plugin is not supported yet)"
        )
    meta = _normalize_metadata(metadata)
    _h5.check_file_path(path, creating=True)
    exists = path.exists()
    if exists and mode == "create":
        raise CacheError(f"{path} already exists; use mode='append' to resume it, or "
                         f"mode='overwrite' to replace it")
    if not exists or mode == "overwrite":
        _create_file(path, meta, replace=mode == "overwrite", fsync=fsync)
    file = _h5.open_file(path, "r+", writing=True)
    try:
        stored = _h5.read_root_metadata(file, path)
        _check_identity(path, stored, meta)
        writer = CacheWriter(file, path, compression=compression, fsync=fsync)
    except BaseException:
        file.close()
        raise
    return writer


class CacheWriter:
    """Writes traces into one open cache file; create it with `open_writer`.

    Attributes:
        path: The file.
        removed_incomplete: Ids of interrupted traces deleted when the file was opened (redo them).
    """

    def __init__(
        self,
        file: h5py.File,
        path: Path,
        *,
        compression: Literal["gzip"] | None,
        fsync: bool,
    ) -> None:
        """Use `open_writer`; this takes an already validated, open file."""
        self.path = path
        self._file: h5py.File | None = file
        self._compression = compression
        self._fsync = fsync
        self._seen: set[str] = set()
        self._traces = file[schema.TRACES_GROUP]
        self._codes = set(json.loads(_h5.as_str(file.attrs[schema.ATTR_CATEGORY_CODES])).values())
        self.removed_incomplete: tuple[str, ...] = self._remove_incomplete()
        self._layout = self._stored_layout()

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
        """Close the file (committed traces stay; an uncommitted one is redone on resume)."""
        self.close()

    def close(self) -> None:
        """Flush and close the file; idempotent."""
        if self._file is not None:
            try:
                self._file.flush()
            finally:
                self._file.close()
                self._file = None

    def flush(self) -> None:
        """Flush HDF5's buffers to the OS (and fsync when the writer was opened with fsync)."""
        file = self._open_file()
        file.flush()
        if self._fsync:
            os.fsync(file.id.get_vfd_handle())

    # -- queries ---------------------------------------------------------------------------------
    def has_complete(self, trace_id: str) -> bool:
        """Whether `trace_id` is stored and committed (resume skips these)."""
        self._open_file()
        name = schema.escape_trace_id(trace_id)
        return name in self._traces and _is_complete(self._traces[name])

    def complete_ids(self) -> list[str]:
        """Ids of every committed trace, in write order."""
        self._open_file()
        return [_trace_id(self._traces[name], name) for name in self._traces
                if _is_complete(self._traces[name])]

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
        """Write one trace and commit it (flushed, `complete=True`), or skip it if already complete.

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
        """
        self._open_file()
        name = schema.escape_trace_id(trace_id)
        if trace_id in self._seen:
            raise DuplicateTraceError(
                f"trace id {trace_id!r} was already written to {self.path} in this run; trace ids "
                f"must be unique (check the input for a repeated id)"
            )
        if name in self._traces:
            if _is_complete(self._traces[name]):
                self._seen.add(trace_id)
                return False
            self._delete(name)
        prepared = self._prepare_trace(
            trace_id, tokens=tokens, category=category, positions=positions, spans=spans,
            sites=sites, arrays=arrays, text=text, source=source, attrs=attrs,
        )
        group_attrs, core, text_items, datasets = prepared
        self._check_layout(trace_id, datasets)
        self._reserve(sum(a.nbytes for a in core.values()) + sum(d.data.nbytes for d in datasets))
        try:
            group = self._traces.create_group(name)
            group.attrs[schema.ATTR_COMPLETE] = np.bool_(False)
            for key, value in group_attrs.items():
                group.attrs[key] = value
            for key, array in core.items():
                group.create_dataset(key, data=array)
            if text_items:
                text_group = group.create_group(schema.TEXT_GROUP)
                for key, value in text_items.items():
                    text_group.create_dataset(key, data=value, dtype=_h5.STRING_DTYPE)
            for item in datasets:
                self._create_dataset(group, item.name, item)
            self.flush()
            group.attrs.modify(schema.ATTR_COMPLETE, np.bool_(True))
            self.flush()
            self._trim()
        except OSError as exc:
            self._discard(name)
            raise CacheError(
                f"writing trace {trace_id!r} to {self.path} failed: {exc}; it was not marked "
                f"complete, so resuming (mode='append') redoes it"
            ) from exc
        except BaseException:
            self._discard(name)
            raise
        self._seen.add(trace_id)
        if self._layout is None:
            self._layout = _site_layout(datasets)
        return True

    def add_to_trace(
        self,
        trace_id: str,
        arrays: Mapping[str, np.ndarray | SiteArray],
        *,
        attrs: Mapping[str, str | int | float | bool] | None = None,
    ) -> None:
        """Add (or replace) per-trace arrays and attrs of a committed trace, e.g. an L̂ curve.

        Each array is written under a temporary name, then swapped in (delete old, rename new),
        then flushed: a crash leaves either the old or the new array (plus, at worst, a hidden
        `.tmp.` dataset that readers skip and the next call removes).

        Args:
            trace_id: A complete trace of this file.
            arrays: Name -> array (or `SiteArray(bits, dtype="bfloat16")`), stored as given.
            attrs: Small attributes to set on the trace (str / int / float / bool).

        Raises:
            TraceNotFoundError: No complete trace `trace_id`.
            CacheInputError: A reserved or site name, or an array that can't be stored.
        """
        self._open_file()
        name = schema.escape_trace_id(trace_id)
        if name not in self._traces or not _is_complete(self._traces[name]):
            raise TraceNotFoundError(
                f"no complete trace {trace_id!r} in {self.path}; write it with write_trace first"
            )
        group = self._traces[name]
        prepared = [_prepare_array(key, value, kind=schema.KIND_ARRAY, n_rows=None)
                    for key, value in arrays.items()]
        for item in prepared:
            existing = group.get(item.name)
            if isinstance(existing, h5py.Dataset) and (
                    _h5.as_str(existing.attrs.get(schema.ATTR_KIND, "")) == schema.KIND_SITE):
                raise CacheInputError(
                    f"{item.name!r} is a site of trace {trace_id!r}; add_to_trace adds metric "
                    f"arrays and can't replace captured sites; choose another name"
                )
        clean_attrs = _check_attrs(attrs)
        self._reserve(sum(item.data.nbytes for item in prepared))
        for item in prepared:
            tmp = schema.TMP_PREFIX + item.name
            if tmp in group:
                del group[tmp]
            self._create_dataset(group, tmp, item)
            if item.name in group:
                del group[item.name]
            group.move(tmp, item.name)
        for key, value in clean_attrs.items():
            group.attrs[key] = value
        self.flush()
        self._trim()

    # -- internals -------------------------------------------------------------------------------
    def _reserve(self, n_bytes: int) -> None:
        """Extend the file with zeros past everything this write can allocate, before writing.

        HDF5 may write the superblock's end-of-allocation before metadata placed at the end of the
        file; a writer killed in between leaves a file shorter than its superblock says, which
        HDF5 then refuses to open ("truncated file"), losing the committed traces with it. With
        the file already that long (sparse zeros), a kill leaves an openable file; `_trim` gives
        the space back once the trace is committed. Best effort: without it the write proceeds.
        """
        file = self._open_file()
        target = file.id.get_filesize() + int(n_bytes * 1.25) + _RESERVE_SLACK
        try:
            if os.path.getsize(self.path) < target:
                os.truncate(self.path, target)
        except OSError:
            pass

    def _trim(self) -> None:
        """Give back the zeros `_reserve` added (the file ends at HDF5's end of allocation)."""
        try:
            end = self._open_file().id.get_filesize()
            if os.path.getsize(self.path) > end:
                os.truncate(self.path, end)
        except OSError:
            pass

    def _open_file(self) -> h5py.File:
        if self._file is None:
            raise CacheError(f"the writer of {self.path} is closed; open it again with open_writer")
        return self._file

    def _create_dataset(self, group: h5py.Group, name: str, item: _Prepared) -> None:
        options: dict[str, Any] = {"chunks": item.chunks}
        if self._compression == "gzip":
            options.update(compression="gzip", compression_opts=schema.GZIP_LEVEL, shuffle=True,
                           chunks=item.chunks or True)
        dataset = group.create_dataset(name, data=item.data, **options)
        for key, value in item.attrs.items():
            dataset.attrs[key] = value

    def _delete(self, name: str) -> None:
        try:
            del self._traces[name]
        except (KeyError, OSError, RuntimeError) as exc:
            raise _h5.corrupt_error(self.path, exc) from None

    def _discard(self, name: str) -> None:
        """Best-effort removal of a half-written trace after an error (resume redoes it anyway)."""
        try:
            if name in self._traces:
                del self._traces[name]
            self._open_file().flush()
        except Exception:
            pass

    def _remove_incomplete(self) -> tuple[str, ...]:
        removed = []
        for name in list(self._traces):
            try:
                group = self._traces.get(name)
            except (OSError, KeyError, RuntimeError, ValueError):  # a link to a half-written group
                group = None
            if group is not None and _is_complete(group):
                continue
            removed.append(_trace_id(group, name))
            self._delete(name)
        if removed:
            self.flush()
        return tuple(removed)

    def _stored_layout(self) -> dict[str, tuple[str, tuple[int, ...], tuple[int, ...]]] | None:
        """Sites of the first stored trace: name -> (dtype, row shape, layers); None if empty."""
        for name in self._traces:
            return _group_layout(self._traces[name])
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

    def _prepare_trace(
        self,
        trace_id: str,
        *,
        tokens: np.ndarray,
        category: np.ndarray,
        positions: np.ndarray | None,
        spans: Mapping[str, tuple[int, int]] | None,
        sites: Mapping[str, np.ndarray | SiteArray] | None,
        arrays: Mapping[str, np.ndarray | SiteArray] | None,
        text: Mapping[str, str] | None,
        source: str,
        attrs: Mapping[str, Any] | None,
    ) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, str], list[_Prepared]]:
        """Validate everything before touching the file; returns what `write_trace` stores."""
        where = f"trace {trace_id!r}"
        token_ids = _int_vector(tokens, "tokens", where)
        n_tokens = int(token_ids.shape[0])
        codes = _int_vector(category, "category", where, lo=0, hi=255)
        if codes.shape[0] != n_tokens:
            raise CacheInputError(f"{where}: category has {codes.shape[0]} entries, tokens "
                                  f"{n_tokens}; give one code per token")
        known = self._codes
        unknown = sorted(set(np.unique(codes).tolist()) - known)
        if unknown:
            raise CacheInputError(f"{where}: category codes {unknown} are not in the cache's "
                                  f"category_codes {sorted(known)}")
        if positions is None:
            rows = np.arange(n_tokens, dtype=np.int32)
        else:
            rows = _int_vector(positions, "positions", where, lo=0, hi=max(n_tokens - 1, 0))
            if rows.size and (n_tokens == 0 or np.any(np.diff(rows.astype(np.int64)) <= 0)):
                raise CacheInputError(f"{where}: positions must be strictly increasing token "
                                      f"indices in [0, {n_tokens}), got {rows[:8].tolist()}...")
        n_sel = int(rows.shape[0])
        span_dict = _check_spans(spans or {}, n_tokens, where)
        if not isinstance(source, str):
            raise CacheInputError(f"{where}: source must be a string, got {type(source).__name__}")
        text_items = {}
        for key, value in (text or {}).items():
            schema.validate_dataset_name(key, what="text")
            if not isinstance(value, str):
                raise CacheInputError(f"{where}: text[{key!r}] must be str, "
                                      f"got {type(value).__name__}")
            text_items[key] = value
        group_attrs = {
            schema.ATTR_TRACE_ID: trace_id,
            schema.ATTR_N_TOKENS: np.int64(n_tokens),
            schema.ATTR_SPANS: json.dumps(span_dict),
            schema.ATTR_SOURCE: source,
            **_check_attrs(attrs),
        }
        datasets = [_prepare_array(key, value, kind=schema.KIND_SITE, n_rows=n_sel,
                                   where=where)
                    for key, value in (sites or {}).items()]
        datasets += [_prepare_array(key, value, kind=schema.KIND_ARRAY, n_rows=None,
                                    where=where)
                     for key, value in (arrays or {}).items()]
        names = [d.name for d in datasets]
        if len(set(names)) != len(names):
            raise CacheInputError(f"{where}: a name is used both as a site and an array: "
                                  f"{sorted({n for n in names if names.count(n) > 1})}")
        core = {schema.TOKENS: token_ids, schema.CATEGORY: codes.astype(np.uint8),
                schema.POSITIONS: rows}
        return group_attrs, core, text_items, datasets

