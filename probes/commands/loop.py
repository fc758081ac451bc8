"""The one resumable per-trace write loop: every command that adds per-trace arrays to a cache
(`cache`, `lhat`, `updates`, and every later one) runs through `write_traces`.

One rule set for all of them:

- **Output.** `--out` must be a file path in an existing folder. An existing `--out` is an error
  unless `--resume` is given (`RESUME_HELP`).
- **Resume.** With `--resume` the file is extended: traces already done (a complete trace group
  for `cache`; the command's last array present for the others) are kept and skipped, an
  interrupted trace group is deleted and redone (and said so), the rest is computed. A file that
  holds activation sites gains arrays only for the traces it already has, so its site layout stays
  uniform.
- **Identity.** The file must come from the same model, tokenizer and lexicon (checked by
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
  (`probes.commands.shards`); without those variables nothing changes.
- **Feedback.** The same progress bar (traces, tokens/s) and the same final summary line
  (`WriteResult.summary`).

Every trace group it creates also gets the label arrays (`probes.traces.labels.label_arrays`), so
`compare` works from any cache.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from probes.arrays import check_declared
from probes.commands.shards import Shard, current_shard
from probes.errors import ProbesError
from probes.models.identity import run_metadata
from probes.traces.categories import categorize, load_lexicon
from probes.traces.labels import LABEL_KEY, label_arrays
from probes.traces.read import read_traces
from probes.traces.tokenize import ANSWER_SUFFIX, DEFAULT_SCAFFOLD, tokenize_traces

if TYPE_CHECKING:
    from hooks.model import LoadedModel
    from probes.traces.categories import Lexicon
    from probes.traces.read import Trace, TraceSet
    from probes.traces.tokenize import TokenizedTrace

RESUME_HELP = (
    "add to an existing --out: traces (and arrays) it holds complete are kept and skipped, an "
    "interrupted trace is redone, the rest is computed; the file must come from the same model, "
    "tokenizer, lexicon and settings. Without --resume an existing --out is an error"
)
"""The one statement of the `--resume` rule (every writing command's `--help` shows it)."""

TOKENIZATION_KEYS: tuple[str, ...] = ("prompt_format", "scaffold", "answer_suffix")
"""Config keys that decide a trace's tokens: every command must use the stored ones."""

Log = Callable[[str], None]


@dataclass
class TraceOutput:
    """What a command computed for one trace.

    Attributes:
        arrays: Per-trace arrays (names declared in `probes.arrays`).
        attrs: Small trace attributes (str / int / float / bool).
        sites: Activation sites (`cache.SiteArray`s), for a new trace group only.
        positions: Token index of each site row.
        n_tokens: Tokens run through the model for it (for tokens/s).
        nbytes: Bytes of site data (for the write rate).
        close: Called after the write (frees memory-mapped outputs).
    """

    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)
    sites: Mapping[str, Any] | None = None
    positions: np.ndarray | None = None
    n_tokens: int = 0
    nbytes: int = 0
    close: Callable[[], None] | None = None


Compute = Callable[["TokenizedTrace"], "TraceOutput | str"]
"""`compute(tokenized_trace)`: the trace's output, or a one-line reason to leave it out."""


@dataclass
class Batching:
    """How a command computes several traces at once (cheap traces: `cache` on short ones).

    Attributes:
        plan: Cuts the traces into batches (lists of indices, in order, each trace once). It must
            depend on the traces alone, so that a resumed or sharded run puts every trace in the
            batch an uninterrupted run does (same shapes, same bits).
        compute: A batch's outputs, one per trace in order (an output or a reason to leave it out).
    """

    plan: Callable[[Sequence[TokenizedTrace]], list[list[int]]]
    compute: Callable[[Sequence[TokenizedTrace]], list[TraceOutput | str]]


@dataclass
class Plan:
    """What a command prepares once the model is loaded.

    Attributes:
        compute: The per-trace computation.
        config: Settings of the command's arrays that need the model to state (e.g. the sites
            resolved to layers), added to `WriteJob.config`.
        info: Informational entries added to `WriteJob.info`.
        batching: Several traces per computation, committed together (None: one at a time).
    """

    compute: Compute
    config: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    batching: Batching | None = None


