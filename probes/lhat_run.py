"""`python -m probes.run lhat`: the L̂ curve of every trace, written into an HDF5 cache.

For each trace: tokenize and label it, compute L̂_t for t = 0..T with `probes.lhat.lhat_fast`
(optionally re-checking K random prefixes the slow, RaML way), derive the per-token quantities and
store them in the trace's group: `lhat` float32 [T+1], `lhat_delta`, `lhat_rho`, `lhat_log_ratio`
float32 [T] (index i = trajectory token i). An existing cache (e.g. from `cache`) gains these arrays
in its trace groups; a new file gets trace groups with tokens and categories only. Resumable: a
trace that already has `lhat` is skipped.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from probes.errors import ProbesError
from probes.models import LoadedModel, load_model
from probes.traces import DEFAULT_SCAFFOLD

LHAT_ARRAYS = ("lhat", "lhat_delta", "lhat_rho", "lhat_log_ratio")
NO_THINKING_DELIMITER = "Therefore, after all this, I believe the answer is"
"""RaML's no-thinking mode: the trajectory is only this delimiter (after `<think>`)."""


@dataclass(frozen=True, kw_only=True)
class LhatConfig:
    """Settings of an `lhat` run.

    Attributes:
        check_naive: Per trace, re-run this many random prefixes one forward each (the RaML
            method) and record the largest |fast − naive|.
        seed: Seed of the prefix sampling for `check_naive`.
        chunk_size: Prefill chunk (tokens) through the KV cache.
        max_pack_tokens: Tokens per packed forward of scaffold + answer copies.
        limit: Use only the first N traces.
        prompt_format: Prompt format string; None = chat template or the documented default.
        scaffold: The answer scaffold appended after each prefix.
        no_thinking: Replace each trajectory by the NoThinking delimiter (RaML's no-thinking mode),
            for the thinking vs no-thinking comparison.
    """

    check_naive: int = 0
    seed: int = 0
    chunk_size: int = 512
    max_pack_tokens: int = 512
    limit: int | None = None
    prompt_format: str | None = None
    scaffold: str = DEFAULT_SCAFFOLD
    no_thinking: bool = False

    def __post_init__(self) -> None:
        for name in ("check_naive", "chunk_size", "max_pack_tokens"):
            if getattr(self, name) < (0 if name == "check_naive" else 1):
                raise ProbesError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.limit is not None and self.limit < 1:
            raise ProbesError(f"--limit must be at least 1, got {self.limit}")


@dataclass
class LhatRunResult:
    """What an `lhat` run did; `to_dict()` is the CLI's JSON."""

    out: str
    n_traces: int = 0
    n_written: int = 0
    n_skipped: int = 0
    n_too_long: int = 0
    n_bad_lines: int = 0
    seconds: float = 0.0
    naive_max_abs_diff: float | None = None
    n_naive_prefixes: int = 0
    lhat_first_median: float | None = None
    lhat_last_median: float | None = None
    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return asdict(self)


def per_token_arrays(lhat: np.ndarray) -> dict[str, np.ndarray]:
    """L̂ and its per-token derivatives as stored (float32; index i = trajectory token i)."""
    from probes.lhat import delta_lhat, log_ratio, relative_change

    lhat = np.asarray(lhat, np.float64)
    return {
        "lhat": lhat.astype(np.float32),
        "lhat_delta": delta_lhat(lhat).astype(np.float32),
        "lhat_rho": relative_change(lhat).astype(np.float32),
        "lhat_log_ratio": log_ratio(lhat).astype(np.float32),
    }


def _no_thinking(trace):
    """The trace with its trajectory replaced by `<think>` + the NoThinking delimiter."""
    from dataclasses import replace

    return replace(trace, trajectory=f"<think>\n{NO_THINKING_DELIMITER}")


def lhat_traces(
    model: str | LoadedModel,
    traces_path: Path,
    out: Path,
    cfg: LhatConfig,
    *,
    device: str = "auto",
    dtype: str = "float32",
    progress: bool = True,
) -> LhatRunResult:
    """Compute and store the L̂ curve of every trace.

    Args:
        model: A model spec for `load_model`, or a loaded model.
        traces_path: JSONL traces.
        out: The HDF5 cache (created, or extended when it exists).
        cfg: Run settings.
        device: Where the model runs.
        dtype: Model dtype.
        progress: Show a tqdm bar on stderr.

    Returns:
        Counts, timing and (with `check_naive`) the largest |fast − naive| seen.

    Raises:
        ProbesError: Bad input, a cache made with another model / tokenizer / scaffold, or a trace
            whose stored tokens differ from this tokenization.
    """
    from probes.lhat import lhat_fast, lhat_naive
    from probes.trace_arrays import add_trace_arrays
    from probes.traces import read_traces

    t0 = time.perf_counter()
    loaded = model if isinstance(model, LoadedModel) else load_model(model, device=device, dtype=dtype)
    traceset = read_traces(traces_path)
    traces = traceset.traces[: cfg.limit] if cfg.limit is not None else list(traceset.traces)
    if cfg.no_thinking:
        traces = [_no_thinking(t) for t in traces]
    rng = random.Random(cfg.seed)
    diffs: list[float] = []
    n_checked: list[int] = []
    firsts: list[float] = []
    lasts: list[float] = []

    def compute(tt):
        res = lhat_fast(loaded, tt, chunk_size=cfg.chunk_size, max_pack_tokens=cfg.max_pack_tokens)
        arrays = per_token_arrays(res.lhat)
        attrs: dict[str, Any] = {"lhat_method": "packed-kv", "lhat_scaffold": cfg.scaffold}
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
        return arrays, attrs

    run = add_trace_arrays(
        loaded, traces, out, compute, done_key="lhat", command="lhat", traces_path=traces_path,
        n_bad_lines=len(traceset.problems), prompt_format=cfg.prompt_format, scaffold=cfg.scaffold,
        progress=progress,
    )
    return LhatRunResult(
        out=str(out),
        n_traces=run.n_traces,
        n_written=run.n_written,
        n_skipped=run.n_skipped,
        n_too_long=run.n_too_long,
        n_bad_lines=run.n_bad_lines,
        seconds=round(time.perf_counter() - t0, 3),
        naive_max_abs_diff=max(diffs) if diffs else None,
        n_naive_prefixes=sum(n_checked),
        lhat_first_median=float(np.median(firsts)) if firsts else None,
        lhat_last_median=float(np.median(lasts)) if lasts else None,
    )


def format_lhat_run(r: LhatRunResult) -> str:
    """Human summary of a run."""
    lines = [
        f"lhat: {r.n_written} traces written, {r.n_skipped} skipped, {r.n_too_long} too long, "
        f"{r.n_bad_lines} bad lines -> {r.out} ({r.seconds:.1f}s)",
    ]
    if r.lhat_first_median is not None:
        lines.append(
            f"median L̂ with no trajectory {r.lhat_first_median:.3g}, after the full trajectory "
            f"{r.lhat_last_median:.3g} (nats / answer token)"
        )
    if r.naive_max_abs_diff is not None:
        lines.append(
            f"per-prefix re-run check: {r.n_naive_prefixes} prefixes, max |fast - naive| = "
            f"{r.naive_max_abs_diff:.2e} nats"
        )
    return "\n".join(lines)
