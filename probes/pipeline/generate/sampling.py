"""The two `generate` modes: sample graded trajectories per question, or summarise traces.

`generate_samples` builds one job per (question, sample) and grades each completion;
`summarize_traces` builds one job per trace from `--summary-prompt` (`check_summary_prompt`) and
the trace's reasoning without its answer (`reasoning_of`). Both run through
`probes.pipeline.generate.writer`; the record fields are listed in `probes.commands.generate`.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from probes.errors import ProbesError
from probes.models.generate import (
    Completion,
    Request,
    build_prompt,
    prompt_ids,
    require_vllm,
    sample_seed,
    split_trajectory,
)
from probes.models.spec import ModelSpec, model_spec
from probes.pipeline.generate.settings import (
    NAME,
    SAMPLE_VARIANT,
    SUMMARY_VARIANT,
    GenerateConfig,
    GenerateResult,
)
from probes.pipeline.generate.writer import _identity, _Job, _run, _start, open_generator
from probes.pipeline.loop import Log
from probes.traces.grading import THINK_CLOSE, grade
from probes.traces.jsonl import open_out
from probes.traces.questions import read_questions
from probes.traces.read import THINK_OPEN, read_traces

if TYPE_CHECKING:
    from hooks.model import LoadedModel


def generate_samples(
    model: ModelSpec | LoadedModel | str,
    questions_path: str | Path,
    out: str | Path,
    cfg: GenerateConfig,
    *,
    resume: bool = False,
    backend: str = "hf",
    device: str | None = None,
    dtype: str | None = None,
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
    spec = model_spec(model, device=device, dtype=dtype)
    generator = open_generator(spec, backend=backend, seed=cfg.seed)
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
    identity = {**_identity(generator, _dtype(spec), cfg, SAMPLE_VARIANT, jobs),
                "grade_method": cfg.grade_method}

    def build(job: _Job, comp: Completion) -> dict[str, Any]:
        trajectory, response = split_trajectory(job.prompt.trajectory_prefix + comp.text)
        g = grade(trajectory + response, job.fields["answer"], method=cfg.grade_method)
        return {**job.fields, "model_answer": g.model_answer, "correct": g.correct,
                "finish_reason": comp.finish_reason, "n_tokens": comp.n_tokens,
                "trajectory": trajectory, "response": response, "prompt": job.prompt.text,
                **identity, "sample_seed": job.request.seed, "device": str(generator.device)}

    return _run(generator, jobs, build, identity, result, cfg, resume=resume, t0=t0, progress=progress,
                say=say)


def summarize_traces(
    model: ModelSpec | LoadedModel | str,
    traces_path: str | Path,
    out: str | Path,
    cfg: GenerateConfig,
    *,
    resume: bool = False,
    backend: str = "hf",
    device: str | None = None,
    dtype: str | None = None,
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
    spec = model_spec(model, device=device, dtype=dtype)
    generator = open_generator(spec, backend=backend, seed=cfg.seed)
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
    identity = {**_identity(generator, _dtype(spec), cfg, SUMMARY_VARIANT, jobs),
                "summary_prompt": cfg.summary_prompt}
    wrap = {t.id: t.trajectory.lstrip().startswith(THINK_OPEN) for t in traces}

    def build(job: _Job, comp: Completion) -> dict[str, Any]:
        text = job.prompt.trajectory_prefix + comp.text
        summary = (split_trajectory(text)[1] if THINK_CLOSE in text else text).strip()
        trajectory = f"{THINK_OPEN}\n{summary}\n{THINK_CLOSE}" if wrap[job.fields["source_id"]] else summary
        return {**job.fields, "trajectory": trajectory, "finish_reason": comp.finish_reason,
                "n_tokens": comp.n_tokens, "prompt": job.prompt.text, **identity,
                "sample_seed": job.request.seed, "device": str(generator.device)}

    return _run(generator, jobs, build, identity, result, cfg, resume=resume, t0=t0, progress=progress,
                say=say)


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


def _dtype(spec: ModelSpec | LoadedModel) -> str:
    """The dtype a spec loads in (vLLM records it; a loaded model's is read from it)."""
    return spec.dtype if isinstance(spec, ModelSpec) else spec.arch.dtype