@dataclass(frozen=True, kw_only=True)
class WriteJob:
    """What a command writes and how it decides what is done.

    Attributes:
        command: Its name (messages, progress bar, summary line).
        out: The cache file.
        resume: Extend an existing `out` (see `RESUME_HELP`).
        overwrite: Replace an existing `out` (library use; not a CLI flag).
        config: The command's settings that change its arrays (stored in `/meta/config` of a new
            file together with the tokenization keys).
        own_keys: Keys of `config` that must equal the stored ones in an existing file.
        done_key: A trace holding this array is done; None: a complete trace group is done.
        info: Informational entries for a new file (device, traces file, ...).
        check_stored: Called with the open reader of an existing `out` before the model runs;
            raises to refuse it (e.g. other `--layers`).
    """

    command: str
    out: Path
    resume: bool = False
    overwrite: bool = False
    config: Mapping[str, Any] = field(default_factory=dict)
    own_keys: tuple[str, ...] = ()
    done_key: str | None = None
    info: Mapping[str, Any] = field(default_factory=dict)
    check_stored: Callable[[Any], None] | None = None


@dataclass
class WriteResult:
    """What one run of the write loop did (commands extend it with their own figures).

    Attributes:
        out: The cache file.
        command: The command.
        n_traces: Traces selected (after `--limit`), before leaving out too-long ones.
        n_written: Traces written in this run.
        n_skipped: Traces already done in the file (resume).
        n_redone: Interrupted trace groups found in the file, deleted and written again.
        n_left_out: Traces the command could not measure, or not in an activation cache.
        n_too_long: Traces longer than the model's context.
        n_bad_lines: JSONL lines skipped as unreadable.
        n_tokens: Tokens run through the model in this run.
        seconds: Wall time of the whole call.
        seconds_loop: Wall time of the compute-and-write loop.
        seconds_write: Time inside the HDF5 writer.
        bytes_sites: Bytes of activation sites written.
        file_bytes: Size of the file at the end.
        bad_lines: (line, reason) of each skipped line.
        too_long: (id, line, n_tokens, limit) of each too-long trace.
        left_out: (id, reason) of each trace left out.
    """

    out: str = ""
    command: str = ""
    n_traces: int = 0
    n_written: int = 0
    n_skipped: int = 0
    n_redone: int = 0
    n_left_out: int = 0
    n_too_long: int = 0
    n_bad_lines: int = 0
    n_tokens: int = 0
    seconds: float = 0.0
    seconds_loop: float = 0.0
    seconds_write: float = 0.0
    bytes_sites: int = 0
    file_bytes: int = 0
    bad_lines: list[tuple[int, str]] = field(default_factory=list)
    too_long: list[tuple[str, int, int, int]] = field(default_factory=list)
    left_out: list[tuple[str, str]] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        """Tokens per second of the compute-and-write loop."""
        return self.n_tokens / self.seconds_loop if self.seconds_loop > 0 else 0.0

    @property
    def write_mb_per_s(self) -> float:
        """Site data written per second inside the HDF5 writer (MB = 1e6 bytes)."""
        return self.bytes_sites / 1e6 / self.seconds_write if self.seconds_write > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict of every field plus `tokens_per_s` and `write_mb_per_s`."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["tokens_per_s"] = round(self.tokens_per_s, 1)
        out["write_mb_per_s"] = round(self.write_mb_per_s, 1)
        for key in ("seconds", "seconds_loop", "seconds_write"):
            out[key] = round(out[key], 3)
        return out

    def summary(self) -> str:
        """The one summary line every writing command ends with."""
        return (
            f"{self.command}: {self.n_written} traces written, {self.n_skipped} already done, "
            f"{self.n_redone} interrupted redone, {self.n_left_out} left out, {self.n_too_long} "
            f"too long, {self.n_bad_lines} bad lines -> {self.out} ({human_size(self.file_bytes)}, "
            f"{self.seconds:.1f}s, {self.tokens_per_s:,.0f} tok/s)"
        )


