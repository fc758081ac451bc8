"""The one resumable per-trace write loop: every command that adds per-trace arrays to a cache
(`cache`, `lhat`, `updates`, and every later one) runs through `write_traces`.

One rule set for all of them:
- **Output.** `--out` must be a file path in an existing folder. An existing `--out` is an error
  unless `--resume` is given (`RESUME_HELP`); checked before the model loads and again under the
  writer lock after it (`open_writer` mode "create"), so a second run started on the same new
  `--out` is refused and leaves the first one's store as it is.
- **Resume.** With `--resume` the file is extended: traces already done (a complete trace group
  for `cache`; the command's last array present for the others) are kept and skipped, an
  interrupted trace group is deleted and redone (and said so), the rest is computed. A file that
  holds activation sites gains arrays only for the traces it already has, so its site layout stays
  uniform.
- **Identity.** The file must come from the same model (path and weights fingerprint,
  `probes.models.identity.weights_fingerprint`; a file written before fingerprints were recorded
  is resumed, saying its weights are not checked), tokenizer and lexicon (checked by
  `cache.open_writer`), the same tokenization (`TOKENIZATION_KEYS`) and the same settings of the
  command's own arrays (`WriteJob.own_keys`, plus `WriteJob.check_stored`); otherwise one error
  names the field that differs.
- **Tokens.** Every stored trace must have exactly the tokens this run gives it
  (`cache.CacheMismatchError`, before anything is written).
- **Input.** A repeated trace id is refused before anything is written, naming both lines; bad
  lines and traces over the model's context are reported one per line with their line number and
  reason (`--strict` turns the first bad line into an error).
- **Failures.** A write the disk refuses (full, `ulimit -f`, I/O error) ends the run with one
  `cache.CacheWriteError` line naming the file, the cause and the fix; every trace committed
  before is kept (the store is segmented, cache/SCHEMA.md#segmented-store) and `--resume` finishes.
- **Processes.** Under `torchrun --nproc-per-node N` (torch.distributed's `RANK`/`WORLD_SIZE`),
  rank r takes traces r, r+N, ... and writes its own shard of the one store at `--out`
  (`probes.pipeline.shards`); without those variables nothing changes.
- **Feedback.** The same progress bar (traces, tokens/s) and the same final summary line
  (`WriteResult.summary`).

Every trace group it creates also gets the label arrays (`probes.traces.labels.label_arrays`), so
`compare` works from any cache.

Here: the loop itself (`write_traces`) and `loader`; the shapes it works with are in
`probes.pipeline.job`, its checks in `probes.pipeline.checks` (all importable from
here).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cache import check_identity, open_writer, remove_cache, store_bytes, store_exists
from probes.arrays import check_declared
from probes.errors import ProbesError
from probes.models.identity import run_metadata
from probes.models.load import load_model
from probes.models.spec import ModelSpec, model_spec
from probes.pipeline.checks import (
    TOKENIZATION_KEYS,
    Stored,
    check_out,
    check_tokens,
    check_unique_ids,
    done_or_absent,
    new_file_config,
    read_stored,
    same_settings,
)
from probes.pipeline.configs import TraceSource, trace_source
from probes.pipeline.job import (
    RESUME_HELP,
    Batching,
    Compute,
    Log,
    Plan,
    TraceOutput,
    WriteJob,
    WriteResult,
    human_size,
)
from probes.pipeline.progress import raise_if_interrupted
from probes.pipeline.shards import Shard, current_shard
from probes.traces.categories import categorize, load_lexicon
from probes.traces.labels import LABEL_KEY, label_arrays
from probes.traces.tokenize import tokenize_traces

MODEL_KEYS = ("model", "architecture", "model_dtype", "weight_convention", "tokenizer_fingerprint",
              "lexicon_fingerprint", "category_codes")
"""The identity keys known once the model is loaded: compared before `Plan` is made."""

if TYPE_CHECKING:
    from hooks.model import LoadedModel
    from probes.traces.categories import Lexicon
    from probes.traces.tokenize import TokenizedTrace

__all__ = [
    "RESUME_HELP", "TOKENIZATION_KEYS", "Batching", "Compute", "Log", "Plan", "Stored",
    "TraceOutput", "TraceSource", "WriteJob", "WriteResult", "check_out", "check_unique_ids", "human_size",
    "loader", "new_file_config", "read_stored", "same_settings", "trace_source", "write_traces",
]


def loader(model: ModelSpec | LoadedModel | str, *, device: str | None = None,
           dtype: str | None = None) -> Callable[[], LoadedModel]:
    """`write_traces`'s `load`: the given model, or `load_model(spec)` (a name, with the older
    `device=` / `dtype=` keywords, becomes a spec: `probes.models.spec.model_spec`)."""
    spec = model_spec(model, device=device, dtype=dtype)

    def load() -> LoadedModel:
        return load_model(spec) if isinstance(spec, ModelSpec) else spec

    return load


# --------------------------------------------------------------------------------------------------
# The loop


def write_traces(
    job: WriteJob,
    source: TraceSource,
    *,
    load: Callable[[], LoadedModel],
    plan: Callable[[LoadedModel], Plan],
    result: WriteResult | None = None,
) -> WriteResult:
    """Read, tokenize, compute and commit every trace of `source` into `job.out`.

    Order: the output path, the traces file (duplicate ids), the lexicon and the existing file are
    checked before `load()` runs, so bad input costs no model load.

    Args:
        job: What is written, how "done" is decided, and the run's feedback (`job.progress`,
            `job.log`) and per-trace `job.transform`.
        source: The traces file, which of its traces, the lexicon and the tokenization.
        load: Loads the model (called once, after the checks).
        plan: Given the model, returns the command's `Plan` (may refuse the model).
        result: The result object to fill (a command's subclass of `WriteResult`).

    Returns:
        `result`, filled.

    Raises:
        ProbesError, CacheError, HooksError: Bad input, a file that cannot take this run, a trace
            whose stored tokens differ (`CacheMismatchError`), an unsupported model.
    """

    t_start = time.perf_counter()
    shard = current_shard()
    say = job.log if job.log is not None else (lambda _msg: None)
    out = Path(job.out)
    traces_path = source.path
    result = result if result is not None else WriteResult()
    result.out, result.command = str(out), job.command

    check_out(out, resume=job.resume, overwrite=job.overwrite)
    traceset = source.read()
    check_unique_ids(traceset)
    result.n_bad_lines = len(traceset.problems)
    result.bad_lines = [(b.line_no, b.reason) for b in traceset.problems]
    _say_each(say, [f"skipped line {b.line_no}: {b.reason}" for b in traceset.problems], "bad lines")
    if not traceset.traces:
        raise ProbesError(f"{traces_path} holds no usable trace ({len(traceset.problems)} bad "
                          f"lines); nothing was written")
    lexicon = load_lexicon(extra=source.lexicon)
    stored = read_stored(job)
    if stored is not None and "weights_fingerprint" not in stored.metadata:
        say(f"{out} records no weights fingerprint (written before they were recorded): this "
            f"model's weights are not checked against it, only its path, tokenizer and settings")
    # Segments left without their index file (a deleted cache) are replaced, not resumed, unless
    # --resume: decided now, so that a store another run creates while the model loads is never
    # taken for them (it is refused under the writer lock instead, `open_writer` mode "create").
    leftover = not (job.resume or job.overwrite) and store_exists(out)
    if shard is not None:
        say = _rank_log(say, shard)
        shard.barrier()  # every rank has checked --out before rank 0 creates it

    if shard is not None:
        shard.pin_gpu()
    loaded = load()
    if stored is not None:  # the model, before `plan` (which may pass over every trace)

        check_identity(out, stored.metadata, run_metadata(loaded, lexicon, config={}),
                       keys=MODEL_KEYS)
    prepared = plan(loaded)

    traces = list(traceset.traces[:source.limit] if source.limit is not None else traceset.traces)
    if job.transform is not None:
        traces = [job.transform(t) for t in traces]
    result.n_traces = len(traces)
    tokenized, too_long = tokenize_traces(traces, loaded.tokenizer,
                                          prompt_format=source.prompt_format,
                                          scaffold=source.scaffold, max_tokens=loaded.arch.n_ctx)
    result.n_too_long = len(too_long)
    result.too_long = [(t.trace_id, t.line_no, t.n_tokens, t.limit) for t in too_long]
    _say_each(say, [f"skipped line {t.line_no}: {t.reason}" for t in too_long], "too-long traces")
    if not tokenized:
        raise ProbesError(f"every trace of {traces_path} is longer than the model's context "
                          f"({loaded.arch.n_ctx} tokens); nothing was written")

    config = {**new_file_config(job, prompt_format=source.prompt_format, scaffold=source.scaffold),
              **prepared.config}
    meta = run_metadata(loaded, lexicon, config=config,
                        info={"traces_file": str(traces_path), **dict(job.info), **prepared.info})
    if stored is not None:
        # Keys this command does not decide keep their stored values; the tokenization and the
        # command's own keys are this run's, so `open_writer` names any of them that differs
        # (together with model, tokenizer and lexicon) in one error.
        meta["config"] = {**stored.config,
                          **{k: config.get(k) for k in (*TOKENIZATION_KEYS, *job.own_keys)}}

    mode = "overwrite" if job.overwrite else "append" if job.resume else "create"
    if leftover and (shard is None or shard.rank == 0):
        remove_cache(out)
    batches = ([[tokenized[i] for i in batch] for batch in prepared.batching.plan(tokenized)]
               if prepared.batching is not None else [[tt] for tt in tokenized])
    if shard is not None:
        batches = shard.take(batches)
        tokenized = [tt for batch in batches for tt in batch]
    with _open_store(out, meta, mode, shard) as writer:
        if stored is not None:
            check_tokens(out, stored, tokenized, traces_path)
        result.n_redone = len(writer.removed_incomplete)
        for tid in writer.removed_incomplete:
            say(f"{out}: trace {tid!r} was interrupted; deleted, it is redone")
        todo: list[tuple[list[TokenizedTrace], set[str]]] = []
        for batch in batches:
            wanted = set()
            for tt in batch:
                reason = done_or_absent(job, stored, writer, tt.trace.id)
                if reason == "done":
                    result.n_skipped += 1
                elif reason:
                    _leave_out(result, tt.trace.id, reason)
                else:
                    wanted.add(tt.trace.id)
            if wanted:  # the whole batch is computed again: its traces keep their bits
                todo.append((batch, wanted))
        if result.left_out:
            say(f"{len(result.left_out)} traces are not in the activation cache {out}; "
                f"{job.command} adds arrays only to the traces it holds")
        n_todo = sum(len(wanted) for _, wanted in todo)
        say(f"writing {out}: {n_todo} traces to do ({result.n_skipped} already done, "
            f"{result.n_redone} interrupted redone, {result.n_too_long} too long), "
            f"{loaded.device}")
        t_loop = time.perf_counter()
        try:
            _loop(writer, todo, prepared, stored, lexicon, loaded, traces_path, result,
                  command=job.command, progress=job.progress, t_loop=t_loop, say=say)
        finally:
            result.seconds_loop = time.perf_counter() - t_loop
        if shard is not None:
            _close_shard(writer, shard)
    result.file_bytes = store_bytes(out)
    result.seconds = time.perf_counter() - t_start
    return result


@contextmanager
def _open_store(out: Path, meta: dict[str, Any], mode: str, shard: Shard | None) -> Iterator[Any]:
    """`open_writer` for one process, or for one rank of a distributed run (own shard; rank 0
    creates the store and keeps the index, the others open it after rank 0 has)."""

    if shard is None:
        with open_writer(out, metadata=meta, mode=mode) as writer:
            yield writer
        return
    if shard.rank != 0:
        shard.barrier()
    with open_writer(out, metadata=meta, mode=mode if shard.rank == 0 else "append",
                     shard=shard.name, index=shard.rank == 0) as writer:
        if shard.rank == 0:
            shard.barrier()
        yield writer


def _close_shard(writer: Any, shard: Shard) -> None:
    """End a rank's part: the others close, then rank 0 writes the index over every shard."""
    if shard.rank != 0:
        writer.close()
    shard.barrier()
    if shard.rank == 0:
        writer.close()
    shard.finish()


def _rank_log(say: Log, shard: Shard) -> Log:
    return lambda msg: say(f"[rank {shard.rank}/{shard.world}] {msg}")


def _say_each(say: Log, lines: Sequence[str], what: str, limit: int = 10) -> None:
    for line in lines[:limit]:
        say(line)
    if len(lines) > limit:
        say(f"... and {len(lines) - limit} more {what}")


def _leave_out(result: WriteResult, trace_id: str, reason: str) -> None:
    result.n_left_out += 1
    result.left_out.append((trace_id, reason))


def _loop(writer: Any, todo: Sequence[tuple[list[TokenizedTrace], set[str]]], prepared: Plan,
          stored: Stored | None, lexicon: Lexicon, loaded: LoadedModel, traces_path: Path,
          result: WriteResult, *, command: str, progress: bool, t_loop: float, say: Log) -> None:
    """Compute every batch and commit its wanted traces: new traces of a batch in one segment,
    arrays added to stored traces one commit each."""
    from tqdm import tqdm

    bar = tqdm(total=sum(len(wanted) for _, wanted in todo), unit="trace", desc=command,
               disable=not progress, dynamic_ncols=True, leave=True)
    try:
        for batch, wanted in todo:
            raise_if_interrupted()  # a Ctrl-C swallowed by a finalizer stops the run here
            if len(batch) == 1 or prepared.batching is None:
                outputs: list[TraceOutput | str] = [prepared.compute(tt) for tt in batch]
            else:
                outputs = prepared.batching.compute(batch)
            done = [(tt, output) for tt, output in zip(batch, outputs, strict=True)
                    if tt.trace.id in wanted]
            try:
                new, counted = [], []
                for tt, output in done:
                    if isinstance(output, str):
                        _leave_out(result, tt.trace.id, output)
                        say(f"left out trace {tt.trace.id!r} (line {tt.trace.line_no}): {output}")
                        bar.update(1)
                        continue
                    prior = stored.traces.get(tt.trace.id) if stored is not None else None
                    cats = categorize(tt, lexicon)
                    arrays = dict(output.arrays)
                    if prior is None or LABEL_KEY not in prior[1]:
                        arrays.update(label_arrays(tt, cats, loaded.tokenizer))
                    check_declared(arrays, command)
                    if prior is None:
                        new.append(dict(
                            trace_id=tt.trace.id, tokens=tt.ids, category=cats.category,
                            spans=tt.spans, positions=output.positions, sites=output.sites,
                            arrays=arrays,
                            text={"question": tt.trace.question, "answer": tt.trace.answer},
                            source=f"{traces_path.name}:{tt.trace.line_no}", attrs=output.attrs,
                        ))
                        counted.append((tt, output))
                    else:
                        t_write = time.perf_counter()
                        writer.add_to_trace(tt.trace.id, arrays, attrs=output.attrs)
                        result.seconds_write += time.perf_counter() - t_write
                        _count(result, tt, output, bar, t_loop)
                if new:
                    t_write = time.perf_counter()
                    writer.write_traces(new)
                    result.seconds_write += time.perf_counter() - t_write
                    for tt, output in counted:
                        _count(result, tt, output, bar, t_loop)
            finally:
                for output in outputs:
                    if not isinstance(output, str) and output.close is not None:
                        output.close()
    finally:
        bar.close()


def _count(result: WriteResult, tt: TokenizedTrace, output: TraceOutput, bar: Any,
           t_loop: float) -> None:
    """Count one committed trace (result figures, progress bar)."""
    result.n_written += 1
    result.n_tokens += output.n_tokens or tt.n_tokens
    result.bytes_sites += output.nbytes
    if output.committed is not None:
        output.committed()
    elapsed = time.perf_counter() - t_loop
    bar.set_postfix_str(f"{result.n_tokens / max(elapsed, 1e-9):,.0f} tok/s", refresh=False)
    bar.update(1)
