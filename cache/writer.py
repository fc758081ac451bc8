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

import datetime as _dt
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import h5py
import numpy as np

from cache import _h5, schema
from cache.errors import (
    CacheError,
    CacheInputError,
    CacheLockedError,
    CacheMismatchError,
    DuplicateTraceError,
    TraceNotFoundError,
)

__all__ = ["CacheWriter", "SiteArray", "WriteMode", "open_writer"]

WriteMode = Literal["append", "create", "overwrite"]
_MODES = ("append", "create", "overwrite")
_COMPRESSIONS = (None, "gzip")
_INT32 = np.iinfo(np.int32)


@dataclass(frozen=True)
class SiteArray:
    """An array plus how to label it on disk (needed for bfloat16 bits and explicit layers).

    Attributes:
        data: The numpy array, first axis = selected tokens for sites, e.g. [n_sel, n_layers, d].
            For bfloat16 give the raw bits as uint16: `t.view(torch.int16).numpy().view(np.uint16)`.
        dtype: "bfloat16" for uint16 bits; None (or the array's own dtype name) otherwise.
        layers: Layer index of each entry of axis 1; default `range(n_layers)` for 3-D sites and
            `[]` for sites without a layer axis.
    """

    data: np.ndarray
    dtype: str | None = None
    layers: Sequence[int] | None = None


@dataclass(frozen=True)
class _Prepared:
    """A validated array ready for `create_dataset`."""

    name: str
    data: np.ndarray
    attrs: dict[str, Any]
    chunks: tuple[int, ...] | None
    layout: tuple[str, tuple[int, ...], tuple[int, ...]]  # (dtype, row shape, layers)


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

    # -- internals -------------------------------------------------------------------------------
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


# -- file creation and metadata ------------------------------------------------------------------
def _create_file(path: Path, meta: dict[str, Any], *, replace: bool, fsync: bool) -> None:
    """Write the root metadata to a temporary file and move it into place (never half-made)."""
    if replace and path.exists():
        try:  # never pull the file from under a live writer or reader
            _h5.open_file(path, "r+", writing=True).close()
        except CacheLockedError:
            raise
        except CacheError:
            pass
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with h5py.File(tmp, "w") as f:
            _write_root(f, meta)
            f.flush()
            if fsync:
                os.fsync(f.id.get_vfd_handle())
        if replace:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # atomic and never replaces: a concurrent creator wins
            except FileExistsError:
                pass
            except OSError:  # no hard links on this filesystem
                if not path.exists():
                    os.replace(tmp, path)
        if fsync:
            _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _write_root(f: h5py.File, meta: dict[str, Any]) -> None:
    attrs = f.attrs
    attrs[schema.ATTR_SCHEMA_VERSION] = np.int64(schema.SCHEMA_VERSION)
    attrs[schema.ATTR_TOOLKIT_VERSION] = meta[schema.ATTR_TOOLKIT_VERSION]
    attrs[schema.ATTR_CREATED] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    for key in schema.STRING_ROOT_ATTRS:
        attrs[key] = meta[key]
    for key in sorted(schema.JSON_ROOT_ATTRS):
        attrs[key] = json.dumps(meta[key], sort_keys=True, ensure_ascii=False)
    f.create_group(schema.META_GROUP)
    f.create_dataset(schema.CONFIG_DATASET, dtype=_h5.STRING_DTYPE,
                     data=json.dumps(meta["config"], sort_keys=True, ensure_ascii=False))
    f.create_dataset(schema.INFO_DATASET, dtype=_h5.STRING_DTYPE,
                     data=json.dumps(meta["info"], sort_keys=True, ensure_ascii=False))
    f.create_group(schema.TRACES_GROUP, track_order=True)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems can't fsync a directory; the file itself is synced
        pass
    finally:
        os.close(fd)


