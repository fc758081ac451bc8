"""The command line: `python -m probes.run SUBCOMMAND ...`.

A thin entry: the subcommand table below lists one module of `probes.commands` per subcommand
(each has `NAME`, `add_parser(sub)` and `run(args) -> exit code`). At the edge, every user error
(`USER_ERRORS`) prints one `error:` line on stderr and exits with code 2, and a closed stdout
(`... | head`) ends quietly; nothing already written is removed.

Ctrl-C, whenever it comes, ends with one `interrupted ...` line and exit code 130: while the
imports load (seconds: torch) the process leaves at once (nothing is written yet); during the run
the `KeyboardInterrupt` unwinds (committed traces stay, `--resume` finishes), also when Python
swallowed it inside a finalizer (`probes.commands.progress.raise_if_interrupted`); a second Ctrl-C
while the line is printed, or one after the run has ended, is ignored.
"""

from __future__ import annotations

import os
import signal
import sys

EXIT_INTERRUPTED = 130


def _leave_interrupted(signum: int, frame: object) -> None:
    """SIGINT before `main` runs or after it returned: nothing is being written, leave now."""
    os.write(2, b"interrupted\n")
    os._exit(EXIT_INTERRUPTED)


if __name__ == "__main__":  # before the slow imports below (a Ctrl-C there was a traceback)
    signal.signal(signal.SIGINT, _leave_interrupted)

import argparse  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from types import ModuleType  # noqa: E402
from typing import Any, NoReturn  # noqa: E402

from cache.errors import CacheError  # noqa: E402
from hooks.errors import HooksError  # noqa: E402
from probes.commands import (  # noqa: E402
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
    progress,
    report,
    updates,
)
from probes.errors import ProbesError  # noqa: E402

EXIT_USER_ERROR = 2

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
    """Parse `argv`, run the subcommand, return the exit code (2 on a user error, 130 on Ctrl-C)."""
    args: Any = None
    restore = progress.catch_interrupts()
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as exit_:  # --help, or a flag error already printed as one line
            return int(exit_.code or 0)
        try:
            code = args.func(args)
        except USER_ERRORS as err:
            print(f"error: {err}", file=sys.stderr)
            code = EXIT_USER_ERROR
        except BrokenPipeError:
            # The reader of stdout went away (`... | head`): stop quietly, as command-line tools do.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            code = 0
        progress.raise_if_interrupted()  # a Ctrl-C that a finalizer swallowed is still one
        return code
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C cannot cut this line
        out = getattr(args, "out", None)
        kept = f"; the complete traces in {out} are kept, rerun with --resume to finish" if (
            out is not None and hasattr(args, "resume")) else ""
        print(f"interrupted{kept}", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        restore()


if __name__ == "__main__":
    exit_code = main()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the run has ended: shut down quietly
    raise SystemExit(exit_code)
