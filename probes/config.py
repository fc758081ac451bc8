"""Configs are the single source of the command line: a frozen dataclass per job, whose fields
(name, type, default) and docstring ("Attributes:" section) become its flags and their help.

    @dataclass(frozen=True)
    class LhatConfig:
        '''Settings of an `lhat` run.

        Attributes:
            chunk_size: Prefill chunk (tokens) through the KV cache.
        '''
        chunk_size: int = option(512, type=positive_int)

    add_flags(parser, LhatConfig)          # --chunk-size (type positive_int, default 512, help)
    cfg = from_args(LhatConfig, args)      # LhatConfig(chunk_size=args.chunk_size)

`option(...)` adds what a type annotation cannot say (a validating argparse type, choices, a
metavar, another flag spelling, nargs); every number flag gets a range-checked type. The shared
configs `ModelSpec` (which model, where, in which dtype) and `TraceSource` (which traces, how they
are tokenized) are used by every runner, so a flag such as `--scaffold` means the same everywhere.
This module imports nothing heavy: building a parser never loads torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MAX_C_INT = 2**63 - 1
"""The largest integer a flag accepts (numpy / torch take 64-bit signed integers)."""


# -- argparse types: every number flag is range-checked ---------------------------------------------
def _integer(text: str, low: int, high: int = MAX_C_INT) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"must be between {low} and {high}, got {text}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer from 1 to 2**63 − 1."""
    return _integer(text, 1)


def nonnegative_int(text: str) -> int:
    """argparse type: an integer from 0 to 2**63 − 1."""
    return _integer(text, 0)


def seed(text: str) -> int:
    """argparse type: a seed, an integer from 0 to 2**32 − 1 (numpy's seed range)."""
    return _integer(text, 0, 2**32 - 1)


def finite_float(text: str) -> float:
    """argparse type: a finite number."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def nonnegative_float(text: str) -> float:
    """argparse type: a finite number ≥ 0."""
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def unit_float(text: str) -> float:
    """argparse type: a number in [0, 1]."""
    value = finite_float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


# -- fields ------------------------------------------------------------------------------------------
def option(default: Any = dataclasses.MISSING, *, type: Callable[[str], Any] | None = None,
           choices: Sequence[Any] | None = None, metavar: str | None = None,
           flag: str | None = None, nargs: str | None = None, cli: bool = True,
           default_factory: Callable[[], Any] | None = None) -> Any:
    """A config field with what its flag needs beyond the annotation.

    Args:
        default: The default (shown once by the parser's help).
        type: The argparse type (a validator above); default: from the annotation.
        choices: The allowed values (pass the constant the code checks against).
        metavar: The value's name in the help.
        flag: The flag's spelling when not `--field-name`.
        nargs: argparse nargs for a tuple field ("+" by default).
        cli: False: a library-only setting, no flag.
        default_factory: For mutable defaults.
    """
    meta = {"type": type, "choices": tuple(choices) if choices is not None else None,
            "metavar": metavar, "flag": flag, "nargs": nargs, "cli": cli}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


_ATTR = re.compile(r"^(\s+)([A-Za-z_][A-Za-z0-9_]*)(?: \([^)]*\))?: (.*)$")


def field_docs(cls: type) -> dict[str, str]:
    """The "Attributes:" section of `cls`'s docstring: field name -> its text (one line)."""
    doc = cls.__doc__ or ""
    lines = doc.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Attributes:")
    except StopIteration:
        return {}
    out: dict[str, str] = {}
    indent: int | None = None
    name = None
    for line in lines[start + 1:]:
        if not line.strip():
            if name is not None and indent is not None:
                continue
            break
        found = _ATTR.match(line)
        if found and (indent is None or len(found.group(1)) == indent):
            indent = len(found.group(1))
            name = found.group(2)
            out[name] = found.group(3).strip()
        elif name is not None and indent is not None and len(line) - len(line.lstrip()) > indent:
            out[name] += " " + line.strip()
        else:
            break
    return out


def _base_type(annotation: Any) -> tuple[Any, bool]:
    """(the type under `X | None`, whether None is allowed)."""
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else annotation), len(rest) != len(args)
    return annotation, False


