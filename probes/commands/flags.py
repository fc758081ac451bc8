"""The flag groups the subcommands share, each defined once, with `choices=` taken from the
constants that the code checks against and defaults stated once (the parser shows them).

- `model_flags`: `--model` (or `--tokenizer`), `--device`, `--model-dtype`, `--device-map`,
  `--max-memory` (the last two fold into `args.device`, the one string `load_model` reads).
- `traces_flags`: `--traces`, `--limit`, `--strict`, `--lexicon` and, for the commands that
  tokenize into a cache, `--prompt-format` and `--scaffold`.
- `out_flags`: `--out` and `--resume` (the write loop's rule, `probes.pipeline.job.RESUME_HELP`).
- `report_flags`: `--json` and `-q/--quiet` (alias `--no-progress`).

Every numeric option takes one of the typed validators below (`positive_int`, `nonnegative_int`,
`seed`, `nonnegative_float`, `positive_float`, `unit_interval`, `probability`): a negative, NaN,
infinite or out-of-range value is one `error:` line (exit code 2) before any work, never a
traceback from deep inside numpy or torch (`tests/probes/commands/test_cli_guard.py` checks that
no option takes a bare `int`/`float`).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from probes.models.choices import DEVICE_MAPS, DTYPES
from probes.pipeline.job import RESUME_HELP
from probes.pipeline.progress import QUIET_HELP
from probes.traces.tokenize import DEFAULT_SCAFFOLD

MODEL_HELP = "tiny-reasoner, a local model folder, or a hub id in the local HF cache"
DEVICE_HELP = "cpu, cuda, cuda:N or auto"
MODEL_DTYPES: tuple[str, ...] = DTYPES
"""Parameter dtypes a model can be loaded in (`probes.models.choices.DTYPES`, the names of
`hooks.model.DTYPES`)."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every default once, from the parser itself (never typed into a help string)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (default is None or isinstance(default, bool) or default == [] or
                default is argparse.SUPPRESS or "%(default)" in text):
            return text
        return super()._get_help_string(action)


INT_MAX = 2**63 - 1
"""The largest integer an option takes: a C int64 (numpy, torch and HDF5 attributes hold it)."""


def positive_int(text: str) -> int:
    """argparse type: an integer in 1..2**63-1."""
    return _int_in(text, 1, INT_MAX)


def nonnegative_int(text: str) -> int:
    """argparse type: an integer in 0..2**63-1."""
    return _int_in(text, 0, INT_MAX)


def seed(text: str) -> int:
    """argparse type: a seed, an integer in 0..2**63-1 (what numpy and torch generators take)."""
    return _int_in(text, 0, INT_MAX)


def _int_in(text: str, low: int, high: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be at least {low}, got {text}")
    if value > high:
        high_text = "2**63-1 (a 64-bit integer)" if high == INT_MAX else str(high)
        raise argparse.ArgumentTypeError(f"must be at most {high_text}, got {text}")
    return value


def nonnegative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    return _float_in(text, 0.0, math.inf, "a finite number >= 0", low_open=False)


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    return _float_in(text, 0.0, math.inf, "a finite number > 0", low_open=True)


def unit_interval(text: str) -> float:
    """argparse type: a number in (0, 1] (a nucleus mass, a fraction to remove)."""
    return _float_in(text, 0.0, 1.0, "a number in (0, 1]", low_open=True)


def probability(text: str) -> float:
    """argparse type: a number in [0, 1] (a probability, a cosine threshold)."""
    return _float_in(text, 0.0, 1.0, "a number in [0, 1]", low_open=False)


def _float_in(text: str, low: float, high: float, what: str, *, low_open: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    above = value > low if low_open else value >= low
    if not (math.isfinite(value) and above and value <= high):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
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
                 lexicon: bool = True, tokenize: bool = False) -> None:
    """`--traces`, `--limit`, `--strict` and (for commands that label tokens) `--lexicon`."""
    if tokenize:
        p.add_argument("--prompt-format", default=None, metavar="TEMPLATE",
                       help="prompt template with {question} (none given: the tokenizer's chat "
                            "template, else the documented prompt)")
        p.add_argument("--scaffold", default=DEFAULT_SCAFFOLD,
                       help="text between the trajectory and the answer (RaML's answer scaffold, "
                            "%(default)r); part of what a cache records, so --resume needs the "
                            "same one")
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