def human_size(n: float) -> str:
    """Bytes as B / KiB / MiB / GiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def loader(model: str | LoadedModel, *, device: str, dtype: str) -> Callable[[], LoadedModel]:
    """`write_traces`'s `load`: the given model, or `probes.models.load_model(spec)`."""
    def load() -> LoadedModel:
        if isinstance(model, str):
            from probes.models.load import load_model

            return load_model(model, device=device, dtype=dtype)
        return model

    return load


# --------------------------------------------------------------------------------------------------
# Checks that run before the model is loaded


def check_out(out: Path, *, resume: bool, overwrite: bool = False) -> None:
    """Refuse an `--out` that cannot be written as asked (before any work).

    Raises:
        CacheError: A folder, a missing parent folder, or an existing file without `resume`.
    """
    from cache import CacheError

    if not out.parent.is_dir():
        raise CacheError(f"cannot create {out}: folder {out.parent} does not exist; create it "
                         f"first (mkdir -p {out.parent}) or choose another --out")
    name_max = os.pathconf(out.parent, "PC_NAME_MAX")
    if len(out.name.encode("utf-8")) + len(".99999.tmp") > name_max:
        raise CacheError(f"--out name {out.name[:40]!r}... is too long for its folder ({name_max} "
                         f"bytes at most); choose a shorter --out")
    if out.is_dir():
        raise CacheError(f"--out {out} is a directory; give a file path such as {out / 'run.h5'}")
    if out.exists() and not (resume or overwrite):
        raise CacheError(f"{out} already exists; pass --resume to add to it (what it holds "
                         f"complete is kept), or choose another --out")
    target = out if out.exists() else out.parent
    if not os.access(target, os.W_OK):
        raise CacheError(f"cannot write {out}: {'the file' if out.exists() else 'its folder'} is "
                         f"not writable for this user; choose another --out or fix the permissions")


def same_settings(out: Path, done_key: str, own: Mapping[str, Any], what: str,
                  error: type[Exception] = ProbesError) -> Callable[[Any], None]:
    """A `WriteJob.check_stored` for a command that keeps its settings as trace attributes:
    refuses an existing `out` whose first trace holding `done_key` was made with other settings
    (naming every differing one); a cache without the command's arrays yet gains them.

    Args:
        out: The cache (named in the message).
        done_key: The array that marks the command's arrays complete in a trace.
        own: The settings of this run, as stored in the trace attributes.
        what: The arrays' name in the message ("effects arrays").
        error: The error type to raise (a `ProbesError`).
    """
    def check(reader: Any) -> None:
        for tr in reader:
            if done_key in tr.names():
                diff = [f"{k}: stored {tr.attrs.get(k)!r}, given {v!r}" for k, v in own.items()
                        if tr.attrs.get(k) != v]
                if diff:
                    raise error(f"{out} holds {what} made with other settings "
                                f"({'; '.join(diff)}): pass the same flags or write to another "
                                f"--out")
                return

    return check


def check_unique_ids(traceset: TraceSet) -> None:
    """Refuse a traces file that repeats an id (nothing is written), naming both lines."""
    dupes = [bad for bad in traceset.problems if bad.reason.startswith("duplicate id")]
    if dupes:
        first = dupes[0]
        more = f" ({len(dupes) - 1} more repeated ids)" if len(dupes) > 1 else ""
        raise ProbesError(
            f"{traceset.path}:{first.line_no}: {first.reason}{more}; a cache needs unique trace "
            f"ids: fix the input (nothing was written)"
        )


@dataclass
class Stored:
    """What an existing cache holds: its metadata and, per complete trace, tokens and array names."""

    metadata: dict[str, Any]
    traces: dict[str, tuple[np.ndarray, frozenset[str]]]
    has_sites: bool

    @property
    def config(self) -> dict[str, Any]:
        """The stored run config."""
        return dict(self.metadata.get("config", {}))


