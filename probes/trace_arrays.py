"""The loop shared by commands that add per-trace arrays to a cache (`lhat`, `updates`).

`add_trace_arrays` reads and tokenizes the traces, opens the cache (created, or extended when it
exists: the stored run config is kept and must use the same prompt / scaffold, and every stored
trace must have the same tokens), skips traces already done, and writes what `compute` returns for
each remaining trace: a new trace group (tokens, categories, spans, text) or arrays added to an
existing one. Every trace group it writes to also gets the label arrays `compare` needs
(`label_arrays`: phrase ids, first-token flags, paragraph starts, RaML-notebook matches) unless it
has them already. A file that holds activation sites only gains arrays for the traces it already has,
so its site layout stays uniform.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from probes.errors import ProbesError
from probes.models import LoadedModel

LABEL_KEY = "phrase_id"
"""A trace group that has this array has all of `label_arrays` (they are written together)."""

Compute = Callable[[Any], "tuple[dict[str, np.ndarray], dict[str, Any]] | None"]
"""`compute(tokenized_trace) -> (arrays, attrs)`, or None to leave the trace out."""


@dataclass
class TraceArrayRun:
    """Counts of one `add_trace_arrays` call."""

    n_traces: int = 0
    n_written: int = 0
    n_skipped: int = 0
    n_left_out: int = 0
    n_too_long: int = 0
    n_bad_lines: int = 0
    seconds: float = 0.0


def token_texts(tt) -> list[str]:
    """Decoded text of each trajectory token, sliced from the trajectory by its offsets."""
    text = tt.trajectory_text
    return [text[s:e] for s, e in tt.trajectory_offsets.tolist()]


def label_arrays(tt, cats, tokenizer) -> dict[str, np.ndarray]:
    """What `compare` needs besides categories, so it can run from the cache alone.

    Written by `add_trace_arrays` into every trace group it touches that lacks them.

    `phrase_id` int16 [n_tokens] (-1: none), `phrase_first` uint8 [n_tokens],
    `paragraph_start` uint8 [T] (trajectory token starts a blank-line paragraph), and
    `raml_notebook_occurrences` int32 [n, 3] (start, end, word index into
    `analyses.lhat_effects.RAML_NOTEBOOK_WORDS`, trajectory coordinates): RaML's notebook matching
    (ids of each word without a leading space, up to the first `</think>`), for
    `compare --raml-notebook`.
    """
    from analyses.lhat_effects import paragraph_starts, raml_notebook_occurrences

    a, b = tt.spans["trajectory"]
    close = tokenizer.convert_tokens_to_ids("</think>")
    if close is None or close == tokenizer.unk_token_id:
        close = None
    occ = raml_notebook_occurrences(
        tt.ids[a:b], lambda w: tokenizer.encode(w, add_special_tokens=False), close
    )
    return {
        "phrase_id": cats.phrase_id.astype(np.int16),
        "phrase_first": cats.is_first.astype(np.uint8),
        "paragraph_start": paragraph_starts(token_texts(tt)).astype(np.uint8),
        "raml_notebook_occurrences": np.asarray(
            [(o.start, o.end, o.phrase_id) for o in occ], dtype=np.int32
        ).reshape(-1, 3),
    }


def _stored(out: Path, done_key: str) -> tuple[dict[str, Any] | None, dict[str, dict[str, Any]]]:
    """Stored metadata and, per complete trace, its tokens and whether `done_key` is present."""
    if not out.exists():
        return None, {}
    from cache import open_cache

    with open_cache(out) as reader:
        meta = dict(reader.metadata)
        traces = {tr.id: {"tokens": np.asarray(tr.tokens), "done": done_key in tr.names(),
                          "labelled": LABEL_KEY in tr.names()}
                  for tr in reader}
        meta["_has_sites"] = bool(reader.sites)
    return meta, traces


def add_trace_arrays(
    loaded: LoadedModel,
    traces: Sequence[Any],
    out: Path,
    compute: Compute,
    *,
    done_key: str,
    command: str,
    traces_path: Path,
    n_bad_lines: int = 0,
    prompt_format: str | None = None,
    scaffold: str,
    progress: bool = True,
) -> TraceArrayRun:
    """Compute arrays for every trace and store them in the cache `out`.

    Args:
        loaded: The model (its tokenizer tokenizes the traces).
        traces: `Trace`s to process (already read, limited, transformed).
        out: The HDF5 cache.
        compute: Per tokenized trace, the arrays and attrs to store, or None to leave it out.
        done_key: A trace that already has this array is skipped (resume).
        command: Name used in messages and the progress bar.
        traces_path: The JSONL file (recorded as each new trace's source).
        n_bad_lines: Bad lines reported by the reader (counted only).
        prompt_format: Prompt format string; None for the chat template or the default.
        scaffold: The answer scaffold.
        progress: Show a tqdm bar on stderr.

    Returns:
        The counts.

    Raises:
        ProbesError: A cache written with another prompt / scaffold, or another model / tokenizer /
            lexicon (from the writer's identity check), or a trace whose stored tokens differ.
    """
    from tqdm import tqdm

    from cache import open_writer
    from probes.capture import run_metadata
    from probes.categories import categorize, load_lexicon
    from probes.traces import ANSWER_SUFFIX, tokenize_traces

    t0 = time.perf_counter()
    tokenized, too_long = tokenize_traces(
        traces, loaded.tokenizer, prompt_format=prompt_format, scaffold=scaffold,
        max_tokens=loaded.arch.n_ctx,
    )
    lexicon = load_lexicon()
    config = {
        "sites": {},
        "positions": "none",
        "storage_dtype": None,
        "prompt_format": prompt_format,
        "scaffold": scaffold,
        "answer_suffix": ANSWER_SUFFIX,
    }
    meta = run_metadata(loaded, lexicon, config=config, info={"traces": str(traces_path)})
    stored_meta, stored = _stored(out, done_key)
    if stored_meta is not None:
        stored_config = stored_meta.get("config", {})
        for key in ("prompt_format", "scaffold", "answer_suffix"):
            if stored_config.get(key) != config[key]:
                raise ProbesError(
                    f"{out} was written with {key}={stored_config.get(key)!r}, this run uses "
                    f"{config[key]!r}; {command} must use the cached tokenization: pass the same "
                    "settings or write to another --out"
                )
        meta["config"] = stored_config  # the identity check then compares model/tokenizer/lexicon
    has_sites = bool(stored_meta and stored_meta.get("_has_sites"))

    run = TraceArrayRun(n_traces=len(tokenized), n_too_long=len(too_long), n_bad_lines=n_bad_lines)
    bar = tqdm(tokenized, desc=command, unit="trace", disable=not progress, leave=False)
    with open_writer(out, metadata=meta, mode="append") as writer:
        for tt in bar:
            tid = tt.trace.id
            prior = stored.get(tid)
            if (prior is None and has_sites) or (prior is not None and prior["done"]):
                run.n_skipped += 1  # done already, or not in the activation cache
                continue
            if prior is not None and not np.array_equal(prior["tokens"], tt.ids):
                raise ProbesError(
                    f"trace {tid!r} in {out} has other tokens than this tokenization of "
                    f"{traces_path}; the cache was made from different traces or settings: use "
                    "another --out"
                )
            computed = compute(tt)
            if computed is None:
                run.n_left_out += 1
                continue
            arrays, attrs = computed
            cats = categorize(tt, lexicon)
            if prior is None or not prior["labelled"]:
                arrays = {**arrays, **label_arrays(tt, cats, loaded.tokenizer)}
            if prior is None:
                writer.write_trace(
                    tid, tokens=tt.ids, category=cats.category, spans=tt.spans,
                    arrays=arrays, text={"question": tt.trace.question, "answer": tt.trace.answer},
                    source=f"{traces_path.name}:{tt.trace.line_no}", attrs=attrs,
                )
            else:
                writer.add_to_trace(tid, arrays, attrs=attrs)
            run.n_written += 1
    run.seconds = round(time.perf_counter() - t0, 3)
    return run
