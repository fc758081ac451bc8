"""The flag groups the subcommands share, each defined once, with `choices=` taken from the
constants that the code checks against and defaults stated once (the parser shows them).

- `model_flags`: `--model` (or `--tokenizer`), `--device`, `--model-dtype`, `--device-map`,
  `--max-memory` (the last two fold into `args.device`, the one string `load_model` reads).
- `traces_flags`: `--traces`, `--limit`, `--strict`, `--lexicon`.
- `out_flags`: `--out` and `--resume` (the write loop's rule, `probes.pipeline.loop.RESUME_HELP`).
- `report_flags`: `--json` and `-q/--quiet` (alias `--no-progress`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hooks.model import DTYPES
from probes.models.placement import DEVICE_MAPS
from probes.pipeline.loop import RESUME_HELP
from probes.pipeline.progress import QUIET_HELP

MODEL_HELP = "tiny-reasoner, a local model folder, or a hub id in the local HF cache"
DEVICE_HELP = "cpu, cuda, cuda:N or auto"
MODEL_DTYPES: tuple[str, ...] = tuple(DTYPES)
"""Parameter dtypes a model can be loaded in (the one table is `hooks.model.DTYPES`)."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every default once, from the parser itself (never typed into a help string)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (default is None or isinstance(default, bool) or default == [] or
                default is argparse.SUPPRESS or "%(default)" in text):
            return text
        return super()._get_help_string(action)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _int_at_least(text, 1)


def nonnegative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _int_at_least(text, 0)


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
    return value


def nonnegative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def model_flags(p: argparse.ArgumentParser, *, tokenizer_only: bool = False) -> None:
    """`--model` (or `--tokenizer` for commands that only tokenize), `--device`, `--model-dtype`."""
    if tokenizer_only:
        p.add_argument("--tokenizer", required=True, help=MODEL_HELP)
        return
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--device", default="auto", help=DEVICE_HELP, action=_DeviceAction)
    p.add_argument("--model-dtype", choices=MODEL_DTYPES, default="float32",
                   help="parameter dtype the model is loaded in")
    p.add_argument("--device-map", choices=DEVICE_MAPS, default=None, action=_DeviceAction,
                   help="split the model's layers over every visible GPU (accelerate); for a "
                        "model bigger than one device")
    p.add_argument("--max-memory", default=None, action=_DeviceAction, metavar="DEV=SIZE,...",
                   help="memory budget per device for --device-map, e.g. 0=75GiB,1=75GiB "
                        "(implies --device-map auto)")


class _DeviceAction(argparse.Action):
    """Stores its flag, then folds --device / --device-map / --max-memory into `args.device`."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        from probes.models.placement import PlacementError, device_spec, parse_max_memory

        if self.dest == "max_memory":
            try:
                parse_max_memory(str(values))
            except PlacementError as err:
                parser.error(str(err))
        setattr(namespace, self.dest, values)
        namespace.device = device_spec(str(namespace.device), getattr(namespace, "device_map", None),
                                       getattr(namespace, "max_memory", None))


def traces_flags(p: argparse.ArgumentParser, *, limit_help: str = "use only the first N traces",
                 lexicon: bool = True) -> None:
    """`--traces`, `--limit`, `--strict` and (for commands that label tokens) `--lexicon`."""
    p.add_argument("--traces", type=Path, required=True, help="JSONL traces")
    p.add_argument("--limit", type=positive_int, default=None, metavar="N", help=limit_help)
    p.add_argument("--strict", action="store_true",
                   help="fail on the first bad JSONL line instead of skipping it")
    if not lexicon:
        return
    p.add_argument("--lexicon", type=Path, action="append", default=[],
                   help="extra lexicon JSON merged into the built-in one (repeatable)")


def out_flags(p: argparse.ArgumentParser, *, what: str) -> None:
    """`--out` (a cache file) and `--resume`."""
    p.add_argument("--out", type=Path, required=True, help=what)
    p.add_argument("--resume", action="store_true", help=RESUME_HELP)


def report_flags(p: argparse.ArgumentParser, *, progress: bool = True,
                 json_help: str = "print one JSON object instead of a table") -> None:
    """`--json` and (for commands that take longer than a second) `-q/--quiet`."""
    p.add_argument("--json", action="store_true", help=json_help)
    if progress:
        p.add_argument("-q", "--quiet", "--no-progress", dest="quiet", action="store_true",
                       help=QUIET_HELP)


def silence_hf() -> None:
    """Turn off transformers' own progress bars (ours show progress; errors stay one line)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
