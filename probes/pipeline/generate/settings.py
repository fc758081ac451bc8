"""Settings and result of a `generate` run: the defaults, `GenerateConfig` and `GenerateResult`.

The command (`probes.commands.generate`) fills a `GenerateConfig` from its flags; both modes
(`probes.pipeline.generate.sampling`) return a `GenerateResult`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from probes.jsonable import jsonable
from probes.traces.grading import DEFAULT_GRADE_METHOD

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
