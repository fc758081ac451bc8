"""`python -m probes.run cache`: capture the activations of every trace into an HDF5 cache.

Per trace: tokenize (prompt / trajectory / scaffold / answer spans), label every token, capture the
configured sites in chunks through the KV cache (`probes.measures.capture.activations.capture_trace`) and
commit one trace group through the write loop (`probes.pipeline.loop`), whose rules (resume,
identity, duplicate ids, token mismatch) every writing command shares. Short traces run several
per forward and are committed together (`probes.measures.capture.batching`, `--batch-tokens`). A run
killed at any moment leaves only complete traces; `--resume` skips them and redoes the interrupted
ones, giving the same file as an uninterrupted run.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from probes.measures.capture.activations import (
    capture_trace,
    choose_backend,
    resolve_cache_sites,
)
from probes.measures.capture.batching import capture_batch, plan_batches, row_bytes
from probes.models.spec import ModelSpec
from probes.pipeline.loop import (
    Batching,
    Log,
    Plan,
    TraceOutput,
    WriteJob,
    WriteResult,
    loader,
    write_traces,
)

if TYPE_CHECKING:
    from hooks.model import LoadedModel
    from probes.measures.capture.activations import TraceArrays
    from probes.traces.tokenize import TokenizedTrace
from probes.pipeline.configs import CacheConfig, TraceSource, trace_source

NAME = "cache"


OWN_KEYS: tuple[str, ...] = ("sites", "positions", "storage_dtype")
"""Settings of the stored sites: an existing cache must have been written with the same ones."""


@dataclass
class CacheRunResult(WriteResult):
    """What one `cache_traces` run did: the write loop's counts plus the capture's figures.

    Attributes:
        backend: The capture backend used ("hf" or "bridge").
        n_rows: Site rows written (selected tokens).
        nonfinite: Trace id -> number of non-finite stored values (float16 overflow), if any.
    """

    backend: str = ""
    n_rows: int = 0
    nonfinite: dict[str, int] = field(default_factory=dict)


def cache_traces(
    model: ModelSpec | LoadedModel | str,
    traces: TraceSource | str | os.PathLike[str],
    out: str | os.PathLike[str],
    cfg: CacheConfig | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = False,
    device: str | None = None,
    model_dtype: str | None = None,
    log: Log | None = None,
) -> CacheRunResult:
    """Capture the activations of every trace of a JSONL file into an HDF5 cache.

    Args:
        model: A `ModelSpec` (or its name), or a loaded model.
        traces: A `TraceSource`, or the JSONL path (then the trace settings given to `cfg` in
            the older calling convention apply: `probes.pipeline.configs.trace_source`).
        out: The .h5 file; its folder must exist.
        cfg: What to cache (default `CacheConfig()`: resid_post and delta of every layer, trajectory
            tokens, float16).
        resume: Extend an existing file (complete traces are skipped, see
            `probes.pipeline.loop.RESUME_HELP`). Without it (and without `overwrite`) an existing
            file is an error.
        overwrite: Replace an existing file.
        progress: Show a progress bar on stderr (traces, tokens/s).
        device, model_dtype: Replace the spec's device / dtype (the older calling convention).
        log: Called with one-line status messages (bad lines, too-long traces, what is to do).

    Returns:
        The `CacheRunResult`.

    Raises:
        ProbesError, CacheError, HooksError: Bad config, missing traces file, repeated trace ids,
            unknown sites, an existing `out` without `resume`, a missing folder, a locked file, a
            file of another model / tokenizer / config, a trace whose stored tokens differ.
    """

    cfg = cfg if cfg is not None else CacheConfig()
    out = Path(out)
    result = CacheRunResult()
    source = trace_source(traces, cfg)
    job = WriteJob(command=NAME, out=out, resume=resume, overwrite=overwrite, own_keys=OWN_KEYS,
                   info={"chunk_size": cfg.chunk_size, "batch_tokens": cfg.batch_tokens},
                   progress=progress, log=log)

    def plan(loaded: LoadedModel) -> Plan:
        site_map = resolve_cache_sites(cfg.sites, loaded.arch)
        backend = choose_backend(loaded, site_map, cfg.backend)
        result.backend = backend
        spool_dir = out.resolve().parent

        def output(tt: TokenizedTrace, arrays: TraceArrays,
                   close: Callable[[], None] | None = None) -> TraceOutput:
            def committed() -> None:
                result.n_rows += int(arrays.positions.shape[0])
                if arrays.n_nonfinite:
                    result.nonfinite[tt.trace.id] = arrays.n_nonfinite

            return TraceOutput(sites=arrays.sites, positions=arrays.positions,
                               attrs={"n_nonfinite": arrays.n_nonfinite}, n_tokens=arrays.n_tokens,
                               nbytes=arrays.nbytes, close=close, committed=committed)

        def compute(tt: TokenizedTrace) -> TraceOutput:
            stack = ExitStack()
            arrays = stack.enter_context(capture_trace(loaded, tt, site_map, cfg, backend=backend,
                                                       spool_dir=spool_dir))
            return output(tt, arrays, stack.close)

        def plan_batch(tts: Sequence[TokenizedTrace]) -> list[list[int]]:
            return plan_batches(tts, positions=cfg.positions, batch_tokens=cfg.batch_tokens,
                                max_tokens=cfg.chunk_size,
                                bytes_per_row=row_bytes(site_map, loaded.arch.d_model, cfg.dtype),
                                max_bytes=cfg.max_ram_mib * 2**20)

        def compute_batch(tts: Sequence[TokenizedTrace]) -> list[TraceOutput | str]:
            return [output(tt, arrays) for tt, arrays in
                    zip(tts, capture_batch(loaded, tts, site_map, cfg), strict=True)]

        config = {"sites": {c: (None if ls is None else list(ls)) for c, ls in site_map.items()},
                  "positions": cfg.positions, "storage_dtype": cfg.dtype}
        batching = (Batching(plan_batch, compute_batch)
                    if backend == "hf" and cfg.batch_tokens > 1 else None)
        return Plan(compute, config=config, info={"backend": backend}, batching=batching)

    write_traces(job, source, load=loader(model, device=device, dtype=model_dtype), plan=plan,
                 result=result)
    return result
