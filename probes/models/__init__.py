"""Models: offline loading, KV-cache parity, random-init controls and models built in code.

`load_model(spec)` loads a built-in name, a local Hugging Face folder or a hub id already in the
local HF cache as a TransformerLens bridge (`hooks.model.LoadedModel`); `boot_model` does the same
for a model built in code. `placement.plan_device_map` shows where a model bigger than one device
would go (`--device-map` / `--max-memory`); `hooks.weights.layer_views` describes each family's
layers by role.
"""

from __future__ import annotations

import importlib
from typing import Any

_FACE = {
    "ArchInfo": "hooks.model",
    "LoadedModel": "hooks.model",
    "kv_parity": "probes.models.kv",
    "BUILTIN_MODELS": "probes.models.load",
    "boot_model": "probes.models.load",
    "load_model": "probes.models.load",
    "load_tokenizer": "probes.models.load",
    "plan_device_map": "probes.models.placement",
    "ModelSpec": "probes.models.spec",
}
"""Each public name and the module that defines it (imported on first use, PEP 562: the light
`probes.models.choices` is read by the command line without loading torch)."""

__all__ = sorted(_FACE)


def __getattr__(name: str) -> Any:
    """Import a public name's module on first use."""
    module = _FACE.get(name)
    if module is None:
        raise AttributeError(f"module 'probes.models' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
