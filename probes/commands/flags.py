"""The flag groups the subcommands share, each defined once, with `choices=` taken from the
constants that the code checks against and defaults stated once (the parser shows them).

- `model_flags`: `--model` (or `--tokenizer`), `--device`, `--model-dtype`, `--device-map`,
  `--max-memory`: the fields of `probes.models.spec.ModelSpec` (`model_from_args` builds it).
- `traces_flags`: `--traces`, `--limit`, `--strict`, `--lexicon`, `--prompt-format` and
  `--scaffold`: the fields of `probes.pipeline.configs.TraceSource` (`source_from_args`).

Both groups, and each command's own settings, are derived from their dataclasses
(`dataclass_flags` / `config_from_args`): one flag per field, so each flag is spelled once.
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
import dataclasses
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from probes.models.spec import ModelSpec, max_memory_flag
from probes.pipeline.configs import TraceSource
from probes.pipeline.job import RESUME_HELP
from probes.pipeline.progress import QUIET_HELP

T = TypeVar("T")

DEVICE_HELP: str = ModelSpec.__dataclass_fields__["device"].metadata["help"]



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


def comma_choices(choices: Sequence[str]) -> Callable[[str], tuple[str, ...]]:
    """argparse type of a comma-separated subset of `choices` (`--analyses lhat,updates`)."""
    def parse(text: str) -> tuple[str, ...]:
        items = tuple(a.strip() for a in text.split(",") if a.strip())
        if not items or any(a not in choices for a in items):
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)} "
                                             f"(comma-separated), got {text!r}")
        return items

    return parse


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
    """The `ModelSpec` flags: `--model`, `--device`, `--model-dtype`, `--device-map`,
    `--max-memory` (`model_from_args` builds the spec); or only `--tokenizer` for commands that
    only tokenize."""
    if tokenizer_only:
        p.add_argument("--tokenizer", required=True,
                       help=ModelSpec.__dataclass_fields__["name"].metadata["help"])
        return
    dataclass_flags(p, ModelSpec)


def model_from_args(args: argparse.Namespace) -> ModelSpec:
    """The `ModelSpec` of the model flags (`model_flags`)."""
    return config_from_args(ModelSpec, args)


# --------------------------------------------------------------------------------------------------
# Flags derived from a config dataclass


TYPES: dict[str, Callable[[str], Any]] = {
    "positive_int": positive_int, "nonnegative_int": nonnegative_int, "seed": seed,
    "nonnegative_float": nonnegative_float, "positive_float": positive_float,
    "unit_interval": unit_interval, "probability": probability, "path": Path,
}
"""The argparse types a field's `metadata["type"]` may name (a name, so that the config modules
need not import the command line)."""


def _type_of(name: str | Callable[[str], Any]) -> Callable[[str], Any]:
    if callable(name):
        return name
    if name == "max_memory":
        return max_memory_flag
    return TYPES[name]


def field_flag(f: dataclasses.Field[Any]) -> str:
    """The flag of a config field: `metadata["flag"]`, else `--kebab-case` of its name."""
    return str(f.metadata.get("flag", "--" + f.name.replace("_", "-")))


def field_dest(f: dataclasses.Field[Any]) -> str:
    """The `args` attribute the field's flag fills (argparse's dest of `field_flag`)."""
    return field_flag(f)[2:].replace("-", "_")


def flag_fields(cls: type) -> list[dataclasses.Field[Any]]:
    """The fields of `cls` that are flags (`metadata["flag"] is None` opts a field out)."""
    return [f for f in dataclasses.fields(cls)
            if f.init and f.metadata.get("flag", "") is not None]


def _field_default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def field_help(cls: type, name: str) -> str:
    """A field's line under "Attributes:" of the class docstring (continuation lines joined)."""
    lines = (cls.__doc__ or "").splitlines()
    text: list[str] = []
    indent = None
    for line in lines:
        stripped = line.strip()
        if indent is None:
            if stripped.startswith(f"{name}:"):
                indent = len(line) - len(line.lstrip())
                text.append(stripped[len(name) + 1:].strip())
            continue
        if not stripped or len(line) - len(line.lstrip()) <= indent:
            break
        text.append(stripped)
    return " ".join(text)


def dataclass_flags(p: argparse.ArgumentParser | Any, cls: type, *, skip: Sequence[str] = (),
                    meta: dict[str, dict[str, Any]] | None = None) -> None:
    """One flag per field of the config dataclass `cls` (each flag spelled once, on its field).

    A field's flag is `--kebab-case` of its name unless `metadata["flag"]` names another; its
    default is the field's (shown by `HelpFormatter`); its help is `metadata["help"]`, else the
    field's line in the class docstring; `metadata` may also give `type` (a name in `TYPES`, or
    the function), `choices`, `metavar`, `action`, `required`, `nargs` (argparse's keywords) and
    `convert` (for `config_from_args`). `meta[name]` adds to a field's metadata (for a dataclass of
    a lower layer that does not carry its flags' details, or a command's own wording). A `bool`
    field is a switch (`store_true`; with `--no-X` too when it defaults to true).
    `config_from_args(cls, args)` builds the config back.
    """
    for f in flag_fields(cls):
        if f.name in skip:
            continue
        given = {**f.metadata, **(meta or {}).get(f.name, {})}
        given.pop("flag", None)
        given.pop("convert", None)
        default = _field_default(f)
        kwargs: dict[str, Any] = {"help": given.pop("help", None) or field_help(cls, f.name)}
        if "type" in given:
            kwargs["type"] = _type_of(given.pop("type"))
        kwargs.update(given)
        if isinstance(default, bool) and "action" not in kwargs:
            kwargs["action"] = argparse.BooleanOptionalAction if default else "store_true"
        if isinstance(default, tuple) and (kwargs.get("nargs") or kwargs.get("action") == "append"):
            default = list(default)
        if not kwargs.get("required"):
            kwargs["default"] = default
        p.add_argument(field_flag(f), **kwargs)


def config_from_args(cls: type[T], args: argparse.Namespace, **extra: Any) -> T:
    """`cls` from the flags `dataclass_flags(p, cls)` added (a field whose flag the parser does not
    have keeps its default); `extra` sets fields directly. `metadata["convert"]` maps a parsed
    value to the field's (e.g. a list to a tuple); lists become tuples."""
    values: dict[str, Any] = {}
    for f in flag_fields(cls):
        dest = field_dest(f)
        if f.name in extra or not hasattr(args, dest):
            continue
        value = getattr(args, dest)
        convert = f.metadata.get("convert")
        if convert is not None and value is not None:
            value = convert(value)
        elif isinstance(value, list):
            value = tuple(value)
        values[f.name] = value
    return cls(**values, **extra)


def traces_flags(p: argparse.ArgumentParser, *, limit_help: str | None = None,
                 lexicon: bool = True) -> None:
    """The `TraceSource` flags: `--traces`, `--limit`, `--strict`, `--lexicon` (unless the command
    labels no tokens), `--prompt-format` and `--scaffold` (`source_from_args` builds it)."""
    dataclass_flags(p, TraceSource, skip=() if lexicon else ("lexicon",),
                    meta={"limit": {"help": limit_help}} if limit_help else None)


def source_from_args(args: argparse.Namespace) -> TraceSource:
    """The `TraceSource` of the traces flags (`traces_flags`)."""
    return config_from_args(TraceSource, args)


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
