"""`python -m probes.run generate`: sample k graded trajectories per question from your own model.

`generate --model M --questions Q.jsonl --n K --out traces.jsonl` draws K samples per question
(`probes.traces.questions`) and writes one trace record per sample, which `lhat`, `updates`,
`cache`, `grade` and the rest read as is:

- `id` (`"<question id>-s<sample>"`), `group` (the question's id), `sample` (0..K-1), `variant`
  ("sample"), `question`, `answer` (gold);
- `trajectory`: the generated text up to and including the first `</think>` (all of it when there
  is none), preceded by what the generation prompt holds beyond the toolkit's default prompt (a
  `<think>` the chat template opens, the empty think block of `--no-thinking`), so that default
  prompt + trajectory is the context the model saw; `response`: the text after that `</think>`;
- `model_answer` and `correct` (`probes.traces.grading` on trajectory + response against `answer`),
  `finish_reason` ("stop": a stop token; "length": `--max-new-tokens` reached, i.e. truncated),
  `n_tokens` (generated tokens, the stop token included), `prompt` (the generation prompt text);
- the run's identity: `model`, `backend`, `dtype`, `temperature`, `top_p`, `max_new_tokens`,
  `seed`, `thinking`, `grade_method`, plus `sample_seed` (this sample's own seed) and `device`.

`--thinking` (default) uses the chat template as it is; `--no-thinking` the template's thinking
switch (`enable_thinking=False`) where it has one, else an empty think block (`<think>\\n\\n</think>`)
after the prompt (`probes.models.generate.build_prompt`).

`generate --summarize FROM.jsonl` instead asks the model to summarise the reasoning of every trace
of FROM (its trajectory up to `</think>`, or up to its last `\\boxed{` without one: the answer is
left out) with `--summary-prompt` (`DEFAULT_SUMMARY_PROMPT`) and writes each summary as a trace of
variant "summary" with the source's `group` and `sample` (and `source_id`), its trajectory wrapped
like the source's (`<think>\\n...\\n</think>`), so an efficiency comparison can pair the two.

Streamed and resumable: records are appended one whole line at a time (`probes.traces.jsonl`);
with `--resume` the (question, sample) pairs already in `--out` are skipped, an interrupted last
line is dropped and redone, and `--n` may grow. Every sample has its own seed, derived from
`--seed` and its id (`probes.models.generate.sample_seed`), so a seeded run gives the same samples
on the same device and backend however it is batched or resumed. The run ends with the sample
statistics of the whole file (`analyses.sampling`): accuracy, Pass@k, mG-Pass@k, lengths and
truncation, with CIs over questions.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from probes.commands import flags
from probes.commands.grade import format_statistics, record_statistics
from probes.commands.loop import Log, loader
from probes.commands.progress import progress_on
from probes.errors import ProbesError
from probes.jsonable import jsonable
from probes.models.generate import (
    BACKENDS,
    Completion,
    HFGenerator,
    Prompt,
    Request,
    Sampling,
    VllmGenerator,
    build_prompt,
    prompt_ids,
    require_vllm,
    sample_seed,
    split_trajectory,
)
from probes.traces.grading import DEFAULT_GRADE_METHOD, GRADE_METHODS, THINK_CLOSE, grade
from probes.traces.jsonl import Appender, Existing, open_out
from probes.traces.questions import read_questions
from probes.traces.read import THINK_OPEN, read_traces

if TYPE_CHECKING:
    from hooks.model import LoadedModel

NAME = "generate"


DEFAULT_TEMPERATURE = 0.6


DEFAULT_TOP_P = 0.95
"""DeepSeek-R1's and Qwen3's recommended sampling for reasoning (temperature 0 = greedy)."""


DEFAULT_BATCH_SIZE = 8


MAX_DEFAULT_NEW_TOKENS = 4096
"""Without `--max-new-tokens`: this many, or what the model's context leaves after the longest prompt."""


SAMPLE_VARIANT = "sample"


SUMMARY_VARIANT = "summary"


DEFAULT_SUMMARY_PROMPT = (
    "Summarize the reasoning below in a few sentences. Keep the steps that lead to the result and "
    "drop repetitions, false starts and checks. Do not state the final answer.\n\n"
    "Question: {question}\n\nReasoning:\n{trajectory}"
)
"""The `--summary-prompt` default: the user message; `{trajectory}` is the source's reasoning without
its answer, `{question}` its question."""


Generator = Any
"""`HFGenerator` or `VllmGenerator` (`generate(requests, sampling) -> list[Completion]`)."""


