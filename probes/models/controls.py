"""Control models: a seeded random initialisation of the same architecture and tokenizer."""

from __future__ import annotations

from hooks.model import LoadedModel
from probes.models.choices import CONTROLS as CONTROLS
from probes.models.identity import model_label
from probes.models.load import boot_model


def random_init_model(loaded: LoadedModel, seed: int) -> LoadedModel:
    """A randomly initialised model with the same architecture and tokenizer as `loaded`.

    Args:
        loaded: The trained model (its config, tokenizer, device and dtype are reused).
        seed: `torch.manual_seed` before `AutoModelForCausalLM.from_config`.

    Returns:
        The booted random model; its spec is `"<model label>+random-init(<seed>)"`.
    """
    import torch
    from transformers import AutoModelForCausalLM


    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(loaded.hf_model.config)
    return boot_model(hf, loaded.tokenizer, spec=f"{model_label(loaded)}+random-init({seed})",
                      device=loaded.device, dtype=loaded.arch.dtype)
