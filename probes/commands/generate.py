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

The code: the command and its flags are here (`add_parser`, `run`, `format_generate`); the settings
and result in `probes.pipeline.generate.settings` (`GenerateConfig`, `GenerateResult`, the
defaults); the two modes in `probes.pipeline.generate.sampling` (`generate_samples`,
`summarize_traces`, `reasoning_of`, `check_summary_prompt`); the backend and the resumable write
loop in `probes.pipeline.generate.writer` (`open_generator`). Their public names are importable
from this module as before.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from probes.commands import SUMMARIES, flags
from probes.errors import ProbesError
from probes.models.choices import GENERATION_BACKENDS as BACKENDS
from probes.pipeline.generate.settings import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_SUMMARY_PROMPT,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_P,
    MAX_DEFAULT_NEW_TOKENS,
    NAME,
    GenerateConfig,
    GenerateResult,
)
from probes.pipeline.generate.settings import SAMPLE_VARIANT as SAMPLE_VARIANT
from probes.pipeline.generate.settings import SUMMARY_VARIANT as SUMMARY_VARIANT
from probes.pipeline.progress import progress_on
from probes.traces.grading import DEFAULT_GRADE_METHOD, GRADE_METHODS

if TYPE_CHECKING:
    from probes.pipeline.generate.sampling import check_summary_prompt as check_summary_prompt
    from probes.pipeline.generate.sampling import reasoning_of as reasoning_of
    from probes.pipeline.generate.writer import Generator as Generator
    from probes.pipeline.generate.writer import open_generator as open_generator




def format_generate(r: GenerateResult) -> str:
    """The summary line plus the statistics of the file."""
    from probes.pipeline.generate.grade import format_statistics  # here, not at the top: keeps --help fast

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
        help=SUMMARIES[NAME],
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
    p.add_argument("--top-p", type=flags.unit_interval, default=DEFAULT_TOP_P, help="nucleus sampling mass")
    p.add_argument("--max-new-tokens", type=flags.positive_int, default=None,
                   help=f"most tokens per sample (default: {MAX_DEFAULT_NEW_TOKENS}, or what the model's "
                        "context leaves after the longest prompt)")
    p.add_argument("--seed", type=flags.seed, default=0,
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



def run(args: argparse.Namespace) -> int:
    """`generate` from parsed flags: generate (or summarise), then print the report (and JSON)."""
    from probes.pipeline.generate.sampling import (
        generate_samples,  # here, not at the top: keeps --help fast
        summarize_traces,
    )

    flags.silence_hf()
    if args.summarize is not None and args.n is not None:
        raise ProbesError("--n is the number of samples per question; --summarize writes one summary "
                          "per trajectory: drop --n")
    cfg = GenerateConfig(n=args.n or 1, temperature=args.temperature, top_p=args.top_p,
                         max_new_tokens=args.max_new_tokens, seed=args.seed, batch_size=args.batch_size,
                         thinking=args.thinking, grade_method=args.grade_method, limit=args.limit,
                         strict=args.strict, summary_prompt=args.summary_prompt)
    run_ = summarize_traces if args.summarize is not None else generate_samples
    result = run_(flags.model_from_args(args), args.summarize or args.questions, args.out, cfg,
                  resume=args.resume, backend=args.backend,
                  progress=progress_on(args.quiet),
                  log=lambda line: print(line, file=sys.stderr, flush=True))
    print(format_generate(result), file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(result.to_dict(), sort_keys=True))
    return 0

