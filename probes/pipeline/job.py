"""The shapes the write loop (`probes.pipeline.loop`) works with: what a command computes for a
trace (`TraceOutput`), what it prepares once the model is loaded (`Plan`, `Batching`), what it
writes (`WriteJob`), and what a run did (`WriteResult`), plus the `--resume` rule's one wording.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from probes.traces.read import Trace
    from probes.traces.tokenize import TokenizedTrace

RESUME_HELP = (
    "add to an existing --out: traces (and arrays) it holds complete are kept and skipped, an "
    "interrupted trace is redone, the rest is computed; the file must come from the same model, "
    "tokenizer, lexicon and settings. Without --resume an existing --out is an error"
)
"""The one statement of the `--resume` rule (every writing command's `--help` shows it)."""

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
        committed: Called once the trace is committed (a command's own counts; a trace of a
            batch that was computed again but already stored is not committed, so not counted).
    """

    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)
    sites: Mapping[str, Any] | None = None
    positions: np.ndarray | None = None
    n_tokens: int = 0
    nbytes: int = 0
    close: Callable[[], None] | None = None
    committed: Callable[[], None] | None = None


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
    """What a command writes, how it decides what is done, and how it reports (the write loop's
    other arguments are the traces, `probes.pipeline.configs.TraceSource`, and the model).

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
        transform: Applied to each trace before tokenizing (e.g. the no-thinking variant).
        progress: Show a progress bar on stderr (the CLI passes
            `probes.pipeline.progress.progress_on(--quiet)`: off when stderr is not a terminal).
        log: Receives one-line messages (skipped lines, redone traces, what is to do).
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
    transform: Callable[[Trace], Trace] | None = None
    progress: bool = False
    log: Log | None = None


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
        too_long: (id, line, n_tokens, limit) of each too-long trace (n_tokens None: left out
            untokenized, its characters alone over what the limit can hold).
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
    too_long: list[tuple[str, int, int | None, int]] = field(default_factory=list)
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


