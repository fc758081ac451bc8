"""The command line: `trajectory-probes SUBCOMMAND ...` (or `python -m probes.run SUBCOMMAND ...`).

Also the `trajectory-probes` console script. A thin entry: `probes.commands.SUBCOMMANDS` lists one
module per subcommand (each has `NAME`, `add_parser(sub)` and `run(args) -> exit code`), and only
the module of the subcommand run is imported. Before anything, a local `hooks.py`, `cache.py` or
`analyses.py` that would shadow the toolkit is refused in one line. At the edge, every user error
(`user_errors()`) prints one `error:` line on stderr and exits with code 2, and a closed stdout
(`... | head`) ends quietly; nothing already written is removed.

Ctrl-C, whenever it comes, ends with one `interrupted ...` line and exit code 130: while the
imports load (seconds: torch) the process leaves at once (nothing is written yet); during the run
the `KeyboardInterrupt` unwinds (committed traces stay, `--resume` finishes), also when Python
swallowed it inside a finalizer (`probes.pipeline.progress.raise_if_interrupted`); a second Ctrl-C
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


if __name__ == "__main__":  # before the imports below (a Ctrl-C there was a traceback)
    signal.signal(signal.SIGINT, _leave_interrupted)

import argparse  # noqa: E402
import importlib  # noqa: E402
import importlib.util  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import NoReturn  # noqa: E402

from probes.commands import SUBCOMMANDS  # noqa: E402
from probes.pipeline import progress  # noqa: E402

EXIT_USER_ERROR = 2
TOOLKIT_PACKAGES = ("hooks", "cache", "analyses")
"""Top-level packages of the toolkit besides `probes` (a local file of that name shadows one)."""


def shadowing_file() -> str | None:
    """A local `hooks.py` / `cache.py` / `analyses.py` (or folder) that Python would import instead
    of the toolkit's package (`python -m` puts the working folder first on `sys.path`), or None.
    Looked up without importing anything."""
    home = Path(__file__).resolve().parent.parent
    for name in TOOLKIT_PACKAGES:
        module = sys.modules.get(name)
        if module is not None:
            origin = getattr(module, "__file__", None)
        else:
            spec = importlib.util.find_spec(name)
            origin = None if spec is None else spec.origin
        if origin is not None and Path(origin).resolve() != home / name / "__init__.py":
            return origin
    return None


def user_errors() -> tuple[type[Exception], ...]:
    """Every error the CLI reports as one `error:` line with exit code 2."""
    # here, not at the top: `cache` imports h5py, which --help never needs
    from cache.errors import CacheError
    from hooks.errors import HooksError
    from probes.errors import ProbesError

    return (ProbesError, HooksError, CacheError)


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one `error:` line (exit code 2), like every other
    user error of the CLI."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USER_ERROR, f"error: {self.prog}: {message} (see `{self.prog} --help`)\n")


ALL = "*"
"""`build_parser(ALL)`: the full parser of every subcommand (imports them all)."""


def build_parser(command: str | None = ALL) -> argparse.ArgumentParser:
    """The argument parser: every subcommand's one-line help, and the full parser of `command`
    (of every one with `ALL`; of none with None) — only those subcommands' modules are imported."""
    parser = Parser(
        prog=os.environ.get("PROBES_PROG", "trajectory-probes"),
        description=(
            "trajectory-probes: how each token of a chain of thought moves a model toward its "
            "answer. Run `trajectory-probes SUBCOMMAND --help` for each subcommand "
            "(`python -m probes.run` is the same)."
        ),
    )
    sub = parser.add_subparsers(dest="command", metavar="SUBCOMMAND", required=True)
    for name, module, summary in SUBCOMMANDS:
        if command in (ALL, name):
            importlib.import_module(module).add_parser(sub)
        else:
            sub.add_parser(name, help=summary, add_help=False)
    return parser


def _command_of(argv: Sequence[str]) -> str | None:
    """The subcommand named in `argv` (the first word that is not a flag), if any."""
    known = {name for name, _, _ in SUBCOMMANDS}
    for word in argv:
        if not word.startswith("-"):
            return word if word in known else None
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Parse `argv`, run the subcommand, return the exit code (2 on a user error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    shadow = shadowing_file()
    if shadow is not None:
        print(f"error: {shadow} shadows the toolkit's {Path(shadow).stem} package (Python imports "
              f"files of the working folder first under `python -m`); rename that file, run from "
              f"another folder, or use the `trajectory-probes` command", file=sys.stderr)
        return EXIT_USER_ERROR
    command = _command_of(argv)
    args = None
    restore = progress.catch_interrupts()
    try:
        try:
            args = build_parser(command).parse_args(argv)
        except SystemExit as exit_:  # --help, or a flag error already printed as one line
            return int(exit_.code or 0)
        errors = user_errors()
        try:
            code = args.func(args)
        except errors as err:
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


def _exit(code: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the run has ended: shut down quietly
    raise SystemExit(code)


def console() -> None:
    """The `trajectory-probes` console script."""
    _exit(main())


if __name__ == "__main__":
    os.environ.setdefault("PROBES_PROG", "python -m probes.run")
    _exit(main())
