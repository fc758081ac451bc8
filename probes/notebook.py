"""The notebook face behind `import probes`: load a model, read traces, measure one trace, run a
dataset into a cache, open a cache — each result a typed object with `.to_pandas()` / `.to_dict()`.

    import probes
    model = probes.load_model("tiny-reasoner", device="cpu")
    traces = probes.read_traces(probes.DATA_DIR / "tiny_reasoner_traces.jsonl")
    curve = probes.lhat(model, traces[0])          # TraceArrays: lhat [T+1], lhat_delta [T], ...
    curve.to_pandas()                               # one row per token, every array aligned
    probes.run_lhat(model, traces[:20], "run.h5")   # a resumable cache, as `lhat --out run.h5`
    with probes.open_cache("run.h5") as store:
        tr = store.trace(traces[0].id)
        tr.array("lhat_delta", at=tr.select("reflection"))

Every function here is a thin door onto the one implementation the commands use (the measures,
the write loop and its runners, the typed loader); nothing is computed differently. The model
code (torch, transformers) is imported inside the functions that run a model, so that reading
traces and caches from a notebook stays torch-free and fast.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cache.reader import parse_axes
from probes.arrays import BY_NAME, UPDATES, names
from probes.errors import ProbesError
from probes.pipeline.outputs import check_output_file
from probes.readouts.loader import TraceArrays, load_traces, open_cache
from probes.traces.categories import CATEGORY_CODES, categorize, load_lexicon
from probes.traces.labels import label_arrays
from probes.traces.read import Trace, TraceSet, trace_from_record
from probes.traces.read import read_traces as _read_jsonl
from probes.traces.tokenize import DEFAULT_SCAFFOLD, TokenizedTrace, tokenize_trace

if TYPE_CHECKING:
    from hooks.model import LoadedModel
    from probes.models.spec import ModelSpec

__all__ = ["TraceArrays", "lhat", "load_model", "open_cache", "read_traces", "run_lhat",
           "run_updates", "updates"]

TraceLike = Trace | TokenizedTrace | Mapping[str, Any]
"""A trace as `Trace`, a tokenized trace, or a record dict ({question, trajectory, answer, ...})."""


def load_model(spec: str | ModelSpec, *, device: str | None = None,
               dtype: str | None = None) -> LoadedModel:
    """A model, strictly offline: a built-in name ("tiny-reasoner"), a local folder, or a hub id
    already in the local HF cache, or a `probes.models.spec.ModelSpec`
    (`probes.models.load.load_model`)."""
    from probes.models.load import load_model as _load  # model code: imported when used

    return _load(spec, device=device, dtype=dtype)


def read_traces(source: str | os.PathLike[str] | Iterable[Mapping[str, Any]], *,
                strict: bool = False) -> list[Trace]:
    """Traces from a JSONL path, a list of record dicts, or a `datasets.Dataset` (any iterable of
    dicts), with the same accepted shapes and checks as the command line (`read_traces`).

    Raises:
        ProbesError: No usable trace, or (strict) the first bad record, naming it and why.
    """
    if isinstance(source, (str, os.PathLike)):
        traceset = _read_jsonl(source, strict=strict)
    else:
        good, bad = [], []
        for number, record in enumerate(source, start=1):
            trace, reason = trace_from_record(dict(record), number)
            if trace is None:
                if strict:
                    raise ProbesError(f"record {number}: {reason}")
                bad.append((number, reason))
            else:
                good.append(trace)
        traceset = TraceSet(good, [], Path("<records>"))
        if not good:
            raise ProbesError(f"no usable trace among {len(bad)} records; the first: record "
                              f"{bad[0][0]}: {bad[0][1]}" if bad else "no records given")
    return list(traceset.traces)


def _as_trace(trace: TraceLike) -> Trace | TokenizedTrace:
    if isinstance(trace, (Trace, TokenizedTrace)):
        return trace
    found, reason = trace_from_record(dict(trace), 1)
    if found is None:
        raise ProbesError(f"not a trace: {reason}")
    return found


def _tokenized(model: LoadedModel, trace: TraceLike, *, prompt_format: str | None,
               scaffold: str) -> TokenizedTrace:
    found = _as_trace(trace)
    if isinstance(found, TokenizedTrace):
        return found
    return tokenize_trace(found, model.tokenizer, prompt_format=prompt_format, scaffold=scaffold)


def _result(model: LoadedModel, tt: TokenizedTrace, arrays: Mapping[str, np.ndarray],
            attrs: Mapping[str, Any] | None = None) -> TraceArrays:
    """A measured trace as the typed record the cache loader returns (same axes, same methods)."""

    cats = categorize(tt, load_lexicon())
    stored = {**label_arrays(tt, cats, model.tokenizer), **dict(arrays)}
    return TraceArrays(
        id=tt.trace.id, n_tokens=tt.n_tokens, spans=dict(tt.spans), tokens=np.asarray(tt.ids),
        category=cats.category, codes=dict(CATEGORY_CODES),
        arrays={k: np.asarray(v) for k, v in stored.items()},
        axes={k: parse_axes(BY_NAME[k].axes) if k in BY_NAME else () for k in stored},
        attrs=dict(attrs or {}), source=f"line {tt.trace.line_no}")


def lhat(model: LoadedModel, trace: TraceLike, *, prompt_format: str | None = None,
         scaffold: str = DEFAULT_SCAFFOLD) -> TraceArrays:
    """L̂ after every trajectory prefix of one trace and its per-token changes, as `lhat` stores
    them (`lhat` [T+1], `lhat_delta`, `lhat_rho`, `lhat_log_ratio` [T]; docs/methods.md#m8)."""
    from probes.measures.lhat.fast import lhat_fast  # model code: imported when used
    from probes.measures.lhat.per_token import lhat_arrays

    tt = _tokenized(model, trace, prompt_format=prompt_format, scaffold=scaffold)
    return _result(model, tt, lhat_arrays(lhat_fast(model, tt).lhat))


def updates(model: LoadedModel, trace: TraceLike, *, prompt_format: str | None = None,
            scaffold: str = DEFAULT_SCAFFOLD, attention: str = "auto") -> TraceArrays:
    """M1–M7 per layer and trajectory token of one trace, as `updates` stores them (`upd_*`
    [L, T]; docs/methods.md#m1 to #m7)."""
    from probes.measures.updates.shared_pass import (  # model code: imported when used
        check_updates,
        trace_update_arrays,
    )

    check_updates(model, attention)
    tt = _tokenized(model, trace, prompt_format=prompt_format, scaffold=scaffold)
    arrays, query = trace_update_arrays(model, tt, attention=attention)
    return _result(model, tt, arrays, {"upd_query": int(query)})


def _traces_file(traces: str | os.PathLike[str] | Iterable[TraceLike], out: Path) -> Path:
    """A JSONL path for the runners: the path given, or the traces written beside the store
    (`<out>.traces.jsonl`, kept: the store records it and `--resume` rereads it)."""
    if isinstance(traces, (str, os.PathLike)):
        return Path(traces)
    path = out.with_name(out.name + ".traces.jsonl")
    lines = []
    for item in traces:
        found = _as_trace(item)
        if isinstance(found, TokenizedTrace):
            found = found.trace
        lines.append(json.dumps({"id": found.id, "question": found.question,
                                 "trajectory": found.trajectory, "answer": found.answer,
                                 **found.meta}, ensure_ascii=False))

    check_output_file(path, "out")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def run_lhat(model: str | ModelSpec | LoadedModel, traces: str | os.PathLike[str] | Iterable[TraceLike],
             out: str | os.PathLike[str], *, resume: bool = False, progress: bool = False,
             **settings: Any) -> list[TraceArrays]:
    """`lhat` over a dataset into the cache `out` (resumable, the command's write loop); returns
    the stored curves. `settings` are `LhatConfig` fields (chunk_size, limit, scaffold, ...)."""
    from probes.pipeline.lhat import LhatConfig, lhat_traces  # model code: imported when used

    out = Path(out)
    model_arg: Any = model
    lhat_traces(model_arg, _traces_file(traces, out), out, LhatConfig(**settings), resume=resume,
                progress=progress, log=lambda _line: None)
    return load_traces(out, [d for d in ("lhat", "lhat_delta", "lhat_rho", "lhat_log_ratio")])


def run_updates(model: str | ModelSpec | LoadedModel, traces: str | os.PathLike[str] | Iterable[TraceLike],
                out: str | os.PathLike[str], *, resume: bool = False, progress: bool = False,
                **settings: Any) -> list[TraceArrays]:
    """`updates` over a dataset into the cache `out`; returns the stored M1–M7 arrays.
    `settings` are `UpdatesConfig` fields."""
    from probes.pipeline.updates import UpdatesConfig, updates_traces  # model code: imported when used

    out = Path(out)
    updates_traces(model, _traces_file(traces, out), out, UpdatesConfig(**settings),
                   resume=resume, progress=progress,
                   log=lambda _line: None)
    return load_traces(out, names(UPDATES))