@dataclass(frozen=True, kw_only=True)
class GenerateConfig:
    """Settings of a `generate` run (ranges are checked by the parser).

    Attributes:
        n: Samples per question (questions mode).
        temperature: Softmax temperature (0 = greedy).
        top_p: Nucleus sampling mass.
        max_new_tokens: Most tokens per sample; None = `MAX_DEFAULT_NEW_TOKENS` or what the
            model's context leaves after the longest prompt, whichever is smaller.
        seed: The run's seed (each sample derives its own).
        batch_size: Requests per generate call; each call's records are written when it returns.
        thinking: The chat template's thinking mode (see the module docstring).
        grade_method: `probes.traces.grading.GRADE_METHODS`.
        limit: Use only the first N questions (or traces to summarise).
        strict: Fail on the first bad JSONL line.
        summary_prompt: The summarising user message (summarize mode).
    """

    n: int = 1
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P
    max_new_tokens: int | None = None
    seed: int = 0
    batch_size: int = DEFAULT_BATCH_SIZE
    thinking: bool = True
    grade_method: str = DEFAULT_GRADE_METHOD
    limit: int | None = None
    strict: bool = False
    summary_prompt: str = DEFAULT_SUMMARY_PROMPT


@dataclass
class GenerateResult:
    """What a `generate` run did.

    Attributes:
        out: The JSONL file.
        command: "generate" or "summarize".
        model: The model as recorded.
        backend: "hf" or "vllm".
        device: Where it ran.
        max_new_tokens: The token limit used.
        n_inputs: Questions (or traces to summarise) selected, after `--limit`.
        n_requested: Samples asked for (inputs x n).
        n_written: Records written in this run.
        n_skipped: Records already in the file (resume).
        dropped_bytes: Bytes of an interrupted last line cut off the file (resume).
        n_bad_lines: Input lines skipped.
        bad_lines: (line, reason) of each.
        n_tokens: Tokens generated in this run.
        seconds: Wall time of the whole call.
        seconds_generate: Wall time of the generate-and-write loop.
        statistics: Sample statistics of every graded record in the file (`grade.record_statistics`).
    """

    out: str = ""
    command: str = NAME
    model: str = ""
    backend: str = ""
    device: str = ""
    max_new_tokens: int = 0
    n_inputs: int = 0
    n_requested: int = 0
    n_written: int = 0
    n_skipped: int = 0
    dropped_bytes: int = 0
    n_bad_lines: int = 0
    bad_lines: list[tuple[int, str]] = field(default_factory=list)
    n_tokens: int = 0
    seconds: float = 0.0
    seconds_generate: float = 0.0
    statistics: dict[str, Any] | None = None

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens per second of the generate-and-write loop."""
        return self.n_tokens / self.seconds_generate if self.seconds_generate > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: every field plus `tokens_per_s`."""
        return jsonable({**asdict(self), "tokens_per_s": round(self.tokens_per_s, 1)})

    def summary(self) -> str:
        """The one summary line of the run."""
        what = "samples" if self.command == NAME else "summaries"
        return (f"{self.command}: {self.n_written} {what} written, {self.n_skipped} already done, "
                f"{self.n_bad_lines} bad lines -> {self.out} ({self.seconds:.1f}s, "
                f"{self.tokens_per_s:,.0f} tok/s, {self.backend} on {self.device})")


@dataclass(frozen=True)
class _Job:
    """One record to generate: its request, prompt and the fields known before generating."""

    request: Request
    prompt: Prompt
    fields: dict[str, Any]


Build = Callable[[_Job, Completion], dict[str, Any]]


def open_generator(model: str | LoadedModel, *, backend: str = "hf", device: str = "auto",
                   dtype: str = "float32", seed: int = 0) -> Generator:
    """The generation backend for `model` (a spec, or a loaded model for "hf").

    Raises:
        ProbesError: An unknown backend, vLLM absent, or a loaded model given to vLLM.
    """
    if backend == "hf":
        return HFGenerator(loader(model, device=device, dtype=dtype)())
    if backend != "vllm":
        raise ProbesError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if not isinstance(model, str):
        raise ProbesError("the vLLM backend loads the model itself: pass a model spec, not a loaded model")
    return VllmGenerator(model, dtype=dtype, seed=seed)


