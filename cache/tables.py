"""A cache as pandas tables: one row per token (`token_table`) or per trace (`trace_table`).

    from cache.tables import token_table
    token_table("run.h5").groupby("category", observed=True)["lhat_delta"].mean()

pandas is an optional extra (`pip install 'trajectory-probes[tables]'`), imported only when a table
is built. The cache stores token ids, not text, and this package never loads a tokenizer: pass
`decode` (one trace's ids -> one string per token) to get a `text` column, e.g.
`probes.models.cache_text.cache_decoder(path)`, which loads the tokenizer the cache records.

Which axis an array has is read from its shape, as `cache/SCHEMA.md` lays them out: [n_tokens]
(every token), [T] (trajectory token i = position `spans["trajectory"][0] + i`), [T+1] (a prefix
curve such as `lhat`: index t = after t trajectory tokens, so a token's row holds the value after
it) and [L, T] (one column per layer, `name_L<layer>`, layers from the trace attribute
`<prefix>_layers`, e.g. `upd_layers`, else 0..L-1). Sites and other shapes are not per-token
scalars and are left out.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np

from cache import schema
from cache.errors import CacheError
from cache.reader import PREFIX, SEQUENCE, CachedTrace, CacheReader, LazyArray, open_cache
from cache.reader import TRAJECTORY as TRAJECTORY_AXIS

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["PANDAS_HINT", "Decode", "token_table", "trace_table"]

PANDAS_HINT = ("the cache tables need pandas, an optional extra: pip install "
               "'trajectory-probes[tables]' (or pip install 'pandas>=2')")
"""The message of the ImportError raised when pandas is missing."""

Decode = Callable[[Sequence[int]], Sequence[str]]
"""Turns one trace's token ids into one string per token."""

TRAJECTORY = "trajectory"


def _pandas() -> Any:
    try:
        import pandas
    except ImportError as exc:
        raise ImportError(PANDAS_HINT) from exc
    return pandas


@contextmanager
def _reader(source: str | os.PathLike[str] | CacheReader) -> Iterator[CacheReader]:
    if isinstance(source, CacheReader):
        yield source
        return
    with open_cache(source) as reader:
        yield reader


def _traces(reader: CacheReader, ids: Iterable[str] | None) -> list[CachedTrace]:
    if ids is None:
        return list(reader)
    return [reader.trace(i) for i in ids]


def _layers(trace: CachedTrace, name: str, n: int) -> list[int]:
    """Layer ids of the rows of an [L, T] array: `<prefix>_layers` attribute, else 0..n-1."""
    raw = trace.attrs.get(f"{name.split('_', 1)[0]}_layers", ())
    try:
        layers = [int(x) for x in (json.loads(raw) if isinstance(raw, str) else raw)]
    except (TypeError, ValueError):
        layers = []
    return layers if len(layers) == n else list(range(n))


def _lazy(trace: CachedTrace, name: str) -> LazyArray:
    """`trace[name]` without listing the group again (the caller already checked the name)."""
    return LazyArray(trace._group[name], trace._reader, raw=False, trace=trace)


def _array_columns(trace: CachedTrace, name: str) -> dict[str, tuple[np.ndarray, slice]] | None:
    """One array of a trace as per-token columns: {column: (values, rows they fill)}, or None.

    The token axis is the reader's (`CachedTrace.token_axes`, one coordinate system):
    [n_tokens] fills every row; [T], [T+1] (the value after each token) and [L, T] (one column
    `name_L<layer>` per row) fill the trajectory rows.
    """
    lazy = _lazy(trace, name)
    if lazy.kind != schema.KIND_ARRAY or lazy.ndim not in (1, 2):
        return None
    kinds = lazy.token_axes
    a, b = trace.spans.get(TRAJECTORY, (0, 0))
    if kinds == (SEQUENCE,):
        return {name: (np.asarray(lazy[...]), slice(0, trace.n_tokens))}
    if b == a:
        return None
    if kinds in ((TRAJECTORY_AXIS,), (PREFIX,)):
        values = np.asarray(lazy[...])
        return {name: (values[1:] if kinds == (PREFIX,) else values, slice(a, b))}
    if kinds == ("", TRAJECTORY_AXIS):
        values = np.asarray(lazy[...])
        return {f"{name}_L{layer}": (row, slice(a, b))
                for layer, row in zip(_layers(trace, name, lazy.shape[0]), values)}
    return None