def read_stored(job: WriteJob) -> Stored | None:
    """The existing `job.out` (None when it is new or replaced); runs `job.check_stored` on it.

    Opening it also reports a locked, truncated, foreign or other-version file before the model
    is loaded.
    """
    from cache import CacheLockedError, check_unlocked, open_cache, store_exists

    if job.overwrite or not (job.out.exists() or (job.resume and store_exists(job.out))):
        return None  # (segments without their index file are replaced unless --resume)
    try:
        if current_shard() is None:
            check_unlocked(job.out, "s")
        with open_cache(job.out) as reader:
            if job.check_stored is not None:
                job.check_stored(reader)
            return Stored(metadata=dict(reader.metadata),
                          traces={tr.id: (np.asarray(tr.tokens), frozenset(tr.names()))
                                  for tr in reader},
                          has_sites=bool(reader.sites))
    except CacheLockedError:
        raise CacheLockedError(
            f"{job.out} is open by another process (HDF5 file lock, errno 11), e.g. another run "
            f"writing it; wait for it to finish, or choose another --out"
        ) from None


def new_file_config(job: WriteJob, *, prompt_format: str | None, scaffold: str) -> dict[str, Any]:
    """The `/meta/config` of a file this job creates: activation-site defaults (none), the
    tokenization, then the command's own settings."""
    return {"sites": {}, "positions": "none", "storage_dtype": None,
            "prompt_format": prompt_format, "scaffold": scaffold, "answer_suffix": ANSWER_SUFFIX,
            **dict(job.config)}


# --------------------------------------------------------------------------------------------------
# The loop


def write_traces(
    job: WriteJob,
    traces_path: str | Path,
    *,
    load: Callable[[], LoadedModel],
    plan: Callable[[LoadedModel], Plan],
    result: WriteResult | None = None,
    lexicon_files: Sequence[str | Path] = (),
    limit: int | None = None,
    strict: bool = False,
    prompt_format: str | None = None,
    scaffold: str = DEFAULT_SCAFFOLD,
    transform: Callable[[Trace], Trace] | None = None,
    progress: bool = False,
    log: Log | None = None,
) -> WriteResult:
    """Read, tokenize, compute and commit every trace of `traces_path` into `job.out`.

    Order: the output path, the traces file (duplicate ids), the lexicon and the existing file are
    checked before `load()` runs, so bad input costs no model load.

    Args:
        job: What is written and how "done" is decided.
        traces_path: JSONL traces.
        load: Loads the model (called once, after the checks).
        plan: Given the model, returns the command's `Plan` (may refuse the model).
        result: The result object to fill (a command's subclass of `WriteResult`).
        lexicon_files: Extra lexicon JSON files merged into the built-in one.
        limit: Use only the first N traces.
        strict: Fail on the first bad JSONL line.
        prompt_format: Prompt template; None = chat template or the documented default.
        scaffold: The answer scaffold.
        transform: Applied to each trace before tokenizing (e.g. the no-thinking variant).
        progress: Show a progress bar on stderr (the CLI passes
            `probes.commands.progress.progress_on(--quiet)`: off when stderr is not a terminal).
        log: Receives one-line messages (skipped lines, redone traces, what is to do).

    Returns:
        `result`, filled.

    Raises:
        ProbesError, CacheError, HooksError: Bad input, a file that cannot take this run, a trace
            whose stored tokens differ (`CacheMismatchError`), an unsupported model.
    """
    from cache import remove_cache, store_bytes

    t_start = time.perf_counter()
    shard = current_shard()
    say = log if log is not None else (lambda _msg: None)
    out = Path(job.out)
    traces_path = Path(traces_path)
    result = result if result is not None else WriteResult()
    result.out, result.command = str(out), job.command

    check_out(out, resume=job.resume, overwrite=job.overwrite)
    traceset = read_traces(traces_path, strict=strict)
    check_unique_ids(traceset)
    result.n_bad_lines = len(traceset.problems)
    result.bad_lines = [(b.line_no, b.reason) for b in traceset.problems]
    _say_each(say, [f"skipped line {b.line_no}: {b.reason}" for b in traceset.problems], "bad lines")
    if not traceset.traces:
        raise ProbesError(f"{traces_path} holds no usable trace ({len(traceset.problems)} bad "
                          f"lines); nothing was written")
    lexicon = load_lexicon(extra=lexicon_files)
    stored = read_stored(job)
    if shard is not None:
        say = _rank_log(say, shard)
        shard.barrier()  # every rank has checked --out before rank 0 creates it

    if shard is not None:
        shard.pin_gpu()
    loaded = load()
    prepared = plan(loaded)

    traces = list(traceset.traces[:limit] if limit is not None else traceset.traces)
    if transform is not None:
        traces = [transform(t) for t in traces]
    result.n_traces = len(traces)
    tokenized, too_long = tokenize_traces(traces, loaded.tokenizer, prompt_format=prompt_format,
                                          scaffold=scaffold, max_tokens=loaded.arch.n_ctx)
    result.n_too_long = len(too_long)
    result.too_long = [(t.trace_id, t.line_no, t.n_tokens, t.limit) for t in too_long]
    _say_each(say, [f"skipped line {t.line_no}: {t.reason}" for t in too_long], "too-long traces")
    if not tokenized:
        raise ProbesError(f"every trace of {traces_path} is longer than the model's context "
                          f"({loaded.arch.n_ctx} tokens); nothing was written")

    config = {**new_file_config(job, prompt_format=prompt_format, scaffold=scaffold),
              **prepared.config}
    meta = run_metadata(loaded, lexicon, config=config,
                        info={"traces_file": str(traces_path), **dict(job.info), **prepared.info})
    if stored is not None:
        # Keys this command does not decide keep their stored values; the tokenization and the
        # command's own keys are this run's, so `open_writer` names any of them that differs
        # (together with model, tokenizer and lexicon) in one error.
        meta["config"] = {**stored.config,
                          **{k: config.get(k) for k in (*TOKENIZATION_KEYS, *job.own_keys)}}

    mode = "overwrite" if job.overwrite else "append"
    if not (job.resume or out.exists()) and (shard is None or shard.rank == 0):
        # Deleting a cache's file deletes the cache: segments left without their index file
        # are not resumed without --resume, but replaced (as a new file would be).
        remove_cache(out)
    batches = ([[tokenized[i] for i in batch] for batch in prepared.batching.plan(tokenized)]
               if prepared.batching is not None else [[tt] for tt in tokenized])
    if shard is not None:
        batches = shard.take(batches)
        tokenized = [tt for batch in batches for tt in batch]
    with _open_store(out, meta, mode, shard) as writer:
        if stored is not None:
            _check_tokens(out, stored, tokenized, traces_path)
        result.n_redone = len(writer.removed_incomplete)
        for tid in writer.removed_incomplete:
            say(f"{out}: trace {tid!r} was interrupted; deleted, it is redone")
        todo: list[tuple[list[TokenizedTrace], set[str]]] = []
        for batch in batches:
            wanted = set()
            for tt in batch:
                reason = _done_or_absent(job, stored, writer, tt.trace.id)
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
                  command=job.command, progress=progress, t_loop=t_loop, say=say)
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
    from cache import open_writer

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


