"""`python -m probes.run lhat`: the L̂ curve of every trace, written into an HDF5 cache.

For each trace: tokenize and label it, compute L̂_t for t = 0..T with `probes.measures.lhat.fast.lhat_fast`
(optionally re-checking K random prefixes the slow, RaML way), derive the per-token quantities and
store them in the trace's group: `lhat` float32 [T+1], `lhat_delta`, `lhat_rho`, `lhat_log_ratio`
float32 [T] (index i = trajectory token i). An existing cache (e.g. from `cache`) gains these arrays
in its trace groups; a new file gets trace groups with tokens and categories only. Resumable: a
trace that already has `lhat` is skipped.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from hooks.model import LoadedModel
from probes.measures.lhat.fast import (
    LHAT_ARRAYS,
    lhat_arrays,
    lhat_fast,
    lhat_naive,
)
from probes.models.spec import ModelSpec
from probes.pipeline.configs import LhatConfig, TraceSource, trace_source
from probes.pipeline.loop import Log, Plan, TraceOutput, WriteJob, WriteResult, loader, write_traces

NAME = "lhat"


DONE_KEY = LHAT_ARRAYS[0]
"""A trace that has this array is skipped on resume."""


NO_THINKING_DELIMITER = "Therefore, after all this, I believe the answer is"
"""RaML's no-thinking mode: the trajectory is only this delimiter (after `<think>`)."""


@dataclass
class LhatRunResult(WriteResult):
    """What an `lhat` run did: the write loop's counts plus the curve figures."""

    naive_max_abs_diff: float | None = None
    n_naive_prefixes: int = 0
    lhat_first_median: float | None = None
    lhat_last_median: float | None = None


def _no_thinking(trace):
    """The trace with its trajectory replaced by `<think>` + the NoThinking delimiter."""

    return replace(trace, trajectory=f"<think>\n{NO_THINKING_DELIMITER}")


def lhat_traces(
    model: ModelSpec | LoadedModel | str,
    traces: TraceSource | str | PathLike[str],
    out: Path,
    cfg: LhatConfig,
    *,
    resume: bool = False,
    device: str | None = None,
    dtype: str | None = None,
    progress: bool = True,
    log: Log | None = None,
) -> LhatRunResult:
    """Compute and store the L̂ curve of every trace through the write loop.

    Args:
        model: A `ModelSpec` (or its name), or a loaded model.
        traces: A `TraceSource`, or the JSONL path (then the trace settings given to `cfg` in
            the older calling convention apply: `probes.pipeline.configs.trace_source`).
        out: The HDF5 cache (created; an existing one is extended only with `resume`).
        cfg: Run settings.
        resume: Extend an existing `out` (`probes.pipeline.loop.RESUME_HELP`).
        device, dtype: Replace the spec's device / dtype (the older calling convention).
        progress: Show a progress bar on stderr.
        log: Receives one-line messages.

    Returns:
        Counts, timing and (with `check_naive`) the largest |fast − naive| seen.

    Raises:
        ProbesError, CacheError: Bad input, a cache made with another model / tokenizer /
            scaffold, or a trace whose stored tokens differ from this tokenization.
    """
    rng = random.Random(cfg.seed)
    diffs: list[float] = []
    n_checked: list[int] = []
    firsts: list[float] = []
    lasts: list[float] = []
    source = trace_source(traces, cfg)
    job = WriteJob(command=NAME, out=Path(out), resume=resume, done_key=DONE_KEY,
                   transform=_no_thinking if cfg.no_thinking else None, progress=progress,
                   log=log)

    def plan(loaded: LoadedModel) -> Plan:
        def compute(tt) -> TraceOutput:
            res = lhat_fast(loaded, tt, chunk_size=cfg.chunk_size,
                            max_pack_tokens=cfg.max_pack_tokens)
            attrs: dict[str, Any] = {"lhat_method": "packed-kv", "lhat_scaffold": source.scaffold}
            if cfg.check_naive:
                n_t = len(res.lhat)
                check = sorted(rng.sample(range(n_t), min(cfg.check_naive, n_t)))
                naive = lhat_naive(loaded, tt, ts=check)
                diff = float(np.max(np.abs(naive - res.lhat[check].astype(np.float64))))
                diffs.append(diff)
                n_checked.append(len(check))
                attrs["lhat_naive_max_abs_diff"] = diff
            firsts.append(float(res.lhat[0]))
            lasts.append(float(res.lhat[-1]))
            return TraceOutput(arrays=lhat_arrays(res.lhat), attrs=attrs)

        return Plan(compute)

    result = write_traces(job, source, load=loader(model, device=device, dtype=dtype),
                          plan=plan, result=LhatRunResult())
    result.naive_max_abs_diff = max(diffs) if diffs else None
    result.n_naive_prefixes = sum(n_checked)
    result.lhat_first_median = float(np.median(firsts)) if firsts else None
    result.lhat_last_median = float(np.median(lasts)) if lasts else None
    return result