def generate_samples(
    model: str | LoadedModel,
    questions_path: str | Path,
    out: str | Path,
    cfg: GenerateConfig,
    *,
    resume: bool = False,
    backend: str = "hf",
    device: str = "auto",
    dtype: str = "float32",
    progress: bool = True,
    log: Log | None = None,
) -> GenerateResult:
    """Sample `cfg.n` graded trajectories per question into `out` (see the module docstring).

    Args:
        model: A model spec, or a loaded model (HF backend).
        questions_path: JSONL questions (`probes.traces.questions.read_questions`).
        out: The JSONL output (created; an existing one is extended only with `resume`).
        cfg: Run settings.
        resume: Extend an existing `out`: pairs it holds are skipped.
        backend: "hf" or "vllm".
        device: Where the HF model runs.
        dtype: Model dtype.
        progress: Show a progress bar on stderr.
        log: Receives one-line messages.

    Returns:
        Counts, timing and the statistics of the whole file.

    Raises:
        ProbesError: Bad input, vLLM absent, an `out` from other settings, prompts too long.
    """
    t0 = time.perf_counter()
    say = log if log is not None else (lambda _msg: None)
    if backend == "vllm":
        require_vllm()
    questions, bad = read_questions(questions_path, strict=cfg.strict)
    questions = questions[: cfg.limit] if cfg.limit is not None else questions
    existing = open_out(out, resume=resume)
    result = _start(out, NAME, bad, existing, say)
    generator = open_generator(model, backend=backend, device=device, dtype=dtype, seed=cfg.seed)
    tok = generator.tokenizer
    jobs = []
    for q in questions:
        prompt = build_prompt(q.question, tok, thinking=cfg.thinking)
        ids = prompt_ids(prompt.text, tok)
        for s in range(cfg.n):
            key = f"{q.id}-s{s}"
            jobs.append(_Job(Request(key, ids, sample_seed(cfg.seed, key)), prompt,
                             {"id": key, "group": q.id, "sample": s, "variant": SAMPLE_VARIANT,
                              "question": q.question, "answer": q.answer}))
    result.n_inputs = len(questions)
    identity = {**_identity(generator, dtype, cfg, SAMPLE_VARIANT, jobs),
                "grade_method": cfg.grade_method}

    def build(job: _Job, comp: Completion) -> dict[str, Any]:
        trajectory, response = split_trajectory(job.prompt.trajectory_prefix + comp.text)
        g = grade(trajectory + response, job.fields["answer"], method=cfg.grade_method)
        return {**job.fields, "model_answer": g.model_answer, "correct": g.correct,
                "finish_reason": comp.finish_reason, "n_tokens": comp.n_tokens,
                "trajectory": trajectory, "response": response, "prompt": job.prompt.text,
                **identity, "sample_seed": job.request.seed, "device": str(generator.device)}

    return _run(generator, jobs, build, identity, existing, result, cfg, t0=t0, progress=progress, say=say)


def summarize_traces(
    model: str | LoadedModel,
    traces_path: str | Path,
    out: str | Path,
    cfg: GenerateConfig,
    *,
    resume: bool = False,
    backend: str = "hf",
    device: str = "auto",
    dtype: str = "float32",
    progress: bool = True,
    log: Log | None = None,
) -> GenerateResult:
    """Summarise the reasoning of every trace of `traces_path` into `out` (variant "summary").

    Same arguments as `generate_samples` (`cfg.n` and `cfg.grade_method` unused; summaries are not
    graded). Raises as it does, and for a `cfg.summary_prompt` without `{trajectory}`.
    """
    t0 = time.perf_counter()
    say = log if log is not None else (lambda _msg: None)
    check_summary_prompt(cfg.summary_prompt)
    if backend == "vllm":
        require_vllm()
    traceset = read_traces(traces_path, strict=cfg.strict)
    traces = traceset.traces[: cfg.limit] if cfg.limit is not None else traceset.traces
    existing = open_out(out, resume=resume)
    result = _start(out, "summarize", traceset.problems, existing, say)
    generator = open_generator(model, backend=backend, device=device, dtype=dtype, seed=cfg.seed)
    tok = generator.tokenizer
    jobs = []
    for t in traces:
        message = cfg.summary_prompt.format(question=t.question, trajectory=reasoning_of(t.trajectory))
        prompt = build_prompt(message, tok, thinking=cfg.thinking)
        key = f"{t.id}-{SUMMARY_VARIANT}"
        jobs.append(_Job(Request(key, prompt_ids(prompt.text, tok), sample_seed(cfg.seed, key)), prompt,
                         {"id": key, "group": t.meta.get("group", t.id), "sample": t.meta.get("sample", 0),
                          "variant": SUMMARY_VARIANT, "source_id": t.id, "question": t.question,
                          "answer": t.answer, "source_n_tokens": t.meta.get("n_tokens")}))
    result.n_inputs = len(traces)
    identity = {**_identity(generator, dtype, cfg, SUMMARY_VARIANT, jobs),
                "summary_prompt": cfg.summary_prompt}
    wrap = {t.id: t.trajectory.lstrip().startswith(THINK_OPEN) for t in traces}

    def build(job: _Job, comp: Completion) -> dict[str, Any]:
        text = job.prompt.trajectory_prefix + comp.text
        summary = (split_trajectory(text)[1] if THINK_CLOSE in text else text).strip()
        trajectory = f"{THINK_OPEN}\n{summary}\n{THINK_CLOSE}" if wrap[job.fields["source_id"]] else summary
        return {**job.fields, "trajectory": trajectory, "finish_reason": comp.finish_reason,
                "n_tokens": comp.n_tokens, "prompt": job.prompt.text, **identity,
                "sample_seed": job.request.seed, "device": str(generator.device)}

    return _run(generator, jobs, build, identity, existing, result, cfg, t0=t0, progress=progress, say=say)


