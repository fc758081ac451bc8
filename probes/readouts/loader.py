"""The one typed loader of a cache: every reader of stored arrays (the commands, the report,
notebooks) goes through `open_cache` / `load_traces`.

One coordinate system: a token is named by its position in the whole sequence. The registry
(`probes.arrays`) declares each array's axes; the reader translates positions to the array's token
axis ([n_tokens], [T], [T+1], a site's captured rows), so

    with probes.open_cache("run.h5") as store:
        tr = store.trace("gsm8k/12")
        tr.array("lhat_delta", at=tr.select("reflection"))     # ΔL̂ of the reflection tokens
        tr.array("upd_m7", at=tr.select("reflection"))         # [L, k]

reads exactly those tokens, and a position an array does not cover is an error.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

import cache
from cache.errors import CacheError
from cache.reader import (
    PREFIX,
    SEQUENCE,
    TRAJECTORY,
    CachedTrace,
    CacheReader,
    Positions,
    trajectory_index,
)
from probes.arrays import REGISTRY
from probes.errors import ProbesError

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["TraceArrays", "load_traces", "open_cache", "registry_axes"]


def registry_axes() -> dict[str, str]:
    """Declared shape of every registered array, e.g. {"upd_m7": "[L, T]"}."""
    return {decl.name: decl.axes for decl in REGISTRY}


def open_cache(path: str | os.PathLike[str]) -> CacheReader:
    """Open a cache read-only with the registry's axes (`cache.open_cache(path, axes=...)`)."""
    return cache.open_cache(path, axes=registry_axes())


