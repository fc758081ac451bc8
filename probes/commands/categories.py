"""`python -m probes.run categories`: count reflection / delimiter phrases in traces with a
tokenizer, to check the lexicon on one's own data."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from probes.commands import SUMMARIES, flags
from probes.pipeline.progress import Stages, progress_on

NAME = "categories"


def add_parser(sub: Any) -> None:
    """Register `categories` and its flags."""
    p = sub.add_parser(
        NAME, formatter_class=flags.HelpFormatter,
        help=SUMMARIES[NAME],
        description=(
            "Tokenize the traces with the given tokenizer, match the lexicon's reflection and "
            "delimiter phrases on the text (word boundaries, case-insensitive where sensible), map "
            "them to tokens, and print per-phrase counts and token totals per category. Use it to "
            "check the lexicon on your own data; extend it with --lexicon."
        ),
    )
    flags.traces_flags(p)
    flags.model_flags(p, tokenizer_only=True)
    flags.report_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """`categories` from parsed flags."""
    from probes.models.load import load_tokenizer  # here, not at the top: keeps --help fast
    from probes.traces.categories import count_categories, format_category_table, load_lexicon
    from probes.traces.tokenize import tokenize_traces

    source = flags.source_from_args(args)
    traceset = source.read()
    for bad in traceset.problems[:10]:
        print(f"skipped line {bad.line_no}: {bad.reason}", file=sys.stderr)
    if len(traceset.problems) > 10:
        print(f"... and {len(traceset.problems) - 10} more bad lines", file=sys.stderr)
    lexicon = load_lexicon(extra=source.lexicon)
    tokenizer = load_tokenizer(args.tokenizer)
    traces = traceset.traces[: source.limit] if source.limit is not None else traceset.traces
    with Stages(total=1, desc=NAME, enabled=progress_on(args.quiet)) as stages, \
            stages.working("tokenizing and labelling"):
        tokenized, _too_long = tokenize_traces(traces, tokenizer, prompt_format=source.prompt_format,
                                               scaffold=source.scaffold)
        counts = count_categories(tokenized, lexicon)
    counts["n_bad_lines"] = len(traceset.problems)
    if args.json:
        print(json.dumps(counts, ensure_ascii=False, sort_keys=True))
    else:
        print(format_category_table(counts))
    return 0