def reasoning_of(trajectory: str) -> str:
    """A trajectory's reasoning without its answer: the text before the first `</think>`, or
    without one before the last `\\boxed{`; the opening `<think>` removed."""
    head, sep, _ = trajectory.partition(THINK_CLOSE)
    if not sep:
        boxed = list(re.finditer(r"\\boxed\s*\{", trajectory))
        head = trajectory[: boxed[-1].start()] if boxed else trajectory
    head = head.strip()
    return head[len(THINK_OPEN):].strip() if head.startswith(THINK_OPEN) else head


def check_summary_prompt(template: str) -> None:
    """Refuse a summary prompt without `{trajectory}` or with fields other than it and `{question}`.

    Raises:
        ProbesError: Naming the problem.
    """
    if "{trajectory}" not in template:
        raise ProbesError(f"--summary-prompt {template!r} has no '{{trajectory}}' field; add it where "
                          "the reasoning goes")
    try:
        template.format(question="", trajectory="")
    except (KeyError, IndexError, ValueError) as exc:
        raise ProbesError(f"--summary-prompt {template!r} cannot be filled with only {{question}} and "
                          f"{{trajectory}} ({exc!r}); write literal braces as '{{{{' and '}}}}'") from None


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


def _identity(generator: Generator, dtype: str, cfg: GenerateConfig, variant: str,
              jobs: Sequence[_Job]) -> dict[str, Any]:
    """The settings every record of one file shares (checked on resume)."""
    from probes.models.identity import model_label

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
         existing: Existing, result: GenerateResult, cfg: GenerateConfig, *, t0: float, progress: bool,
         say: Log) -> GenerateResult:
    from tqdm import tqdm

    _check_identity(result.out, existing.records, identity)
    done = {r.get("id") for r in existing.records}
    todo = [j for j in jobs if j.fields["id"] not in done]
    result.model, result.backend = identity["model"], generator.backend
    result.device, result.max_new_tokens = str(generator.device), identity["max_new_tokens"]
    result.n_requested, result.n_skipped = len(jobs), len(jobs) - len(todo)
    sampling = Sampling(temperature=cfg.temperature, top_p=cfg.top_p,
                        max_new_tokens=identity["max_new_tokens"], seed=cfg.seed)
    say(f"writing {result.out}: {len(todo)} to do ({result.n_skipped} already done), max "
        f"{sampling.max_new_tokens} new tokens, {generator.backend} on {generator.device}")
    bar = tqdm(total=len(todo), unit="sample", desc=result.command, disable=not progress,
               dynamic_ncols=True, leave=True)
    t_loop = time.perf_counter()
    try:
        with Appender(result.out) as appender:
            for start in range(0, len(todo), cfg.batch_size):
                batch = todo[start: start + cfg.batch_size]
                completions = generator.generate([j.request for j in batch], sampling)
                for job, comp in zip(batch, completions):
                    appender.write(build(job, comp))
                    result.n_written += 1
                    result.n_tokens += comp.n_tokens
                result.seconds_generate = time.perf_counter() - t_loop
                bar.set_postfix_str(f"{result.tokens_per_s:,.0f} tok/s", refresh=False)
                bar.update(len(batch))
    finally:
        bar.close()
    result.statistics = record_statistics(open_out(result.out, resume=True).records)
    result.seconds = time.perf_counter() - t0
    return result


def format_generate(r: GenerateResult) -> str:
    """The summary line plus the statistics of the file."""
    lines = [r.summary()]
    if r.statistics is not None:
        lines += format_statistics(r.statistics)
    return "\n".join(lines)


RESUME_HELP = (
    "add to an existing --out: the (question, sample) pairs it holds are kept and skipped, an "
    "interrupted last line is dropped and redone, the rest is generated (--n may grow); the file "
    "must come from the same model and sampling settings. Without --resume an existing --out is an "
    "error"
)