def flag_name(f: dataclasses.Field[Any]) -> str:
    """The flag of a config field: its `flag` option, else `--field-name`."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def add_flags(parser: argparse.ArgumentParser | Any, cls: type, *,
              exclude: Sequence[str] = (), help_overrides: dict[str, str] | None = None,
              defaults: dict[str, Any] | None = None) -> None:
    """Add one flag per field of the config dataclass `cls` (help from its docstring).

    Args:
        parser: A parser or argument group.
        cls: A dataclass whose fields carry `option(...)` metadata (plain fields work too).
        exclude: Fields that get no flag here (another group owns them, or library-only).
        help_overrides: Field -> help text where this command says it differently.
        defaults: Field -> default where this command's default differs from the config's.
    """
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in exclude or not f.metadata.get("cli", True):
            continue
        base, optional = _base_type(hints[f.name])
        default = (defaults or {}).get(
            f.name, f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None))
        text = (help_overrides or {}).get(f.name) or docs.get(f.name, "")
        text = text.rstrip(".")
        kwargs: dict[str, Any] = {"dest": f.name, "help": text}
        if f.metadata.get("metavar"):
            kwargs["metavar"] = f.metadata["metavar"]
        if f.metadata.get("choices") is not None:
            kwargs["choices"] = f.metadata["choices"]
        if base is bool:
            kwargs["action"] = "store_false" if default else "store_true"
        elif typing.get_origin(base) is tuple:
            item = (typing.get_args(base) or (str,))[0]
            kwargs["nargs"] = f.metadata.get("nargs") or "+"
            kwargs["type"] = f.metadata.get("type") or (Path if item is Path else str)
            kwargs["default"] = list(default or ())
        else:
            kwargs["type"] = f.metadata.get("type") or _default_type(base)
            kwargs["default"] = default
            if default is None and not optional:
                kwargs["required"] = True
        parser.add_argument(flag_name(f), **kwargs)


def _default_type(base: Any) -> Callable[[str], Any]:
    if base is int:
        return nonnegative_int
    if base is float:
        return finite_float
    if base is Path:
        return Path
    return str


def from_args(cls: type, args: argparse.Namespace, **overrides: Any) -> Any:
    """The config `cls` from parsed flags (fields without a flag keep their default)."""
    values: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in overrides or not hasattr(args, f.name):
            continue
        value = getattr(args, f.name)
        base, _ = _base_type(hints[f.name])
        if typing.get_origin(base) is tuple and value is not None:
            value = tuple(str(v) if isinstance(v, Path) else v for v in value)
        values[f.name] = value
    return cls(**values, **overrides)


# -- the shared configs -------------------------------------------------------------------------------
DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16")
"""Parameter dtypes a model can be loaded in (`hooks.model.DTYPES` is the same table; a test keeps
them equal)."""
DEVICE_MAPS: tuple[str, ...] = ("auto", "balanced", "balanced_low_0", "sequential")
"""accelerate's device-map strategies (`probes.models.placement.DEVICE_MAPS`, tested equal)."""


@dataclass(frozen=True)
class ModelSpec:
    """Which model, where, and in which dtype (what `load_model` takes).

    Attributes:
        model: tiny-reasoner, a local model folder, or a hub id in the local HF cache.
        device: cpu, cuda, cuda:N or auto.
        model_dtype: Parameter dtype the model is loaded in.
        device_map: Split the model's layers over every visible GPU (accelerate); for a model
            bigger than one device.
        max_memory: Memory budget per device for --device-map, e.g. 0=75GiB,1=75GiB (implies
            --device-map auto).
    """

    model: str = option(None)
    device: str = option("auto")
    model_dtype: str = option("float32", choices=DTYPES)
    device_map: str | None = option(None, choices=DEVICE_MAPS)
    max_memory: str | None = option(None, metavar="DEV=SIZE,...")


@dataclass(frozen=True)
class TraceSource:
    """Which traces, and how they are read and tokenized.

    Attributes:
        traces: JSONL traces.
        limit: Use only the first N traces.
        strict: Fail on the first bad JSONL line instead of skipping it.
        lexicon: Extra lexicon JSON merged into the built-in one (repeatable).
        prompt_format: Prompt template with {question} (default: the tokenizer's chat template,
            else the documented default prompt).
        scaffold: Text between the trajectory and the answer (RaML's answer scaffold by default).
    """

    traces: Path = option(None)
    limit: int | None = option(None, type=positive_int, metavar="N")
    strict: bool = option(False)
    lexicon: tuple[str, ...] = option((), type=Path, nargs="*")
    prompt_format: str | None = option(None, metavar="TEMPLATE")
    scaffold: str = option("\n\n**Final Answer**\n\\boxed{")
