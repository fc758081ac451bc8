"""The command line: `python -m probes.run SUBCOMMAND ...`.

A thin entry: the subcommand table below lists one module of `probes.commands` per subcommand
(each has `NAME`, `add_parser(sub)` and `run(args) -> exit code`). At the edge, every user error
(`USER_ERRORS`) prints one `error:` line on stderr and exits with code 2, Ctrl-C prints one line
and exits with 130, and a closed stdout (`... | head`) ends quietly; nothing already written is
removed.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import NoReturn

from cache.errors import CacheError
from hooks.errors import HooksError
from probes.commands import (
    anchors,
    cache,
    categories,
    compare,
    compare_models,
    demo,
    effects,
    efficiency,
    fit,
    generate,
    grade,
    inspect,
    landscape,
    lhat,
    pack,
    report,
    updates,
)
from probes.errors import ProbesError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130

COMMANDS: tuple[ModuleType, ...] = (
    demo, generate, grade, categories, cache, inspect, pack, lhat, updates, landscape, fit, compare, report,
    efficiency, compare_models, anchors, effects,
)
"""The subcommands, in the order `--help` lists them."""

USER_ERRORS: tuple[type[Exception], ...] = (ProbesError, HooksError, CacheError)
"""Every error the CLI reports as one `error:` line with exit code 2."""


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one `error:` line (exit code 2), like every other
    user error of the CLI."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USER_ERROR, f"error: {self.prog}: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = Parser(
        prog="python -m probes.run",
        description=(
            "trajectory-probes: how each token of a chain of thought moves a model toward its "
            "answer. Run `python -m probes.run SUBCOMMAND --help` for each subcommand."
        ),
    )
    sub = parser.add_subparsers(dest="command", metavar="SUBCOMMAND", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse `argv`, run the subcommand, return the exit code (2 on a user error)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # --help, or a flag error already printed as one line
        return int(exit_.code or 0)
    try:
        return args.func(args)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        out = getattr(args, "out", None)
        kept = f"; the complete traces in {out} are kept, rerun with --resume to finish" if (
            out is not None and hasattr(args, "resume")) else ""
        print(f"interrupted{kept}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader of stdout went away (`... | head`): stop quietly, as command-line tools do.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
