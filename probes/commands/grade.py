"""`trajectory-probes grade`: its flags, its run and its printed summary.

The work itself is done by `probes.pipeline.generate.grade`, which a notebook can call directly."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from probes.commands import SUMMARIES, flags, name_of
from probes.pipeline.progress import Stages, progress_on
from probes.traces.grading import DEFAULT_GRADE_METHOD, GRADE_METHODS

if TYPE_CHECKING:
    from probes.pipeline.generate.grade import GradeResult

NAME = name_of(__name__)



def format_grade(r: GradeResult) -> str:
    """The report of a `grade` run."""
    from probes.pipeline.generate.grade import format_statistics  # here, not at the top: keeps --help fast

    acc = "n/a" if r.accuracy is None else f"{r.accuracy:.3f}"
    lines = [f"grade: {r.n_records} records graded ({r.method}), {r.n_correct} correct, accuracy {acc}; "
             f"{r.n_no_answer} without an answer, {r.n_bad_lines} lines not traces"
             + (f" -> {r.out}" if r.out else " (pass --out to write the graded records)")]
    if r.n_recorded:
        lines.append(f"extracted answer equals the recorded model_answer in {r.n_agree_recorded} of "
                     f"{r.n_recorded} records that had one")
        lines += [f"  {tid}: recorded {rec!r}, extracted {new!r}" for tid, rec, new in r.disagreements]
    if r.statistics is not None and r.statistics["samples_per_question"][1] > 1:
        lines += format_statistics(r.statistics)
    return "\n".join(lines)


def add_parser(sub: Any) -> None:
    """Register `grade` and its flags."""

    p = sub.add_parser(
        NAME, formatter_class=flags.HelpFormatter,
        help=SUMMARIES[NAME],
        description=(
            "Add model_answer (the last \\boxed{...}, else the text after </think>) and correct (equal "
            "to the record's answer by math-verify's mathematical equivalence, or exact strings) to "
            "every record of TRACES.jsonl, and print the accuracy; with several samples per question "
            "(a `group` field) also Pass@k, mG-Pass@k, lengths and truncation with bootstrap CIs."
        ),
    )
    p.add_argument("traces", type=Path, metavar="TRACES.jsonl", help="JSONL traces")
    p.add_argument("--out", type=Path, default=None, metavar="GRADED.jsonl",
                   help="write the graded records here (a new file)")
    p.add_argument("--grade-method", choices=GRADE_METHODS, default=DEFAULT_GRADE_METHOD,
                   help="math-verify: equivalent or equal strings; exact: equal strings only")
    p.add_argument("--strict", action="store_true",
                   help="fail on the first line that is not a trace instead of copying it")
    flags.report_flags(p, json_help="print one JSON object instead of the report")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """`grade` from parsed flags."""
    from probes.pipeline.generate.grade import (
        N_SHOWN,  # here, not at the top: keeps --help fast
        grade_file,
    )

    with Stages(total=1, desc=NAME, enabled=progress_on(args.quiet)) as stages, \
            stages.working("grading"):
        result = grade_file(args.traces, out=args.out, method=args.grade_method,
                            strict=args.strict)
    for line_no, reason in result.bad_lines[:N_SHOWN]:
        print(f"not graded, line {line_no}: {reason}", file=sys.stderr)
    if args.json:
        print(json.dumps(result.to_dict(), sort_keys=True))
    else:
        print(format_grade(result))
    return 0