def _column(pd: Any, values: np.ndarray, rows: slice, n: int) -> Any:
    """`values` at `rows` of an [n] column: floats with NaN elsewhere, integers as pandas'
    nullable Int64 with NA elsewhere."""
    if values.dtype.kind == "f":
        out = np.full(n, np.nan, dtype=values.dtype)
        out[rows] = values
        return out
    full = np.zeros(n, dtype=np.int64)
    full[rows] = values
    mask = np.ones(n, dtype=bool)
    mask[rows] = False
    return pd.arrays.IntegerArray(full, mask)


def _span_labels(trace: CachedTrace) -> np.ndarray:
    out = np.full(trace.n_tokens, "", dtype=object)
    for name, (s, e) in sorted(trace.spans.items(), key=lambda kv: kv[1]):
        out[s:e] = name
    return out


def token_table(
    source: str | os.PathLike[str] | CacheReader,
    arrays: Sequence[str] | None = None,
    *,
    traces: Iterable[str] | None = None,
    decode: Decode | None = None,
    phrase_names: Sequence[str] | None = None,
) -> pd.DataFrame:
    """One row per token of every (or the given) complete trace.

    Columns: `trace_id`, `position` (token index in the trace), `token` (id), `text` (with
    `decode`), `category` (name), `phrase` (the phrase text with `phrase_names`, else the phrase
    id; missing where the token is in no phrase; only when the cache has `phrase_id`), `span`
    (prompt, trajectory, scaffold, answer), `traj_index` (i in the trajectory; missing outside),
    then the arrays (see the module docstring for how each shape becomes columns). Float
    columns are NaN where an array has no value; integer arrays use pandas' nullable integers.

    Args:
        source: A cache path or an open `CacheReader`.
        arrays: Array names to add (None: every per-token array of the traces).
        traces: Trace ids (None: every complete trace, in write order).
        decode: Turns a trace's ids into one string per token (adds `text`).
        phrase_names: Phrase text by phrase id (the cache's lexicon), for the `phrase` column.

    Returns:
        The DataFrame (category, span and phrase as pandas categoricals).

    Raises:
        ImportError: pandas is not installed (`PANDAS_HINT`).
        CacheError: An array in `arrays` that some trace lacks or that is not per-token.
    """
    pd = _pandas()
    frames = []
    with _reader(source) as reader:
        names_by_code = {int(v): k for k, v in reader.category_codes.items()}
        for trace in _traces(reader, traces):
            frames.append(_trace_frame(pd, trace, arrays, decode, phrase_names, names_by_code))
        categories = [names_by_code[c] for c in sorted(names_by_code)]
    if not frames:
        return pd.DataFrame(columns=["trace_id", "position", "token", "category", "span"])
    table = pd.concat(frames, ignore_index=True, sort=False)
    table["category"] = pd.Categorical(table["category"], categories=categories)
    table["span"] = table["span"].astype("category")
    if "phrase" in table and phrase_names is not None:
        table["phrase"] = pd.Categorical(table["phrase"], categories=list(dict.fromkeys(phrase_names)))
    return table


