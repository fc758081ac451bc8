"""A model bigger than one device: `--device-map` / `--max-memory`, and the placement plan.

One device string carries the whole placement from the command line to `load_model`:
`"auto"`, `"cuda:0"`, or `"auto;device_map=auto;max_memory=0=75GiB,1=75GiB"` (see
`device_spec` / `split_device_spec`). With a device map, `load_model` lets accelerate dispatch
the layers over the devices (`from_pretrained(device_map=..., max_memory=...)`); the bridge reads
the placement from `hf_device_map` (TransformerLens's `n_devices`), token ids go to the device of
the input embedding, and every hook capture is copied to the host (`device="cpu"`, the default of
`hooks.capture`) as it is taken, so the per-token arrays written to a cache never stay on a GPU.

`plan_device_map(config, max_memory=...)` computes the placement on the meta device (no weights
are allocated), for checking before a run that a model fits: every decoder layer placed, nothing
left for the CPU or disk.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from hooks.model import DEVICE_SPEC_SEP
from probes.errors import ProbesError
from probes.models.choices import DEVICE_MAPS as DEVICE_MAPS

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


def device_spec(device: str, device_map: str | None, max_memory: str | None) -> str:
    """One device string for `load_model`: `device` plus the placement parts that are set.

    `max_memory` without `device_map` means `device_map="auto"` (accelerate needs a map to honour
    a budget).
    """
    base = device.split(DEVICE_SPEC_SEP, 1)[0]
    if max_memory is not None and device_map is None:
        device_map = "auto"
    parts = [base]
    if device_map is not None:
        parts.append(f"device_map={device_map}")
    if max_memory is not None:
        parts.append(f"max_memory={max_memory}")
    return DEVICE_SPEC_SEP.join(parts)


def split_device_spec(device: str | torch.device
                      ) -> tuple[str | torch.device, str | None, dict[int | str, str] | None]:
    """The inverse of `device_spec`: `(device, device_map or None, max_memory or None)`.

    Raises:
        PlacementError: For an unknown part, an unknown device map, a bad budget, or a device
            other than "auto" together with a device map.
    """
    if not isinstance(device, str) or DEVICE_SPEC_SEP not in device:
        return device, None, None
    base, *parts = device.split(DEVICE_SPEC_SEP)
    device_map: str | None = None
    max_memory: dict[int | str, str] | None = None
    for part in parts:
        key, _, value = part.partition("=")
        if key == "device_map":
            if value not in DEVICE_MAPS:
                raise PlacementError(f"--device-map {value!r} is not one of {', '.join(DEVICE_MAPS)}.")
            device_map = value
        elif key == "max_memory":
            max_memory = parse_max_memory(value)
        else:
            raise PlacementError(f"device string {device!r}: unknown part {part!r} (expected "
                                 f"device_map=... or max_memory=...).")
    if device_map is not None and base != "auto":
        raise PlacementError(
            f"--device {base} and --device-map {device_map} conflict: a device map places the "
            f"layers itself. Leave --device at auto (or drop --device-map for one device).")
    return base, device_map, max_memory


def max_memory_bytes(max_memory: dict[int | str, str]) -> dict[int | str, int]:
    """The budgets in bytes (accelerate's parser: GiB = 2^30, GB = 10^9)."""
    from accelerate.utils import convert_file_size_to_int

    return {k: int(convert_file_size_to_int(v)) for k, v in max_memory.items()}


def plan_device_map(config: Any, *, max_memory: dict[int | str, str | int],
                    dtype: str | torch.dtype = "bfloat16", strategy: str = "auto",
                    ) -> dict[str, int | str]:
    """Where accelerate would put each module of `config`'s model under `max_memory`.

    The model is built on the meta device (`accelerate.init_empty_weights`: no memory for the
    weights), and `infer_auto_device_map` places its modules, never splitting a decoder layer
    (`_no_split_modules`). Nothing is loaded or downloaded.

    Args:
        config: A transformers config, or a dict with its `model_type` (e.g. a config.json).
        max_memory: Budget per device, e.g. `{0: "75GiB", 1: "75GiB"}` (sizes or bytes).
        dtype: The parameter dtype the model would be loaded in.
        strategy: "auto"/"sequential" (fill device 0 first) or "balanced" / "balanced_low_0".

    Returns:
        Module name -> device (a GPU index, "cpu" or "disk" where the budgets ran out).

    Raises:
        PlacementError: For an unknown strategy or config.
    """
    from accelerate import init_empty_weights
    from accelerate.utils import get_balanced_memory, infer_auto_device_map
    from transformers import AutoConfig, AutoModelForCausalLM

    from hooks.model import resolve_dtype

    if strategy not in DEVICE_MAPS:
        raise PlacementError(f"device map strategy {strategy!r} is not one of "
                             f"{', '.join(DEVICE_MAPS)}.")
    if isinstance(config, dict):
        data = dict(config)
        model_type = data.pop("model_type", None)
        if model_type is None:
            raise PlacementError("plan_device_map: the config dict has no 'model_type'.")
        config = AutoConfig.for_model(model_type, **data)
    torch_dtype = resolve_dtype(dtype)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    no_split = list(getattr(model, "_no_split_modules", None) or [])
    budget: dict[int | str, str | int] = dict(max_memory)
    if strategy != "auto" and strategy != "sequential":
        budget = get_balanced_memory(model, max_memory=budget, no_split_module_classes=no_split,
                                     dtype=torch_dtype, low_zero=strategy == "balanced_low_0")
    return infer_auto_device_map(model, max_memory=budget, no_split_module_classes=no_split,
                                 dtype=torch_dtype)


def dispatched_device(hf_model: torch.nn.Module) -> torch.device | None:
    """The device of the input embedding of a model dispatched with a device map, else None."""
    if not getattr(hf_model, "hf_device_map", None):
        return None
    return hf_model.get_input_embeddings().weight.device
