"""`ModelSpec`: which model to load and where, in one value (a light module: no torch).

It replaces the one `;`-joined device string that used to carry `--device-map` / `--max-memory` to
`load_model`: the command line builds a `ModelSpec` from `--model`, `--device`, `--model-dtype`,
`--device-map` and `--max-memory` (`probes.commands.flags.model_flags`), every runner takes one
(or a loaded model, or a bare name), and `load_model` hands `device_map` / `max_memory` to
`from_pretrained` as they are.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from os import PathLike
from typing import TYPE_CHECKING

from probes.errors import ProbesError
from probes.models.choices import DEVICE_MAPS, DTYPES

if TYPE_CHECKING:
    from hooks.model import LoadedModel

_SIZE_RE = re.compile(r"^\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)?$", re.IGNORECASE)


class PlacementError(ProbesError, ValueError):
    """A bad `--device-map` / `--max-memory`, or a plan that does not place the whole model."""


def parse_max_memory(text: str) -> dict[int | str, str]:
    """`"0=75GiB,1=75GiB,cpu=200GiB"` -> `{0: "75GiB", 1: "75GiB", "cpu": "200GiB"}`.

    Raises:
        PlacementError: Naming the bad entry and the accepted form.
    """
    form = ("DEVICE=SIZE[,DEVICE=SIZE...] with DEVICE a GPU index, 'cpu' or 'disk' and SIZE such "
            "as 75GiB or 80GB, e.g. 0=75GiB,1=75GiB")
    out: dict[int | str, str] = {}
    for part in (p.strip() for p in text.split(",")):
        key, sep, size = part.partition("=")
        key, size = key.strip(), size.strip()
        if not sep or not (key.isdigit() or key in ("cpu", "disk")) or not _SIZE_RE.match(size):
            raise PlacementError(f"--max-memory: cannot read {part!r}; use {form}.")
        dev: int | str = int(key) if key.isdigit() else key
        if dev in out:
            raise PlacementError(f"--max-memory: device {key!r} is given twice in {text!r}.")
        out[dev] = size.replace(" ", "")
    return out


def max_memory_flag(text: str) -> str:
    """argparse type of `--max-memory`: the text, once `parse_max_memory` reads it."""
    import argparse

    try:
        parse_max_memory(text)
    except PlacementError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix("--max-memory: ")) from None
    return text


@dataclass(frozen=True)
class ModelSpec:
    """Which model to load, on which device(s), in which dtype.

    Attributes:
        name: tiny-reasoner, a local model folder, or a hub id in the local HF cache.
        device: cpu, cuda, cuda:N or auto.
        dtype: Parameter dtype the model is loaded in.
        device_map: Split the model's layers over every visible GPU (accelerate); for a model
            bigger than one device.
        max_memory: Memory budget per device for `device_map`, e.g. 0=75GiB,1=75GiB (implies
            device_map "auto"); a mapping `{0: "75GiB"}` is taken too.

    Raises:
        ProbesError: For an empty name, an unknown device map, an unreadable budget, or a device
            other than "auto" together with a device map (`PlacementError`). An unknown device
            or dtype is refused by `load` (`hooks.model.resolve_device` / `resolve_dtype`).
    """

    name: str = field(metadata={"flag": "--model", "required": True,
                                "help": "tiny-reasoner, a local model folder, or a hub id in the "
                                        "local HF cache"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, cuda:N or auto"})
    dtype: str = field(default="float32", metadata={
        "flag": "--model-dtype", "choices": DTYPES,
        "help": "parameter dtype the model is loaded in"})
    device_map: str | None = field(default=None, metadata={
        "choices": DEVICE_MAPS,
        "help": "split the model's layers over every visible GPU (accelerate); for a model bigger "
                "than one device"})
    max_memory: str | None = field(default=None, metadata={
        "type": "max_memory", "metavar": "DEV=SIZE,...",
        "help": "memory budget per device for --device-map, e.g. 0=75GiB,1=75GiB (implies "
                "--device-map auto)"})

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ProbesError(f"model: expected a name or folder, got {self.name!r}; give "
                              f"--model tiny-reasoner, a local folder or a cached hub id")
        if not isinstance(self.dtype, str):  # a torch.dtype: its name
            object.__setattr__(self, "dtype", str(self.dtype).removeprefix("torch."))
        # The device and dtype names are checked where they are resolved, by
        # `hooks.model.resolve_device` / `resolve_dtype` (one `HooksError` naming the choices,
        # before any weights are read); the placement is checked here.
        if isinstance(self.max_memory, Mapping):
            object.__setattr__(self, "max_memory",
                               ",".join(f"{k}={v}" for k, v in self.max_memory.items()))
        if self.max_memory is not None:
            parse_max_memory(self.max_memory)
            if self.device_map is None:  # accelerate needs a map to honour a budget
                object.__setattr__(self, "device_map", "auto")
        if self.device_map is not None:
            if self.device_map not in DEVICE_MAPS:
                raise PlacementError(f"--device-map {self.device_map!r} is not one of "
                                     f"{', '.join(DEVICE_MAPS)}.")
            if self.device != "auto":
                raise PlacementError(
                    f"--device {self.device} and --device-map {self.device_map} conflict: a device "
                    f"map places the layers itself. Leave --device at auto (or drop --device-map "
                    f"for one device).")

    @property
    def max_memory_map(self) -> dict[int | str, str] | None:
        """`max_memory` as `from_pretrained` takes it (`{0: "75GiB", "cpu": "200GiB"}`)."""
        return None if self.max_memory is None else parse_max_memory(self.max_memory)


def model_spec(model: ModelSpec | LoadedModel | str | PathLike[str], *, device: object = None,
               dtype: object = None) -> ModelSpec | LoadedModel:
    """What a runner was given as its model, as a `ModelSpec` (or the loaded model as it is).

    The one place the older calling convention (`runner("tiny-reasoner", ..., device="cpu",
    dtype="float32")`) is routed into a spec; `device` / `dtype` given with a `ModelSpec` replace
    its own.
    """
    from dataclasses import replace

    changes: dict[str, object] = {}
    if device is not None:
        changes["device"] = str(device)   # a torch.device: its name
    if dtype is not None:
        changes["dtype"] = dtype

    if isinstance(model, ModelSpec):
        return replace(model, **changes) if changes else model  # type: ignore[arg-type]
    if isinstance(model, (str, PathLike)):
        return ModelSpec(str(model), **changes)  # type: ignore[arg-type]
    return model
