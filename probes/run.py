"""The command line: `python -m probes.run SUBCOMMAND ...`.

A thin shell: each subcommand parses its flags, calls one library function and prints the result
(a table, or one JSON object with `--json`). User errors (`ProbesError`) print one line on stderr
and exit with code 2; nothing already written is removed.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from probes.errors import ProbesError

EXIT_USER_ERROR = 2


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run the whole pipeline on the built-in tiny-reasoner and its sample traces",
        description=(
            "Load the built-in `tiny-reasoner` (no download), read its 200 sample traces, tokenize "
            "them into prompt/trajectory/scaffold/answer spans, label every token (reflection, "
            "delimiter, ordinary, ...), run the model through the TransformerLens bridge and print "
            "a summary: traces, tokens per category, greedy answer accuracy and answer NLL with the "
            "full trajectory and with the trajectory removed."
        ),
    )
    p.add_argument("--out", type=Path, default=None, help="folder for summary.json (created)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N sample traces")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=_cmd_demo)


def _add_categories(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "categories",
        help="count reflection / delimiter phrases in your traces with your tokenizer",
        description=(
            "Tokenize the traces with the given tokenizer, match the lexicon's reflection and "
            "delimiter phrases on the text (word boundaries, case-insensitive where sensible), map "
            "them to tokens, and print per-phrase counts and token totals per category. Use it to "
            "check the lexicon on your own data; extend it with --lexicon."
        ),
    )
    p.add_argument("--traces", type=Path, required=True, help="JSONL traces")
    p.add_argument(
        "--tokenizer",
        required=True,
        help="tiny-reasoner, a local model/tokenizer folder, or a hub id in the local HF cache",
    )
    p.add_argument(
        "--lexicon",
        type=Path,
        action="append",
        default=[],
        help="extra lexicon JSON merged into the built-in one (repeatable)",
    )
    p.add_argument("--strict", action="store_true", help="fail on the first bad JSONL line")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=_cmd_categories)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="python -m probes.run",
        description=(
            "trajectory-probes: how each token of a chain of thought moves a model toward its "
            "answer. Run `python -m probes.run SUBCOMMAND --help` for each subcommand."
        ),
    )
    sub = parser.add_subparsers(dest="command", metavar="SUBCOMMAND", required=True)
    _add_demo(sub)
    _add_categories(sub)
    return parser


def _print_bad_lines(problems, *, limit: int = 10) -> None:
    for bad in problems[:limit]:
        print(f"skipped line {bad.line_no}: {bad.reason}", file=sys.stderr)
    if len(problems) > limit:
        print(f"... and {len(problems) - limit} more bad lines", file=sys.stderr)


def _cmd_demo(args: argparse.Namespace) -> int:
    from probes.demo import format_summary, run_demo

    summary = run_demo(out=args.out, limit=args.limit, device=args.device)
    if args.json:
        print(json.dumps(summary, indent=None, sort_keys=True))
    else:
        print(format_summary(summary))
    return 0


def _cmd_categories(args: argparse.Namespace) -> int:
    from probes.categories import count_categories, format_category_table, load_lexicon
    from probes.models import load_tokenizer
    from probes.traces import read_traces, tokenize_traces

    traceset = read_traces(args.traces, strict=args.strict)
    _print_bad_lines(traceset.problems)
    lexicon = load_lexicon(extra=args.lexicon)
    tokenizer = load_tokenizer(args.tokenizer)
    tokenized, _too_long = tokenize_traces(traceset, tokenizer)
    counts = count_categories(tokenized, lexicon)
    counts["n_bad_lines"] = len(traceset.problems)
    if args.json:
        print(json.dumps(counts, ensure_ascii=False, sort_keys=True))
    else:
        print(format_category_table(counts))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Parse `argv`, run the subcommand, return the exit code (2 on a user error)."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ProbesError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    raise SystemExit(main())