def _normalize_metadata(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """Validate `metadata` and return it JSON-normalised, with the library versions added."""
    if not isinstance(metadata, Mapping):
        raise CacheInputError(f"metadata must be a dict, got {type(metadata).__name__}")
    unknown = sorted(set(metadata) - set(schema.METADATA_KEYS))
    missing = [key for key in schema.IDENTITY_KEYS if key not in metadata]
    if unknown or missing:
        raise CacheInputError(
            f"cache metadata has unknown keys {unknown} / lacks required keys {missing}; "
            f"required: {list(schema.IDENTITY_KEYS)}, optional: {list(schema.INFORMATIONAL_KEYS)}"
        )
    meta: dict[str, Any] = {}
    for key in schema.STRING_ROOT_ATTRS:
        if not isinstance(metadata[key], str):
            raise CacheInputError(f"metadata[{key!r}] must be a string, got {metadata[key]!r}")
        meta[key] = metadata[key]
    for key in (schema.ATTR_ARCHITECTURE, schema.ATTR_CATEGORY_CODES, "config"):
        meta[key] = _json_dict(metadata[key], key)
    codes = meta[schema.ATTR_CATEGORY_CODES]
    if not all(isinstance(c, int) and 0 <= c <= 255 for c in codes.values()):
        raise CacheInputError(f"metadata['category_codes'] must map names to ints in [0, 255], "
                              f"got {codes}")
    versions = _json_dict(metadata.get(schema.ATTR_VERSIONS, {}), schema.ATTR_VERSIONS)
    versions.setdefault("h5py", h5py.version.version)
    versions.setdefault("hdf5", h5py.version.hdf5_version)
    versions.setdefault("numpy", np.__version__)
    meta[schema.ATTR_VERSIONS] = versions
    toolkit = metadata.get(schema.ATTR_TOOLKIT_VERSION, "unknown")
    if not isinstance(toolkit, str):
        raise CacheInputError(f"metadata['toolkit_version'] must be a string, got {toolkit!r}")
    meta[schema.ATTR_TOOLKIT_VERSION] = toolkit
    meta["info"] = _json_dict(metadata.get("info", {}), "info")
    return meta


def _json_dict(value: Any, key: str) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise CacheInputError(f"metadata[{key!r}] must be a dict, got {type(value).__name__}")
    try:
        return json.loads(json.dumps(value, sort_keys=True))
    except (TypeError, ValueError) as exc:
        raise CacheInputError(f"metadata[{key!r}] is not JSON-serialisable: {exc}") from None


def _check_identity(path: Path, stored: dict[str, Any], given: dict[str, Any]) -> None:
    diffs: list[tuple[str, Any, Any]] = []
    for key in schema.IDENTITY_KEYS:
        diffs += _diff(stored[key], given[key], key)
    if diffs:
        fields = sorted({d[0].split(".")[0] for d in diffs})
        details = "; ".join(f"{where}: stored {_short(a)}, given {_short(b)}"
                            for where, a, b in diffs[:6])
        raise CacheMismatchError(
            f"cannot append to {path}: its {', '.join(fields)} differ(s) from this run's ("
            f"{details}). One cache holds one model, tokenizer and run config: write to another "
            f"file (--out other.h5), or rerun with the same model and settings"
        )


_ABSENT = object()


def _diff(stored: Any, given: Any, where: str) -> list[tuple[str, Any, Any]]:
    if isinstance(stored, dict) and isinstance(given, dict):
        out = []
        for key in sorted(set(stored) | set(given), key=str):
            out += _diff(stored.get(key, _ABSENT), given.get(key, _ABSENT), f"{where}.{key}")
        return out
    return [] if stored == given else [(where, stored, given)]


def _short(value: Any, limit: int = 60) -> str:
    text = "<absent>" if value is _ABSENT else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 1] + "…"


# -- per-trace validation ------------------------------------------------------------------------
def _is_complete(group: Any) -> bool:
    """Whether `group` is a trace group with `complete=True`; False if unreadable."""
    try:
        return isinstance(group, h5py.Group) and bool(group.attrs.get(schema.ATTR_COMPLETE, False))
    except (OSError, KeyError, RuntimeError, ValueError):
        return False


def _trace_id(group: Any, name: str) -> str:
    try:
        return _h5.as_str(group.attrs[schema.ATTR_TRACE_ID])
    except Exception:
        return schema.unescape_trace_id(name)


def _group_layout(group: h5py.Group) -> dict[str, tuple[str, tuple[int, ...], tuple[int, ...]]]:
    out = {}
    for key, obj in group.items():
        if isinstance(obj, h5py.Dataset) and (
                _h5.as_str(obj.attrs.get(schema.ATTR_KIND, "")) == schema.KIND_SITE):
            layers = tuple(json.loads(_h5.as_str(obj.attrs[schema.ATTR_LAYERS])))
            out[key] = (_h5.as_str(obj.attrs[schema.ATTR_DTYPE]), tuple(obj.shape[1:]), layers)
    return out


def _site_layout(
    datasets: Iterable[_Prepared],
) -> dict[str, tuple[str, tuple[int, ...], tuple[int, ...]]]:
    return {d.name: d.layout for d in datasets if d.attrs[schema.ATTR_KIND] == schema.KIND_SITE}


def _describe_layout(layout: tuple[str, tuple[int, ...], tuple[int, ...]] | None) -> str:
    if layout is None:
        return "absent"
    dtype, row_shape, layers = layout
    return f"{dtype} rows {list(row_shape)} layers {_short(list(layers), 30)}"


def _int_vector(value: Any, what: str, where: str, *, lo: int = _INT32.min,
                hi: int = _INT32.max) -> np.ndarray:
    array = np.asarray(value)
    if array.ndim != 1 or not (array.dtype.kind in "iu" or array.size == 0):
        raise CacheInputError(f"{where}: {what} must be a 1-D integer array, got dtype "
                              f"{array.dtype} shape {array.shape}")
    if array.size and (int(array.min()) < lo or int(array.max()) > hi):
        raise CacheInputError(f"{where}: {what} values must lie in [{lo}, {hi}], got "
                              f"[{int(array.min())}, {int(array.max())}]")
    return array.astype(np.int32)