@dataclass(frozen=True)
class TraceArrays:
    """One trace's metadata and the stored arrays asked for, read into memory.

    Attributes:
        id: The trace id.
        n_tokens: Tokens of the whole sequence.
        spans: Half-open token ranges by name ("prompt", "trajectory", "scaffold", "answer").
        tokens: int32 [n_tokens] token ids.
        category: uint8 [n_tokens] category codes.
        codes: Category name -> code.
        arrays: Name -> the stored values (float32 / ints), as stored.
        axes: Name -> what each axis runs over ("sequence", "trajectory", "prefix", "rows", "").
        attrs: The trace's extra attributes (settings of the commands that wrote it, ...).
        source: Where the trace came from ("traces.jsonl:12").
        stored: Names of every site and array the trace holds (read or not).
    """

    id: str
    n_tokens: int
    spans: dict[str, tuple[int, int]]
    tokens: np.ndarray
    category: np.ndarray
    codes: dict[str, int]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    axes: dict[str, tuple[str, ...]] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    stored: tuple[str, ...] = ()

    def __getitem__(self, name: str) -> np.ndarray:
        """The loaded array `name`, whole, as stored (`trace["lhat"]`, like `CachedTrace`).

        Raises:
            ProbesError: `name` was not loaded, or the trace has no `name`.
        """
        if name not in self.arrays:
            if self.stored and name not in self.stored:
                raise ProbesError(f"trace {self.id!r} has no {name}; it holds {list(self.stored)}")
            raise ProbesError(f"{name} was not loaded for trace {self.id!r}; loaded: "
                              f"{sorted(self.arrays)}")
        return self.arrays[name]

    @property
    def trajectory(self) -> tuple[int, int]:
        """The trajectory's half-open token range ((0, 0) when absent)."""
        return self.spans.get("trajectory", (0, 0))

    def select(self, category: str | Sequence[str], *, span: str | None = None) -> Positions:
        """Positions of the tokens of `category` (names of `codes`), optionally within a span."""
        wanted = [category] if isinstance(category, str) else list(category)
        unknown = [c for c in wanted if c not in self.codes]
        if unknown:
            raise ProbesError(f"unknown categories {unknown}; this cache has {sorted(self.codes)}")
        mask = np.isin(self.category, [self.codes[c] for c in wanted])
        if span is not None:
            if span not in self.spans:
                raise ProbesError(f"trace {self.id!r} has no span {span!r}; spans: "
                                  f"{sorted(self.spans)}")
            a, b = self.spans[span]
            mask[:a] = False
            mask[b:] = False
        return Positions(np.flatnonzero(mask))

    def at(self, name: str, positions: Any) -> np.ndarray:
        """The values of array `name` at the tokens of `positions` (sequence positions), along
        its token axis; other axes whole ([L, T] -> [L, k]).

        Raises:
            ProbesError: `name` was not loaded, has no token axis, or does not cover a position.
        """
        values = self[name]
        kinds = self.axes.get(name, ())
        axis = next((i for i, kind in enumerate(kinds) if kind), None)
        if axis is None:
            raise ProbesError(f"{name} has no token axis (shape {values.shape})")
        p = np.asarray(positions, dtype=np.int64).view(np.ndarray)
        kind = kinds[axis]
        if kind == SEQUENCE:
            index = p
        else:
            try:
                index = trajectory_index(kind, p, self.spans, name)
            except CacheError as err:
                raise ProbesError(str(err)) from None
        return np.take(values, index, axis=axis)

    def per_token(self, name: str) -> np.ndarray:
        """Array `name` as float64 [..., n_tokens]: each token's value, NaN where it has none."""
        values = self[name]
        kinds = self.axes.get(name, ())
        if not kinds or kinds[-1] not in (SEQUENCE, TRAJECTORY, PREFIX):
            raise ProbesError(f"{name} has no trailing token axis (shape {values.shape})")
        out = np.full(values.shape[:-1] + (self.n_tokens,), np.nan)
        if kinds[-1] == SEQUENCE:
            out[...] = values
        else:
            a, b = self.trajectory
            out[..., a:b] = values[..., 1:] if kinds[-1] == PREFIX else values
        return out

    def table(self) -> pd.DataFrame:
        """One row per token: position, token id, category, span, and every loaded per-token
        array aligned on it ([L, T] arrays as one column per layer, `name_L<l>`)."""
        import pandas as pd  # optional extra, imported only when a table is built

        names = {code: name for name, code in self.codes.items()}
        span = np.full(self.n_tokens, "", dtype=object)
        for key, (a, b) in sorted(self.spans.items(), key=lambda kv: kv[1]):
            span[a:b] = key
        cols: dict[str, Any] = {
            "trace": np.full(self.n_tokens, self.id, dtype=object),
            "position": np.arange(self.n_tokens),
            "token": self.tokens,
            "category": [names.get(int(c), str(int(c))) for c in self.category],
            "span": span,
        }
        for name, values in self.arrays.items():
            kinds = self.axes.get(name, ())
            if not kinds or kinds[-1] not in (SEQUENCE, TRAJECTORY, PREFIX) or values.ndim > 2:
                continue
            full = self.per_token(name)
            if full.ndim == 1:
                cols[name] = full
            else:
                for layer, row in zip(_layers(self.attrs, name, full.shape[0]), full):
                    cols[f"{name}_L{layer}"] = row
        return pd.DataFrame(cols)

    def to_pandas(self) -> pd.DataFrame:
        """The per-token table (`table`)."""
        return self.table()

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: metadata and every array as nested lists."""
        return {"id": self.id, "n_tokens": self.n_tokens,
                "spans": {k: list(v) for k, v in self.spans.items()},
                "tokens": self.tokens.tolist(), "category": self.category.tolist(),
                "codes": dict(self.codes), "source": self.source, "attrs": dict(self.attrs),
                "arrays": {k: v.tolist() for k, v in self.arrays.items()}}


def _layers(attrs: dict[str, Any], name: str, n: int) -> list[int]:
    raw = attrs.get(f"{name.split('_', 1)[0]}_layers", ())
    try:
        layers = [int(x) for x in (json.loads(raw) if isinstance(raw, str) else raw)]
    except (TypeError, ValueError):
        layers = []
    return layers if len(layers) == n else list(range(n))


def _read(trace: CachedTrace, names: Sequence[str], codes: dict[str, int],
          stored: Sequence[str]) -> TraceArrays:
    arrays, axes = {}, {}
    for name in names:
        lazy = trace.array(name)
        arrays[name] = np.asarray(lazy[...])
        axes[name] = lazy.token_axes
    return TraceArrays(id=trace.id, n_tokens=trace.n_tokens, spans=dict(trace.spans),
                       tokens=trace.tokens, category=trace.category, codes=dict(codes),
                       arrays=arrays, axes=axes, attrs=dict(trace.attrs), source=trace.source,
                       stored=tuple(stored))


def load_traces(
    source: str | os.PathLike[str] | CacheReader,
    arrays: Iterable[str] | None = None,
    *,
    traces: Iterable[str] | None = None,
    missing: str = "skip",
    optional: Iterable[str] = (),
) -> list[TraceArrays]:
    """Read traces of a cache with the arrays asked for (the one loader every reader uses).

    Args:
        source: A cache path, or an open reader.
        arrays: Array names to read (default: every registered array a trace has).
        traces: Trace ids (default: every complete trace, in write order).
        missing: What to do with a trace that lacks one of `arrays`: "skip" it, "partial" (read
            what it has) or "raise".
        optional: More array names, read when a trace has them (never a reason to skip or
            raise); e.g. `load_traces(p, ["lhat"], optional=["phrase_id"])`.

    Returns:
        One `TraceArrays` per trace.

    Raises:
        ProbesError: `missing="raise"` and a trace lacks an array, or `missing` is unknown.
        CacheError: The cache cannot be read (one line, from `cache`).
    """
    if missing not in ("skip", "partial", "raise"):
        raise ProbesError(f"missing must be 'skip', 'partial' or 'raise', got {missing!r}")
    wanted = None if arrays is None else list(arrays)
    extra = [n for n in optional if wanted is None or n not in wanted]
    if isinstance(source, CacheReader):
        return _load(source, wanted, extra, traces, missing)
    with open_cache(source) as reader:
        return _load(reader, wanted, extra, traces, missing)


def _load(reader: CacheReader, wanted: list[str] | None, extra: list[str],
          traces: Iterable[str] | None, missing: str) -> list[TraceArrays]:
    codes = reader.category_codes
    registered = registry_axes()
    out = []
    for trace_id in (reader.trace_ids() if traces is None else traces):
        trace = reader.trace(trace_id)
        stored = trace.names()
        have = set(stored)
        names = [n for n in registered if n in have] if wanted is None else wanted
        absent = [n for n in names if n not in have]
        if absent and missing == "raise":
            raise ProbesError(f"trace {trace.id!r} of {reader.path} has no {absent}; run the "
                              f"command that writes them (probes.arrays names it)")
        if absent and missing == "skip":
            continue
        names = [n for n in names if n in have] + [n for n in extra if n in have and n not in names]
        out.append(_read(trace, names, codes, stored))
    return out
