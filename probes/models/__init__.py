"""Models: offline loading, KV-cache parity, random-init controls and models built in code.

`load_model(spec)` loads a built-in name, a local Hugging Face folder or a hub id already in the
local HF cache as a TransformerLens bridge (`hooks.model.LoadedModel`); `boot_model` does the same
for a model built in code. `placement.plan_device_map` shows where a model bigger than one device
would go (`--device-map` / `--max-memory`); `hooks.weights.layer_views` describes each family's
layers by role.
"""

from hooks.model import ArchInfo, LoadedModel
from probes.models.kv import kv_parity
from probes.models.load import BUILTIN_MODELS, boot_model, load_model, load_tokenizer
from probes.models.placement import plan_device_map

__all__ = [
    "BUILTIN_MODELS",
    "ArchInfo",
    "LoadedModel",
    "boot_model",
    "kv_parity",
    "load_model",
    "load_tokenizer",
    "plan_device_map",
]