def _check_tokens(out: Path, stored: Stored, tokenized: Iterable[TokenizedTrace],
                  traces_path: Path) -> None:
    """Refuse (before anything is written) a trace whose stored tokens differ."""
    from cache import CacheMismatchError

    for tt in tokenized:
        prior = stored.traces.get(tt.trace.id)
        if prior is not None and not np.array_equal(prior[0], tt.ids):
            raise CacheMismatchError(
                f"{out} holds trace {tt.trace.id!r} with other tokens ({len(prior[0])}) than "
                f"{traces_path}:{tt.trace.line_no} gives now ({tt.n_tokens}); the cache was made "
                f"from other traces or settings: use another --out (nothing was written)"
            )


def _done_or_absent(job: WriteJob, stored: Stored | None, writer: Any, trace_id: str) -> str:
    """"done", a reason to leave the trace out, or "" (to do)."""
    if job.done_key is None:
        return "done" if writer.has_complete(trace_id) else ""
    prior = stored.traces.get(trace_id) if stored is not None else None
    if prior is not None and job.done_key in prior[1]:
        return "done"
    if prior is None and stored is not None and stored.has_sites:
        return "not in the activation cache"
    return ""


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
    elapsed = time.perf_counter() - t_loop
    bar.set_postfix_str(f"{result.n_tokens / max(elapsed, 1e-9):,.0f} tok/s", refresh=False)
    bar.update(1)
