"""The machinery both `generate` modes share: the backend, the jobs, the resumable JSONL write loop.

`open_generator` opens the HF or vLLM backend; a `_Job` is one record to generate; `_run` takes the
file's writer lock (`probes.traces.jsonl.Appender`: a second run on one file is refused), checks
that a resumed file comes from the same settings (`_identity`, `_check_identity`), skips the ids it
holds, generates the rest in batches and appends each record as its batch returns, then computes
the sample statistics of the whole file.
`_start` opens the `GenerateResult` and reports bad input lines; `_max_new_tokens` fits the token
limit to the model's context.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from probes.errors import ProbesError
from probes.models.generate import (
    BACKENDS,
    Completion,
    HFGenerator,
    Prompt,
    Request,
    Sampling,
    VllmGenerator,
)
from probes.models.identity import model_label
from probes.models.spec import ModelSpec, model_spec
from probes.pipeline.generate.grade import record_statistics
from probes.pipeline.generate.settings import MAX_DEFAULT_NEW_TOKENS, GenerateConfig, GenerateResult
from probes.pipeline.loop import Log, loader
from probes.traces.jsonl import Appender, Existing, encode

if TYPE_CHECKING:
    from hooks.model import LoadedModel

Generator = Any
"""`HFGenerator` or `VllmGenerator` (`generate(requests, sampling) -> list[Completion]`)."""


@dataclass(frozen=True)
class _Job:
    """One record to generate: its request, prompt and the fields known before generating."""

    request: Request
    prompt: Prompt
    fields: dict[str, Any]


Build = Callable[[_Job, Completion], dict[str, Any]]


def open_generator(model: ModelSpec | LoadedModel | str, *, backend: str = "hf", device: str | None = None,
                   dtype: str | None = None, seed: int = 0) -> Generator:
    """The generation backend for `model` (a spec, or a loaded model for "hf").

    Raises:
        ProbesError: An unknown backend, vLLM absent, or a loaded model given to vLLM.
    """
    spec = model_spec(model, device=device, dtype=dtype)
    if backend == "hf":
        return HFGenerator(loader(spec)())
    if backend != "vllm":
        raise ProbesError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if not isinstance(spec, ModelSpec):
        raise ProbesError("the vLLM backend loads the model itself: pass a model spec, not a loaded model")
    return VllmGenerator(spec.name, dtype=spec.dtype, seed=seed)


def _start(out: str | Path, command: str, bad: Sequence[Any], existing: Existing, say: Log) -> GenerateResult:
    result = GenerateResult(out=str(out), command=command, n_bad_lines=len(bad),
                            bad_lines=[(b.line_no, b.reason) for b in bad],
                            dropped_bytes=existing.dropped_bytes)
    for b in bad[:10]:
        say(f"skipped line {b.line_no}: {b.reason}")
    if len(bad) > 10:
        say(f"... and {len(bad) - 10} more bad lines")
    if existing.dropped_bytes:
        say(f"{out}: dropped an interrupted last line ({existing.dropped_bytes} bytes); it is redone")
    return result


def _identity(generator: Generator, dtype: str | None, cfg: GenerateConfig, variant: str,
              jobs: Sequence[_Job]) -> dict[str, Any]:
    """The settings every record of one file shares (checked on resume)."""

    label = generator.label if generator.backend == "vllm" else model_label(generator.loaded)
    return {"variant": variant, "model": label, "backend": generator.backend,
            "dtype": dtype if generator.backend == "vllm" else generator.loaded.arch.dtype,
            "temperature": cfg.temperature, "top_p": cfg.top_p,
            "max_new_tokens": _max_new_tokens(cfg.max_new_tokens, jobs, generator.n_ctx),
            "seed": cfg.seed, "thinking": cfg.thinking}


def _max_new_tokens(requested: int | None, jobs: Sequence[_Job], n_ctx: int) -> int:
    """The token limit: `requested`, or the default; refused where a prompt leaves less room."""
    if not jobs:
        return requested or MAX_DEFAULT_NEW_TOKENS
    longest = max(jobs, key=lambda j: len(j.request.prompt_ids))
    room = n_ctx - len(longest.request.prompt_ids)
    if room < 1:
        raise ProbesError(f"the prompt of {longest.fields['id']!r} has {len(longest.request.prompt_ids)} "
                          f"tokens and fills the model's context of {n_ctx}; shorten it or leave it out")
    if requested is None:
        return min(MAX_DEFAULT_NEW_TOKENS, room)
    if requested > room:
        raise ProbesError(f"--max-new-tokens {requested} does not fit: the longest prompt "
                          f"({longest.fields['id']!r}, {len(longest.request.prompt_ids)} tokens) leaves "
                          f"{room} of the model's context of {n_ctx}; use --max-new-tokens {room} or less")
    return requested


def _check_identity(out: str | Path, records: Sequence[dict[str, Any]], identity: dict[str, Any]) -> None:
    """Refuse resuming a file whose records come from other settings, naming the first field."""
    for line_no, record in enumerate(records, start=1):
        for key, value in identity.items():
            if record.get(key) != value:
                raise ProbesError(
                    f"{out} record {line_no} ({record.get('id')!r}) has {key}={record.get(key)!r}, this run "
                    f"{value!r}; resume with the settings the file was written with, or choose another "
                    "--out (nothing was written)"
                )


def _run(generator: Generator, jobs: Sequence[_Job], build: Build, identity: dict[str, Any],
         result: GenerateResult, cfg: GenerateConfig, *, resume: bool, t0: float, progress: bool,
         say: Log) -> GenerateResult:
    from tqdm import tqdm

    result.model, result.backend = identity["model"], generator.backend
    result.device, result.max_new_tokens = str(generator.device), identity["max_new_tokens"]
    sampling = Sampling(temperature=cfg.temperature, top_p=cfg.top_p,
                        max_new_tokens=identity["max_new_tokens"], seed=cfg.seed)
    # The file's lock is held from here to the end; what it holds is read again under it (another
    # run may have written it while this one loaded the model: refused, or its records counted).
    with Appender(result.out, fresh=not resume) as appender:
        records = list(appender.existing.records)
        result.dropped_bytes += appender.existing.dropped_bytes
        _check_identity(result.out, records, identity)
        done = {r.get("id") for r in records}
        todo = [j for j in jobs if j.fields["id"] not in done]
        result.n_requested, result.n_skipped = len(jobs), len(jobs) - len(todo)
        say(f"writing {result.out}: {len(todo)} to do ({result.n_skipped} already done), max "
            f"{sampling.max_new_tokens} new tokens, {generator.backend} on {generator.device}")
        bar = tqdm(total=len(todo), unit="sample", desc=result.command, disable=not progress,
                   dynamic_ncols=True, leave=True)
        t_loop = time.perf_counter()
        try:
            for start in range(0, len(todo), cfg.batch_size):
                batch = todo[start: start + cfg.batch_size]
                completions = generator.generate([j.request for j in batch], sampling)
                for job, comp in zip(batch, completions):
                    record = build(job, comp)
                    appender.write(record)
                    records.append(json.loads(encode(record)))  # as a reader will see it
                    result.n_written += 1
                    result.n_tokens += comp.n_tokens
                result.seconds_generate = time.perf_counter() - t_loop
                bar.set_postfix_str(f"{result.tokens_per_s:,.0f} tok/s", refresh=False)
                bar.update(len(batch))
        finally:
            bar.close()
    result.statistics = record_statistics(records)
    result.seconds = time.perf_counter() - t0
    return result