def add_parser(sub: Any) -> None:
    """Register `generate` and its flags."""
    p = sub.add_parser(
        NAME, formatter_class=flags.HelpFormatter,
        help="sample k graded trajectories per question from your model (or summarise trajectories)",
        description=(
            "Sample --n trajectories per question of --questions with --model and write one graded "
            "trace per sample to --out (JSONL: id, group, sample, question, trajectory, response, "
            "model_answer, answer, correct, finish_reason, n_tokens, the sampling settings and the "
            "model), streamed and resumable; print accuracy, Pass@k, mG-Pass@k, lengths and "
            "truncation with CIs. With --summarize FROM.jsonl, write a summary of each trajectory "
            "of FROM (variant 'summary', same group) instead."
        ),
    )
    flags.model_flags(p)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--questions", type=Path, metavar="Q.jsonl",
                        help="JSONL questions {id?, question|problem, answer}")
    source.add_argument("--summarize", type=Path, metavar="FROM.jsonl",
                        help="JSONL traces whose trajectories to summarise (instead of --questions)")
    p.add_argument("--out", type=Path, required=True, help="the JSONL output")
    p.add_argument("--resume", action="store_true", help=RESUME_HELP)
    p.add_argument("--n", type=flags.positive_int, default=None, metavar="K",
                   help="samples per question (default 1; not with --summarize)")
    p.add_argument("--backend", choices=BACKENDS, default="hf",
                   help="hf: Hugging Face generate (CPU or GPU); vllm: vLLM (GPU, optional extra)")
    p.add_argument("--temperature", type=flags.nonnegative_float, default=DEFAULT_TEMPERATURE,
                   help="softmax temperature; 0 = greedy")
    p.add_argument("--top-p", type=_unit_interval, default=DEFAULT_TOP_P, help="nucleus sampling mass")
    p.add_argument("--max-new-tokens", type=flags.positive_int, default=None,
                   help=f"most tokens per sample (default: {MAX_DEFAULT_NEW_TOKENS}, or what the model's "
                        "context leaves after the longest prompt)")
    p.add_argument("--seed", type=int, default=0,
                   help="the run's seed; each sample derives its own from it and its id")
    p.add_argument("--batch-size", type=flags.positive_int, default=DEFAULT_BATCH_SIZE,
                   help="requests per generate call (HF: one left-padded batch; vLLM batches inside a "
                        "call, use a few hundred); records are written as each call returns")
    p.add_argument("--thinking", action=argparse.BooleanOptionalAction, default=True,
                   help="thinking mode: --no-thinking uses the chat template's thinking switch where it "
                        "has one, else an empty <think></think> block after the prompt")
    p.add_argument("--grade-method", choices=GRADE_METHODS, default=DEFAULT_GRADE_METHOD,
                   help="math-verify: equivalent or equal strings; exact: equal strings only")
    p.add_argument("--summary-prompt", default=DEFAULT_SUMMARY_PROMPT,
                   help="with --summarize: the user message; {trajectory} = the reasoning without its "
                        "answer, {question} = the question")
    p.add_argument("--limit", type=flags.positive_int, default=None, metavar="N",
                   help="use only the first N questions (or traces)")
    p.add_argument("--strict", action="store_true",
                   help="fail on the first bad JSONL line instead of skipping it")
    flags.report_flags(p, json_help="end with one JSON object")
    p.set_defaults(func=run)


def _unit_interval(text: str) -> float:
    value = flags.nonnegative_float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def run(args: argparse.Namespace) -> int:
    """`generate` from parsed flags: generate (or summarise), then print the report (and JSON)."""
    flags.silence_hf()
    if args.summarize is not None and args.n is not None:
        raise ProbesError("--n is the number of samples per question; --summarize writes one summary "
                          "per trajectory: drop --n")
    cfg = GenerateConfig(n=args.n or 1, temperature=args.temperature, top_p=args.top_p,
                         max_new_tokens=args.max_new_tokens, seed=args.seed, batch_size=args.batch_size,
                         thinking=args.thinking, grade_method=args.grade_method, limit=args.limit,
                         strict=args.strict, summary_prompt=args.summary_prompt)
    run_ = summarize_traces if args.summarize is not None else generate_samples
    result = run_(args.model, args.summarize or args.questions, args.out, cfg, resume=args.resume,
                  backend=args.backend, device=args.device, dtype=args.model_dtype,
                  progress=progress_on(args.quiet),
                  log=lambda line: print(line, file=sys.stderr, flush=True))
    print(format_generate(result), file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(result.to_dict(), sort_keys=True))
    return 0