def _check_spans(spans: Mapping[str, Any], n_tokens: int, where: str) -> dict[str, list[int]]:
    out = {}
    for name, span in spans.items():
        try:
            start, end = (int(x) for x in span)
        except (TypeError, ValueError):
            raise CacheInputError(f"{where}: span {name!r} must be (start, end), "
                                  f"got {span!r}") from None
        if not (isinstance(name, str) and 0 <= start <= end <= n_tokens):
            raise CacheInputError(f"{where}: span {name!r} = ({start}, {end}) must satisfy "
                                  f"0 <= start <= end <= n_tokens = {n_tokens}")
        out[name] = [start, end]
    return out


def _check_attrs(attrs: Mapping[str, Any] | None) -> dict[str, Any]:
    out = {}
    for key, value in (attrs or {}).items():
        if not isinstance(key, str) or not key or key in schema.TRACE_ATTRS:
            raise CacheInputError(f"attribute name {key!r} is empty or reserved "
                                  f"({sorted(schema.TRACE_ATTRS)})")
        if isinstance(value, np.generic):
            value = value.item()
        if not isinstance(value, (str, int, float, bool)):
            raise CacheInputError(
                f"attribute {key!r} must be str/int/float/bool, got {type(value).__name__}; "
                f"store arrays with arrays= and long text with text="
            )
        if isinstance(value, str) and len(value.encode("utf-8")) > schema.MAX_ATTR_BYTES:
            raise CacheInputError(f"attribute {key!r} is over {schema.MAX_ATTR_BYTES} bytes; "
                                  f"store it with text= instead")
        out[key] = value
    return out


def _prepare_array(
    name: str,
    value: np.ndarray | SiteArray,
    *,
    kind: str,
    n_rows: int | None,
    where: str = "",
) -> _Prepared:
    """Validate one site / metric array and compute its dtype label, layers and chunks."""
    schema.validate_dataset_name(name, what=kind)
    prefix = f"{where}: {kind} {name!r}" if where else f"{kind} {name!r}"
    wrapper = value if isinstance(value, SiteArray) else SiteArray(value)
    data = wrapper.data
    if not isinstance(data, np.ndarray):
        raise CacheInputError(
            f"{prefix} must be a numpy array, got {type(data).__name__}; convert torch tensors "
            f"with t.cpu().numpy(), bfloat16 ones with t.view(torch.int16).numpy().view(np.uint16) "
            f"in SiteArray(bits, dtype='bfloat16')"
        )
    if wrapper.dtype == schema.BFLOAT16:
        if data.dtype not in (np.uint16, np.int16):
            raise CacheInputError(f"{prefix}: dtype='bfloat16' needs the raw bits as a uint16 "
                                  f"array, got {data.dtype}")
        data = data.view(np.uint16)
        label = schema.BFLOAT16
    elif wrapper.dtype is not None and wrapper.dtype != data.dtype.name:
        raise CacheInputError(f"{prefix}: dtype={wrapper.dtype!r} but the array is {data.dtype}; "
                              f"give dtype=None, or 'bfloat16' with uint16 bits")
    else:
        label = data.dtype.name
    if kind == schema.KIND_SITE:
        if label not in schema.SITE_DTYPES:
            hint = (" (bfloat16 bits? pass SiteArray(bits, dtype='bfloat16'))"
                    if data.dtype == np.uint16 else "")
            raise CacheInputError(f"{prefix} has dtype {label}; sites are "
                                  f"{list(schema.SITE_DTYPES)}{hint}")
        if data.ndim == 0 or data.shape[0] != n_rows:
            raise CacheInputError(f"{prefix} has shape {data.shape}; its first axis must be the "
                                  f"{n_rows} selected positions")
        chunks: tuple[int, ...] | None = schema.site_chunks(data.shape)
    else:
        if data.dtype.kind not in "biuf":
            raise CacheInputError(f"{prefix} has dtype {data.dtype}; arrays must be numeric")
        chunks = None
    if wrapper.layers is not None:
        layers = tuple(int(x) for x in wrapper.layers)
        if data.ndim < 2 or len(layers) != data.shape[1]:
            raise CacheInputError(f"{prefix}: {len(layers)} layers given for shape {data.shape}; "
                                  f"give one layer index per entry of axis 1")
    else:
        layers = tuple(range(data.shape[1])) if data.ndim >= 3 else ()
    attrs: dict[str, Any] = {schema.ATTR_KIND: kind, schema.ATTR_DTYPE: label}
    if kind == schema.KIND_SITE:
        attrs[schema.ATTR_SITE] = name
        attrs[schema.ATTR_LAYERS] = json.dumps(list(layers))
    elif wrapper.layers is not None:
        attrs[schema.ATTR_LAYERS] = json.dumps(list(layers))
    return _Prepared(name=name, data=data, attrs=attrs, chunks=chunks,
                     layout=(label, tuple(data.shape[1:]), layers))