def _trace_frame(pd: Any, trace: CachedTrace, arrays: Sequence[str] | None, decode: Decode | None,
                 phrase_names: Sequence[str] | None, names_by_code: dict[int, str]) -> Any:
    n = trace.n_tokens
    tokens = np.asarray(trace.tokens)
    a, b = trace.spans.get(TRAJECTORY, (0, 0))
    cols: dict[str, Any] = {
        "trace_id": np.full(n, trace.id, dtype=object),
        "position": np.arange(n, dtype=np.int64),
        "token": tokens.astype(np.int64),
    }
    if decode is not None:
        text = list(decode(tokens.tolist()))
        if len(text) != n:
            raise CacheError(f"decode gave {len(text)} strings for the {n} tokens of trace {trace.id!r}")
        cols["text"] = np.asarray(text, dtype=object)
    cols["category"] = np.asarray([names_by_code.get(int(c), str(int(c))) for c in trace.category],
                                  dtype=object)
    present = trace.names()
    if "phrase_id" in present:
        cols["phrase"] = _phrase_column(pd, np.asarray(_lazy(trace, "phrase_id")[...]), phrase_names)
    cols["span"] = _span_labels(trace)
    cols["traj_index"] = _column(pd, np.arange(b - a), slice(a, b), n)
    wanted = [x for x in present if x != "phrase_id"] if arrays is None else list(arrays)
    for name in wanted:
        if name not in present:
            raise CacheError(f"trace {trace.id!r} has no array {name!r}; it has {sorted(present)}")
        got = _array_columns(trace, name)
        if got is None:
            if arrays is not None:
                raise CacheError(f"array {name!r} of trace {trace.id!r} (shape {_lazy(trace, name).shape})"
                                 " is not per-token: [n_tokens], [T], [T+1] or [L, T]")
            continue
        for col, (values, rows) in got.items():
            cols[col] = _column(pd, values, rows, n)
    return pd.DataFrame(cols)


def _phrase_column(pd: Any, ids: np.ndarray, names: Sequence[str] | None) -> Any:
    if names is None:
        return pd.arrays.IntegerArray(ids.astype(np.int64), ids < 0)
    return np.asarray([names[int(i)] if 0 <= int(i) < len(names) else None for i in ids], dtype=object)


def trace_table(
    source: str | os.PathLike[str] | CacheReader,
    *,
    traces: Iterable[str] | None = None,
) -> pd.DataFrame:
    """One row per complete trace.

    Columns: `trace_id`, `source`, `n_tokens`, `traj_start`, `traj_end`, `n_trajectory`,
    `n_<category>` (tokens of each category), `question` and `answer` (stored text), `lhat_start`
    and `lhat_end` (L̂ with no and with the full trajectory, when the trace has `lhat`),
    `arrays` (its per-trace array names, comma-separated) and every scalar trace attribute
    (e.g. `upd_control`, `lhat_method`).

    Raises:
        ImportError: pandas is not installed (`PANDAS_HINT`).
    """
    pd = _pandas()
    rows = []
    with _reader(source) as reader:
        codes = reader.category_codes
        for trace in _traces(reader, traces):
            a, b = trace.spans.get(TRAJECTORY, (0, 0))
            counts = np.bincount(np.asarray(trace.category, np.int64), minlength=max(codes.values()) + 1)
            text = trace.text
            row: dict[str, Any] = {
                "trace_id": trace.id, "source": trace.source, "n_tokens": trace.n_tokens,
                "traj_start": a, "traj_end": b, "n_trajectory": b - a,
                **{f"n_{name}": int(counts[code]) for name, code in codes.items()},
                "question": text.get("question"), "answer": text.get("answer"),
            }
            names = trace.names()
            if "lhat" in names:
                lhat = np.asarray(_lazy(trace, "lhat")[...], np.float64)
                row["lhat_start"], row["lhat_end"] = float(lhat[0]), float(lhat[-1])
            row["arrays"] = ",".join(sorted(x for x in names if _lazy(trace, x).kind == schema.KIND_ARRAY))
            row.update({k: v for k, v in trace.attrs.items() if isinstance(v, (str, int, float, bool))})
            rows.append(row)
    return pd.DataFrame(rows)
