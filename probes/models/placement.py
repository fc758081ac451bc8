"""A model bigger than one device: `--device-map` / `--max-memory`, and the placement plan.

A `probes.models.spec.ModelSpec` carries the placement from the command line to `load_model`
(`device_map`, `max_memory`; parsed and checked there, `parse_max_memory`). With a device map,
`load_model` lets accelerate dispatch the layers over the devices
(`from_pretrained(device_map=..., max_memory=...)`); the bridge reads
the placement from `hf_device_map` (TransformerLens's `n_devices`), token ids go to the device of
the input embedding, and every hook capture is copied to the host (`device="cpu"`, the default of
`hooks.capture`) as it is taken, so the per-token arrays written to a cache never stay on a GPU.

`plan_device_map(config, max_memory=...)` computes the placement on the meta device (no weights
are allocated), for checking before a run that a model fits: every decoder layer placed, nothing
left for the CPU or disk.
"""

from __future__ import annotations

from typing import Any

import torch

from hooks.model import resolve_dtype
from probes.models.choices import DEVICE_MAPS as DEVICE_MAPS
from probes.models.spec import PlacementError as PlacementError
from probes.models.spec import parse_max_memory as parse_max_memory


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
