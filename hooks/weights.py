"""Per-architecture weight views: the decoder layers of a model, by role.

`llama_layers(model)` is the one check that a model has the Llama-style layout the implicit-update
measurements need (Qwen2 / Qwen2.5 / DeepSeek-R1-Distill-Qwen, Qwen3, Llama: RoPE, attention with
q/k/v/o projections, RMSNorm before attention and MLP, a gated MLP with gate/up/down projections),
and the one place that knows the Hugging Face module names. Every measurement asks it instead of
reaching into `model.model.layers[i].mlp.gate_proj` itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from hooks.errors import UnsupportedModelError
from hooks.model import LoadedModel

LLAMA_STYLE = "Qwen2/Qwen2.5, DeepSeek-R1-Distill-Qwen, Qwen3, Llama"
"""The families that have the Llama-style layout (named in every refusal)."""


@dataclass(frozen=True)
class LlamaLayer:
    """One decoder layer's modules by role (Hugging Face names in brackets).

    Attributes:
        module: The decoder layer itself.
        attn_norm: RMSNorm before attention [input_layernorm].
        q_proj, k_proj, v_proj, o_proj: Attention projections [self_attn.*_proj].
        mlp_norm: RMSNorm before the MLP [post_attention_layernorm].
        gate_proj, up_proj, down_proj: The gated MLP [mlp.*_proj].

    The projections are `nn.Linear` in a plain HF model and the bridge components wrapping them
    once the model is booted (both expose `.weight` and `.bias`), hence typed `nn.Module`.
    """

    module: nn.Module
    attn_norm: nn.Module
    q_proj: nn.Module
    k_proj: nn.Module
    v_proj: nn.Module
    o_proj: nn.Module
    mlp_norm: nn.Module
    gate_proj: nn.Module
    up_proj: nn.Module
    down_proj: nn.Module

    @property
    def norm_eps(self) -> float:
        """ε of the MLP's RMSNorm."""
        return float(getattr(self.mlp_norm, "variance_epsilon", getattr(self.mlp_norm, "eps", 0.0)))


def llama_layers(
    model: LoadedModel | nn.Module,
    *,
    what: str,
    error: type[Exception] = UnsupportedModelError,
    require_rope: bool = False,
) -> list[LlamaLayer]:
    """The decoder layers of a Llama-style model, or one clear refusal.

    Args:
        model: A `LoadedModel` or its Hugging Face causal LM.
        what: The measurement that needs the layout (named in the error).
        error: The exception class to raise (a measurement's own error class).
        require_rope: Also require rotary positions and a gated MLP from the `ArchInfo` (only
            possible for a `LoadedModel`).

    Returns:
        One `LlamaLayer` per decoder layer.

    Raises:
        `error`: Naming what is missing and the supported families.
    """
    hf = model.hf_model if isinstance(model, LoadedModel) else model
    family = model.arch.family if isinstance(model, LoadedModel) else type(model).__name__
    spec = f"{model.spec!r} is a {family!r} model" if isinstance(model, LoadedModel) else (
        f"{family!r} does not have them")
    if require_rope and isinstance(model, LoadedModel):
        arch = model.arch
        if arch.positional != "rope" or arch.mlp != "gated":
            raise error(
                f"{what} needs a Llama-style model with RoPE and a gated MLP ({LLAMA_STYLE}); "
                f"{spec} (positional={arch.positional!r}). Use one of those architectures."
            )
    try:
        return [_view(layer) for layer in hf.model.layers]
    except AttributeError as exc:
        raise error(
            f"{what} needs a Llama-style model with RoPE and a gated MLP ({LLAMA_STYLE}): "
            f"model.layers[i] with input_layernorm, self_attn.q/k/v/o_proj, "
            f"post_attention_layernorm and mlp.gate/up/down_proj; {spec} "
            f"(missing: {exc.name or exc})."
        ) from exc


def _view(layer: Any) -> LlamaLayer:
    attn, mlp = layer.self_attn, layer.mlp
    return LlamaLayer(
        module=layer, attn_norm=layer.input_layernorm, q_proj=attn.q_proj, k_proj=attn.k_proj,
        v_proj=attn.v_proj, o_proj=attn.o_proj, mlp_norm=layer.post_attention_layernorm,
        gate_proj=mlp.gate_proj, up_proj=mlp.up_proj, down_proj=mlp.down_proj,
    )
