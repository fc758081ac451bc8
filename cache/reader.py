"""Read caches lazily, without torch: `open_cache(path)` and `summarize(path)`.

    with open_cache("run.h5") as cache:
        tr = cache.trace("gsm8k/12")
        layer3 = tr["resid_post"][:, 3]                   # [n_sel, d] float32 (bf16 decoded)
        refl = tr["resid_post"][tr.select_rows(category="reflection")]   # [n_refl, L, d]

Only committed traces (`complete=True`) are listed unless `include_incomplete=True`. Slices read
only what they touch (chunked (512, 1, d)); an index array is served by reading its covering range
and indexing in numpy, which is 10x faster than HDF5's scattered reads (docs/tooling.md#chunking).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import h5py
import numpy as np

from cache import _h5, _store, schema
from cache.bf16 import bf16_bits_to_float32
from cache.errors import CacheError, TraceNotFoundError

__all__ = ["CacheReader", "CachedTrace", "LazyArray", "Positions", "SiteInfo", "open_cache",
           "parse_axes", "summarize", "trajectory_index"]

AxisKind = str
"""What one axis of a stored array runs over: "sequence" (every token, [n_tokens]), "trajectory"
(trajectory token i = position `spans["trajectory"][0] + i`, [T]), "prefix" (index t = after t
trajectory tokens, [T+1]), "rows" (the captured positions of a site), or "" (not tokens: layers,
heads, chunks, ...)."""
SEQUENCE, TRAJECTORY, PREFIX, ROWS = "sequence", "trajectory", "prefix", "rows"
_AXIS_WORDS = {"n_tokens": SEQUENCE, "T": TRAJECTORY, "T+1": PREFIX}


def parse_axes(axes: str) -> tuple[AxisKind, ...]:
    """The axis kinds of a declared shape such as "[L, T]" -> ("", "trajectory")."""
    words = [w.strip() for w in axes.strip().strip("[]").split(",")]
    return tuple(_AXIS_WORDS.get(w, "") for w in words if w)


def trajectory_index(kind: AxisKind, positions: np.ndarray,
                     spans: Mapping[str, tuple[int, int]], where: str) -> np.ndarray:
    """Indices on a [T] ("trajectory") or [T+1] ("prefix": the value after the token) axis of the
    tokens at sequence `positions`; the one rule, for lazy and loaded arrays alike.

    Raises:
        CacheError: A position outside the trajectory that `where` covers.
    """
    start, end = spans.get(TRAJECTORY, (0, 0))
    outside = (positions < start) | (positions >= end)
    if outside.any():
        raise CacheError(
            f"positions {positions[outside][:5].tolist()} are outside the trajectory "
            f"[{start}, {end}) that {where} covers; select with span='trajectory'")
    return positions - start + (1 if kind == PREFIX else 0)


class Positions(np.ndarray):
    """Token positions in the whole sequence (what `CachedTrace.select` returns).

    Indexing a `LazyArray` with them reads the values OF THOSE TOKENS whatever the array's token
    axis: every token ([n_tokens]), trajectory tokens ([T]: position − trajectory start), prefixes
    ([T+1]: the value after the token) or a site's captured rows; a position the array does not
    cover is an error, never a silent read of other tokens. Arithmetic on positions gives plain
    integers (they no longer name these tokens); slicing keeps them positions.
    """

    def __new__(cls, values: Any) -> Positions:
        """View `values` as int64 positions."""
        return np.asarray(values, dtype=np.int64).view(cls)

    def __array_wrap__(self, array: Any, context: Any = None, return_scalar: bool = False) -> Any:
        """Results of ufuncs (arithmetic, comparisons) are plain arrays."""
        plain = np.asarray(array).view(np.ndarray)
        return plain[()] if return_scalar else plain


@dataclass(frozen=True)
class SiteInfo:
    """What a site dataset holds in every trace.

    Attributes:
        name: The dataset name, e.g. "resid_post".
        dtype: Logical dtype ("float16", "float32", "bfloat16", ...).
        row_shape: Shape after the token axis, e.g. (n_layers, d_model).
        layers: Layer index of each entry of axis 1 (empty without a layer axis).
    """

    name: str
    dtype: str
    row_shape: tuple[int, ...]
    layers: tuple[int, ...]


def open_cache(path: str | os.PathLike[str], *,
               axes: Mapping[str, str] | None = None) -> CacheReader:
    """Open a cache read-only (no torch needed); use as a context manager.

    Args:
        path: A file written by `cache.open_writer`.
        axes: Declared shape of each stored array by name, e.g. {"upd_m7": "[L, T]"} (the
            project's array registry: `probes.open_cache` passes it); an array not named here
            has its token axis inferred from its shape (`CachedTrace.token_axes`).

    Returns:
        The `CacheReader`.

    Raises:
        CacheLockedError: A writer has the file open.
        CacheCorruptError: Truncated or unreadable file.
        NotACacheError: Not HDF5, or HDF5 without this toolkit's schema.
        CacheVersionError: A schema version this toolkit doesn't read.
        CacheError: The path is missing or a folder.
    """
    path = Path(path)
    pending: list[str] = []
    if not path.is_dir() and _store.is_segmented(path):
        file, pending = _store.open_index(path, rdcc_nbytes=schema.READER_CHUNK_CACHE_BYTES)
    else:
        _h5.check_file_path(path, creating=False)
        file = _h5.open_file(path, "r", writing=False,
                             rdcc_nbytes=schema.READER_CHUNK_CACHE_BYTES)
        try:
            is_index = _store.SEGMENTS_DATASET in file
        except (OSError, RuntimeError, KeyError) as exc:  # a truncated single file
            file.close()
            raise _h5.corrupt_error(path, exc) from None
        if is_index:  # an index copied away from its segments (or just written beside them)
            try:
                folder = _store.moved_folder(file, path)
            finally:
                file.close()
            file, pending = _store.open_index(path, folder,
                                              rdcc_nbytes=schema.READER_CHUNK_CACHE_BYTES)
    try:
        return CacheReader(file, path, pending=pending, axes=axes)
    except BaseException:
        file.close()
        raise


class CacheReader:
    """A read-only view of one cache file; create it with `open_cache`.

    Attributes:
        path: The file.
        metadata: Root metadata: schema_version, toolkit_version, created, model, architecture,
            model_dtype, weight_convention, tokenizer_fingerprint, lexicon_fingerprint,
            category_codes, versions, config, info.
    """

    def __init__(self, file: h5py.File, path: Path, *, pending: Sequence[str] = (),
                 axes: Mapping[str, str] | None = None) -> None:
        """Use `open_cache`; this validates the root of an already open file."""
        self.path = path
        self.axes: dict[str, tuple[AxisKind, ...]] = {
            name: parse_axes(shape) for name, shape in (axes or {}).items()}
        self._pending = list(pending)
        self._file: h5py.File | None = file
        self.metadata: dict[str, Any] = _h5.read_root_metadata(file, path)
        try:
            self._traces = file[schema.TRACES_GROUP]
            self._names = list(self._traces)
        except (KeyError, OSError) as exc:
            raise _h5.corrupt_error(path, exc) from None
        self._complete: dict[str, bool] | None = None
        self._ids: dict[str, str] = {}

    # -- context manager -------------------------------------------------------------------------
    def __enter__(self) -> CacheReader:
        """Return self."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the file."""
        self.close()

    def close(self) -> None:
        """Close the file; idempotent. Arrays already read stay valid; lazy views do not."""
        if self._file is not None:
            self._file.close()
            self._file = None

    # -- metadata --------------------------------------------------------------------------------
    @property
    def architecture(self) -> dict[str, Any]:
        """The model's `ArchInfo.to_dict()` as stored."""
        return self.metadata[schema.ATTR_ARCHITECTURE]

    @property
    def config(self) -> dict[str, Any]:
        """The run config (`/meta/config`)."""
        return self.metadata["config"]

    @property
    def category_codes(self) -> dict[str, int]:
        """Category name -> uint8 code used by every trace's `category` dataset."""
        return self.metadata[schema.ATTR_CATEGORY_CODES]

    @property
    def sites(self) -> dict[str, SiteInfo]:
        """Sites stored in every trace (read from the first complete one); {} if none."""
        ids = self.trace_ids()
        return self.trace(ids[0]).sites if ids else {}

    # -- traces ----------------------------------------------------------------------------------
    def trace_ids(self, *, include_incomplete: bool = False) -> list[str]:
        """Trace ids in write order: committed ones, or every group with `include_incomplete`."""
        complete = self._completeness()
        return [self._ids[name] for name in self._names if include_incomplete or complete[name]]

    def incomplete_ids(self) -> list[str]:
        """Ids of trace groups without `complete=True` (a writer was interrupted)."""
        complete = self._completeness()
        return [self._ids[name] for name in self._names if not complete[name]] + self._pending

    def __len__(self) -> int:
        """Number of complete traces."""
        return len(self.trace_ids())

    def __contains__(self, trace_id: object) -> bool:
        """Whether `trace_id` is a complete trace."""
        if not isinstance(trace_id, str) or not trace_id:
            return False
        name = schema.escape_trace_id(trace_id)
        return bool(self._completeness().get(name, False))

    def __iter__(self) -> Iterator[CachedTrace]:
        """The complete traces, in write order."""
        for trace_id in self.trace_ids():
            yield self.trace(trace_id)

    def trace(self, trace_id: str, *, include_incomplete: bool = False) -> CachedTrace:
        """One trace, lazily (nothing large is read until sliced).

        Args:
            trace_id: The id as written.
            include_incomplete: Also open a trace whose writer was interrupted (its data may be
                partial).

        Raises:
            TraceNotFoundError: No such (complete) trace.
        """
        self._require_open()
        name = schema.escape_trace_id(trace_id)
        complete = self._completeness()
        if name not in complete or not (complete[name] or include_incomplete):
            shown = self.trace_ids()[:5]
            state = "only incompletely (interrupted writer)" if name in complete else "no trace"
            raise TraceNotFoundError(
                f"{self.path} holds {state} {trace_id!r}; it has {len(self)} complete traces, "
                f"e.g. {shown}; list them with reader.trace_ids()"
            )
        try:
            return CachedTrace(self._traces[name], self, complete=complete[name])
        except (OSError, KeyError, ValueError) as exc:
            raise _h5.corrupt_error(self.path, exc) from None

    # -- internals -------------------------------------------------------------------------------
    def _require_open(self) -> h5py.File:
        if self._file is None:
            raise CacheError(f"the cache {self.path} is closed; read it inside "
                             f"`with open_cache(...)`")
        return self._file

    def _completeness(self) -> dict[str, bool]:
        self._require_open()
        if self._complete is None:
            self._complete = {}
            for name in self._names:
                group = None
                try:
                    group = self._traces[name]
                    done = bool(group.attrs.get(schema.ATTR_COMPLETE, False))
                except (OSError, KeyError, RuntimeError, ValueError):
                    done = False
                self._complete[name] = done
                try:
                    if group is None:
                        raise KeyError(name)
                    self._ids[name] = _h5.as_str(group.attrs[schema.ATTR_TRACE_ID])
                except Exception:
                    self._ids[name] = schema.unescape_trace_id(name)
        return self._complete


class CachedTrace:
    """One trace of a cache: small data eagerly, sites and arrays lazily via `trace[name]`.

    Attributes:
        id: The trace id.
        n_tokens: Number of tokens.
        spans: Half-open token ranges, e.g. {"prompt": (0, 12), "trajectory": (12, 300)}.
        source: Where the trace came from (e.g. "traces.jsonl:12").
        complete: Whether the writer committed it.
        attrs: Extra attributes the writer was given.
    """

    def __init__(self, group: h5py.Group, reader: CacheReader, *, complete: bool) -> None:
        """Use `CacheReader.trace`."""
        self._group = group
        self._reader = reader
        attrs = group.attrs
        self.complete = complete
        self.id = _h5.as_str(attrs[schema.ATTR_TRACE_ID])
        self.n_tokens = int(attrs[schema.ATTR_N_TOKENS])
        spans = json.loads(_h5.as_str(attrs[schema.ATTR_SPANS]))
        self.spans: dict[str, tuple[int, int]] = {
            k: (int(v[0]), int(v[1])) for k, v in spans.items()
        }
        self.source = _h5.as_str(attrs[schema.ATTR_SOURCE])
        self.attrs: dict[str, Any] = {
            k: (v.item() if isinstance(v, np.generic) else _maybe_str(v))
            for k, v in attrs.items() if k not in schema.TRACE_ATTRS
        }

    def __repr__(self) -> str:
        """Short description."""
        return f"CachedTrace({self.id!r}, n_tokens={self.n_tokens}, datasets={self.names()})"

    @property
    def tokens(self) -> np.ndarray:
        """int32 [n_tokens] token ids."""
        return self._read(schema.TOKENS)

    @property
    def category(self) -> np.ndarray:
        """uint8 [n_tokens] category codes (`CacheReader.category_codes`)."""
        return self._read(schema.CATEGORY)

    @property
    def positions(self) -> np.ndarray:
        """int32 [n_sel] token index of each site row."""
        return self._read(schema.POSITIONS)

    @property
    def text(self) -> dict[str, str]:
        """The stored strings, e.g. {"question": ..., "answer": ...}."""
        if schema.TEXT_GROUP not in self._group:
            return {}
        group = self._group[schema.TEXT_GROUP]
        return {key: _h5.as_str(group[key][()]) for key in group}

    def names(self) -> list[str]:
        """Names of the site and metric datasets of this trace."""
        return [key for key, obj in self._group.items()
                if isinstance(obj, h5py.Dataset) and key not in schema.RESERVED_NAMES
                and not key.startswith(".")]

    @property
    def sites(self) -> dict[str, SiteInfo]:
        """The captured sites of this trace."""
        out = {}
        for key in self.names():
            array = self[key]
            if array.kind == schema.KIND_SITE:
                out[key] = SiteInfo(key, array.dtype, array.shape[1:], array.layers)
        return out

    def __contains__(self, name: object) -> bool:
        """Whether the trace has a site or array called `name`."""
        return name in self.names()

    def __getitem__(self, name: str) -> LazyArray:
        """The site or metric dataset `name`, lazily; bf16 decodes to float32 when sliced."""
        return self.array(name)

    def array(self, name: str, *, raw: bool = False, at: Any = None) -> Any:
        """The dataset `name` (lazily), or with `at`, its values at those tokens (read now).

        Args:
            name: A site or array of this trace.
            raw: bfloat16 data come back as their uint16 bits.
            at: Token positions in the whole sequence (e.g. `select("reflection")`); the values
                of those tokens along the array's token axis (`token_axes`), other axes whole:
                `array("upd_m7", at=p)` is [L, len(p)], `array("lhat_delta", at=p)` is [len(p)].

        Raises:
            CacheError: No such dataset (the message lists the available names); with `at`, an
                array without a token axis, or a position the array does not cover.
        """
        self._reader._require_open()
        names = self.names()
        if name not in names:
            raise CacheError(
                f"trace {self.id!r} of {self._reader.path} has no dataset {name!r}; "
                f"it has {names}"
            )
        lazy = LazyArray(self._group[name], self._reader, raw=raw, trace=self)
        if at is None:
            return lazy
        kinds = lazy.token_axes
        axis = next((i for i, kind in enumerate(kinds) if kind), None)
        if axis is None:
            raise CacheError(f"{name} of trace {self.id!r} has no token axis (shape "
                             f"{lazy.shape}); index it directly")
        key: list[Any] = [slice(None)] * lazy.ndim
        key[axis] = Positions(at)
        return lazy[tuple(key)]

    def token_axes(self, name: str) -> tuple[AxisKind, ...]:
        """What each axis of `name` runs over (see `AxisKind`): declared (`open_cache(axes=)`),
        else "rows" for a site's first axis, else inferred from the shape as cache/SCHEMA.md lays
        arrays out: [n_tokens], [T], [T+1], [L, T], [C, L, T]."""
        return self.array(name).token_axes

    def select(self, category: str | Sequence[str], *, span: str | None = None) -> Positions:
        """Token positions whose category is `category` (or any of several), optionally in a span.

        Args:
            category: A name of `CacheReader.category_codes`, e.g. "reflection", or a list.
            span: Restrict to this span, e.g. "trajectory".

        Returns:
            `Positions` [k], sorted: index any array or site with them (`trace[name][p]`,
            `trace.array(name, at=p)`) and the values of exactly these tokens come back.
        """
        codes = self._reader.category_codes
        wanted = [category] if isinstance(category, str) else list(category)
        unknown = [c for c in wanted if c not in codes]
        if unknown:
            raise CacheError(f"unknown categories {unknown}; {self._reader.path} has "
                             f"{sorted(codes)}")
        mask = np.isin(self.category, [codes[c] for c in wanted])
        if span is not None:
            if span not in self.spans:
                raise CacheError(f"trace {self.id!r} has no span {span!r}; spans: "
                                 f"{sorted(self.spans)}")
            start, end = self.spans[span]
            mask[:start] = False
            mask[end:] = False
        return Positions(np.flatnonzero(mask))

    def select_rows(self, category: str | Sequence[str], *, span: str | None = None) -> np.ndarray:
        """Like `select`, but as row numbers of the sites (tokens not captured are dropped)."""
        return np.flatnonzero(np.isin(self.positions, np.asarray(self.select(category, span=span))))

    def _read(self, name: str) -> np.ndarray:
        self._reader._require_open()
        try:
            return self._group[name][()]
        except (OSError, KeyError) as exc:
            raise _h5.corrupt_error(self._reader.path, exc) from None


class LazyArray:
    """A dataset read on slicing: `arr[a:b, layer]`, `arr[index_array]`, `arr[...]`, `np.asarray`.

    Indexing: ints, slices (any step), index arrays, boolean masks and Ellipsis, as in numpy,
    except that ints are applied first, like h5py (so `a[0, :, [1, 2]]` has shape (L, 2)).
    bfloat16 data come back as float32 (exact) unless the view was made with `raw=True`.

    Attributes:
        name: Dataset name.
        kind: "site" or "array".
        dtype: Logical dtype ("bfloat16", "float16", ...).
        shape: Dataset shape.
        layers: Layer index of each entry of axis 1 (empty when not per-layer).
        raw: Whether bf16 bits are returned undecoded.
    """

    def __init__(self, dataset: h5py.Dataset, reader: CacheReader, *, raw: bool,
                 trace: CachedTrace | None = None) -> None:
        """Use `CachedTrace[name]` / `CachedTrace.array`."""
        self._ds = dataset
        self._reader = reader
        self._trace = trace
        self.raw = raw
        self.name = dataset.name.rsplit("/", 1)[-1]
        self.kind = _h5.as_str(dataset.attrs.get(schema.ATTR_KIND, schema.KIND_ARRAY))
        self.dtype = _h5.as_str(dataset.attrs.get(schema.ATTR_DTYPE, dataset.dtype.name))
        self.shape: tuple[int, ...] = tuple(dataset.shape)
        layers = dataset.attrs.get(schema.ATTR_LAYERS)
        self.layers: tuple[int, ...] = (
            tuple(json.loads(_h5.as_str(layers))) if layers is not None else ()
        )

    def __repr__(self) -> str:
        """Short description."""
        return f"LazyArray({self.name!r}, shape={self.shape}, dtype={self.dtype})"

    @property
    def ndim(self) -> int:
        """Number of axes."""
        return len(self.shape)

    def __len__(self) -> int:
        """Length of the first axis."""
        return self.shape[0]

    @property
    def token_axes(self) -> tuple[AxisKind, ...]:
        """What each axis runs over (`CachedTrace.token_axes`); () without a trace."""
        if self._trace is None:
            return ()
        declared = self._reader.axes.get(self.name)
        if declared is not None and len(declared) == self.ndim:
            return declared
        if self.kind == schema.KIND_SITE:
            return (ROWS,) + ("",) * (self.ndim - 1)
        return _infer_axes(self.shape, self._trace)

    def _translate(self, axis: int, positions: Positions) -> np.ndarray:
        """Indices along `axis` of the tokens at `positions` (see `Positions`)."""
        trace = self._trace
        kinds = self.token_axes
        kind = kinds[axis] if axis < len(kinds) else ""
        where = f"{self.name} of trace {trace.id!r}" if trace is not None else self.name
        p = np.asarray(positions).view(np.ndarray).astype(np.int64)
        if trace is None or not kind:
            raise CacheError(
                f"axis {axis} of {where} (shape {self.shape}) does not run over tokens, so token "
                f"positions cannot index it; put them at its token axis "
                f"(trace.array(name, at=positions) finds it)")
        if kind == SEQUENCE:
            return p
        if kind == ROWS:
            rows = np.asarray(trace.positions, dtype=np.int64)
            found = np.searchsorted(rows, p)
            ok = (found < len(rows)) & (rows[np.minimum(found, len(rows) - 1)] == p)
            if not ok.all():
                raise CacheError(f"positions {p[~ok][:5].tolist()} were not captured in {where} "
                                 f"(the cache stored other positions); select within them")
            return found
        return trajectory_index(kind, p, trace.spans, where)

    @property
    def chunks(self) -> tuple[int, ...] | None:
        """The HDF5 chunk shape (None when contiguous)."""
        return self._ds.chunks

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        """Read everything (numpy protocol)."""
        out = self[...]
        return out if dtype is None else out.astype(dtype)

    def __getitem__(self, key: Any) -> np.ndarray:
        """Read the selection (numpy semantics); see the class docstring. `Positions` (from
        `CachedTrace.select`) are translated to this array's token axis."""
        self._reader._require_open()
        items = key if isinstance(key, tuple) else (key,)
        if any(isinstance(it, Positions) for it in items):
            if any(it is Ellipsis for it in items):
                raise IndexError("token positions and '...' cannot be combined; give every axis")
            key = tuple(self._translate(axis, it) if isinstance(it, Positions) else it
                        for axis, it in enumerate(items))
        h5_key, post = _split_key(key, self.shape)
        try:
            data = self._ds[h5_key]
        except (OSError, RuntimeError) as exc:
            raise _h5.corrupt_error(self._reader.path, exc) from None
        if post is not None:
            data = data[post]
        data = np.asarray(data)
        if self.dtype == schema.BFLOAT16 and not self.raw:
            data = bf16_bits_to_float32(data)
        return data


def _infer_axes(shape: tuple[int, ...], trace: CachedTrace) -> tuple[AxisKind, ...]:
    """Token axes from the shape alone: the last axis is [n_tokens], [T] or [T+1] (in that order
    of preference), the others are not tokens."""
    if not shape:
        return ()
    start, end = trace.spans.get(TRAJECTORY, (0, 0))
    T, last = end - start, shape[-1]
    if last == trace.n_tokens:
        kind = SEQUENCE
    elif T and last == T:
        kind = TRAJECTORY
    elif T and last == T + 1:
        kind = PREFIX
    else:
        kind = ""
    if len(shape) == 1 or (kind and kind != SEQUENCE):
        return ("",) * (len(shape) - 1) + (kind,)
    return ("",) * len(shape)


def _split_key(key: Any, shape: tuple[int, ...]) -> tuple[tuple[Any, ...], tuple[Any, ...] | None]:
    """Split a numpy index into an h5py-friendly part (ints/slices) and a numpy post-index.

    Index arrays become the covering slice for h5py plus the shifted indices for numpy, so HDF5
    never does scattered point selections.
    """
    items = key if isinstance(key, tuple) else (key,)
    n_ellipsis = sum(1 for it in items if it is Ellipsis)
    if n_ellipsis > 1:
        raise IndexError("an index can only have a single ellipsis ('...')")
    n_real = sum(1 for it in items if it is not Ellipsis and it is not None)
    if any(it is None for it in items):
        raise IndexError("np.newaxis is not supported; add axes to the result instead")
    if n_real > len(shape):
        raise IndexError(f"too many indices ({n_real}) for an array of shape {shape}")
    expanded: list[Any] = []
    for it in items:
        if it is Ellipsis:
            expanded.extend([slice(None)] * (len(shape) - n_real))
        else:
            expanded.append(it)
    expanded.extend([slice(None)] * (len(shape) - len(expanded)))
    h5_key: list[Any] = []
    post: list[Any] = []
    needs_post = False
    for axis, (it, size) in enumerate(zip(expanded, shape)):
        if isinstance(it, (int, np.integer)) and not isinstance(it, bool):
            index = int(it) + size if int(it) < 0 else int(it)
            if not 0 <= index < size:
                raise IndexError(
                    f"index {int(it)} is out of bounds for axis {axis} with size {size}"
                )
            h5_key.append(index)
            continue
        if isinstance(it, slice):
            start, stop, step = it.indices(size)
            if step > 0:
                stop = max(stop, start)
                h5_key.append(slice(start, stop, step))
                post.append(slice(None))
                continue
            it = np.arange(start, stop, step)
        array = np.asarray(it)
        if array.dtype == bool:
            if array.shape != (size,):
                raise IndexError(f"boolean index of shape {array.shape} does not match axis "
                                 f"{axis} of size {size}")
            array = np.flatnonzero(array)
        elif array.dtype.kind not in "iu":
            raise IndexError(f"only integers, slices, index arrays and boolean masks are valid "
                             f"indices, got {it!r}")
        array = np.where(array < 0, array + size, array).astype(np.int64)
        if array.size and (array.min() < 0 or array.max() >= size):
            raise IndexError(f"index array out of bounds for axis {axis} with size {size}")
        lo = int(array.min()) if array.size else 0
        hi = int(array.max()) + 1 if array.size else 0
        h5_key.append(slice(lo, hi))
        post.append(array - lo)
        needs_post = True
    return tuple(h5_key), (tuple(post) if needs_post else None)


def summarize(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A JSON-able overview of a cache (for an `inspect` command).

    Returns:
        {path, file_bytes, schema_version, toolkit_version, created, model, architecture,
        model_dtype, tokenizer_fingerprint, lexicon_fingerprint, versions, n_traces_complete,
        n_traces_incomplete, incomplete_ids (first 20), complete (bool: nothing interrupted),
        n_tokens (total over complete traces), sites {name: {dtype, row_shape, layers,
        n_rows, bytes_on_disk, bytes_logical}}, arrays {name: {dtype, n_traces, bytes_on_disk}},
        segmented, n_segments, segments_beside (a single file with a segments folder beside it:
        "move" = its move into segments is under way or was interrupted, "other" = another
        store's, ignored; else None)}.
    """
    with open_cache(path) as reader:
        meta = reader.metadata
        complete = reader.trace_ids()
        incomplete = reader.incomplete_ids()
        sites: dict[str, dict[str, Any]] = {}
        arrays: dict[str, dict[str, Any]] = {}
        n_tokens = 0
        for trace_id in complete:
            trace = reader.trace(trace_id)
            n_tokens += trace.n_tokens
            for name in trace.names():
                lazy = trace.array(name, raw=True)
                stored = lazy._ds
                on_disk = int(stored.id.get_storage_size())
                if lazy.kind == schema.KIND_SITE:
                    entry = sites.setdefault(name, {
                        "dtype": lazy.dtype, "row_shape": list(lazy.shape[1:]),
                        "layers": list(lazy.layers), "n_rows": 0, "bytes_on_disk": 0,
                        "bytes_logical": 0, "chunks": list(stored.chunks or ()),
                        "compression": stored.compression})
                    entry["n_rows"] += lazy.shape[0]
                else:
                    entry = arrays.setdefault(name, {"dtype": lazy.dtype, "n_traces": 0,
                                                     "bytes_on_disk": 0, "bytes_logical": 0})
                    entry["n_traces"] += 1
                entry["bytes_on_disk"] += on_disk
                entry["bytes_logical"] += int(stored.size * stored.dtype.itemsize)
        folder = _store.segments_dir(reader.path)
        segmented = _store.is_segmented(reader.path)
        beside = None  # a segments folder beside a single file: a move into segments, or stale
        if not segmented and _store.list_segments(folder):
            beside = "move" if _store.is_migration_of(reader.path) else "other"
        return {
            "path": str(reader.path),
            "file_bytes": _store.store_bytes(reader.path),
            "segmented": segmented,
            "n_segments": len(_store.list_segments(folder)),
            "segments_beside": beside,
            **{key: meta[key] for key in (
                schema.ATTR_SCHEMA_VERSION, schema.ATTR_TOOLKIT_VERSION, schema.ATTR_CREATED,
                schema.ATTR_MODEL, schema.ATTR_ARCHITECTURE, schema.ATTR_MODEL_DTYPE,
                schema.ATTR_TOKENIZER_FINGERPRINT, schema.ATTR_LEXICON_FINGERPRINT,
                schema.ATTR_VERSIONS)},
            "n_traces_complete": len(complete),
            "n_traces_incomplete": len(incomplete),
            "incomplete_ids": incomplete[:20],
            "complete": not incomplete,
            "n_tokens": n_tokens,
            "sites": sites,
            "arrays": arrays,
        }


def _maybe_str(value: Any) -> Any:
    return value.decode("utf-8") if isinstance(value, bytes) else value
