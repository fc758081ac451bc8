"""Which model families the per-token update measurements (M1–M7) run on, and how.

The measurements are written once for the block of `hooks.weights.LayerView`; this module holds
what still differs per family, the tables derived from the family records (`hooks.families`):
whether `updates` measures it at all (`UPDATE_FAMILIES`), whether its eager reference pass works
(`EAGER_MISSING`) and its linear-memory pass (`SDPA_MISSING`); and which bridge sites hold the
queries and keys as the softmax sees them (`qk_sites`), the model the eager gradient pass runs on
(`eager_model`) and the norms around the sublayers as float64 functions (`norm_functions`).

* Llama, Qwen2/2.5 (and the R1-Distill models), Qwen3, Mistral: the Llama layout.
* GPT-2: LayerNorm, learned positions (q and k are not rotated: the bridge's `hook_q` / `hook_k`
  are what the softmax sees), a plain GELU MLP (its one input matrix W_in = `c_fc` takes the place
  of W_gate; there is no up projection), Conv1D weights.
* Phi-3 / Phi-4: fused `qkv_proj` and `gate_up_proj` (the views are slices). The Phi-3 bridge does
  not fire `hook_rot_q` / `hook_rot_k`, so its M1–M4 come from the linear-memory pass only.
* OLMo-2: q/k norms (the rotated q/k are taken after them), no norm before the sublayers, a norm
  after each: the MLP reads m itself, and m = x + N_ao(W_O z + b_O). M2 / M4 are measured before
  N_ao (in o_proj output units: Σ_t Σ_h c_{h,t} + b_O is the o_proj output, not the residual
  update); M5–M7 go through N_ao exactly.
* Gemma-2/3: a (1 + γ) RMSNorm before and after each sublayer, GeGLU, the query scale
  `query_pre_attn_scalar^-1/2`, sliding-window layers (the pattern rows keep the window); M2 / M4
  before N_ao as for OLMo-2. Gemma-2 also soft-caps its attention logits, c·tanh(s/c), which the
  fused kernel cannot do: Gemma-2 runs on the eager pass only (`SDPA_MISSING`).

Any other family is refused in one line (`check_family`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from hooks.families import FAMILIES, model_types
from hooks.hf_fast import plain_view
from hooks.model import LoadedModel
from hooks.weights import LLAMA_FAMILIES, LayerView, layer_views

__all__ = [
    "EAGER_MISSING",
    "SDPA_MISSING",
    "UPDATE_FAMILIES",
    "check_family",
    "eager_model",
    "family_of",
    "norm_functions",
    "qk_sites",
]

UPDATE_FAMILIES = model_types(lambda f: f.updates)
"""`model_type`s whose per-token updates (M1–M7) are measured (`hooks.families.Family.updates`)."""

EAGER_MISSING = {f.model_type: f.eager_missing for f in FAMILIES
                 if f.updates and f.eager_missing is not None}
"""Families measured on the linear-memory pass only, with the reason the eager reference cannot
run on them (`hooks.families.Family.eager_missing`)."""

SDPA_MISSING = {f.model_type: f.sdpa_missing for f in FAMILIES
                if f.updates and f.sdpa_missing is not None}
"""Families measured on the eager pass only, with the reason the linear-memory pass cannot run on
them (`hooks.families.Family.sdpa_missing`)."""


def family_of(model: LoadedModel | nn.Module) -> str:
    """The HF `model_type` of a loaded model or an HF model."""
    if isinstance(model, LoadedModel):
        return model.arch.family
    return str(getattr(getattr(model, "config", None), "model_type", type(model).__name__))


def check_family(model: LoadedModel | nn.Module, *, what: str, error: type[Exception],
                 attention: str | None = None) -> str:
    """Refuse, in one line, a family the update measurements do not handle (or its eager pass).

    Args:
        model: A loaded model or its HF model.
        what: The measurement (named in the error).
        error: The exception class to raise.
        attention: "eager" also refuses a family in `EAGER_MISSING`, "sdpa" one in
            `SDPA_MISSING`; None / "auto" neither.

    Returns:
        The family (`model_type`).

    Raises:
        `error`: For a family outside `UPDATE_FAMILIES` (naming what is missing) or an eager pass
            its bridge cannot capture.
    """
    family = family_of(model)
    supported = ", ".join(UPDATE_FAMILIES)
    if family not in UPDATE_FAMILIES:
        raise error(f"{what} does not measure {family!r} models yet: it needs a weight view in "
                    f"hooks/weights.py and a tested pass; supported: {supported}.")
    if attention == "eager" and family in EAGER_MISSING:
        raise error(f"{what}: no eager pass for {family!r} models ({EAGER_MISSING[family]}); use "
                    f"attention 'sdpa' or 'auto' (the linear-memory pass, the same arrays).")
    if attention == "sdpa" and family in SDPA_MISSING:
        raise error(f"{what}: no linear-memory pass for {family!r} models ({SDPA_MISSING[family]});"
                    f" use attention 'eager' or 'auto' (memory grows as the square of the trace).")
    return family


def qk_sites(loaded: LoadedModel) -> tuple[str, str]:
    """The bridge components of the queries and keys as the softmax sees them: the rotated ones
    for RoPE models, `attn.q` / `attn.k` for learned positions (GPT-2)."""
    if loaded.arch.positional == "rope":
        return "attn.rot_q", "attn.rot_k"
    return "attn.q", "attn.k"


def eager_model(hf: nn.Module) -> nn.Module:
    """The model the eager gradient pass (`answer_alignment(attention="eager")`) hooks.

    The Llama layout: `hf` itself (booted or not; its projections fire their hooks inside the
    bridge too, so the bridge captures can ride on the same forward). Any other family: a plain-HF
    view with eager attention (`hooks.hf_fast.plain_view`, parameters shared), because the bridge
    runs fused projections (GPT-2's `c_attn`, Phi-3's `qkv_proj` / `gate_up_proj`) through its own
    split weights, so hooks on the HF modules would not fire.
    """

    if family_of(hf) in LLAMA_FAMILIES:
        return hf
    return plain_view(hf, "eager")


def norm_functions(view: LayerView, device: torch.device | str
                   ) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor] | None]:
    """(u = N_mlp_in(m), N_attn_out or None) of one layer as float64 functions on `device`.

    N_mlp_in is the identity where no norm precedes the MLP.
    """
    def as_fn(norm) -> Callable[[Tensor], Tensor] | None:
        if norm is None:
            return None
        weight = norm.weight.detach().to(device, torch.float64)
        bias = None if norm.bias is None else norm.bias.detach().to(device, torch.float64)
        return lambda x: norm.apply(x, weight=weight, bias=bias)

    mlp_in = as_fn(view.mlp_in_norm)
    return (mlp_in if mlp_in is not None else (lambda m: m)), as_fn(view.attn_out_norm)


def views(model: LoadedModel | nn.Module, *, what: str, error: type[Exception]
          ) -> list[LayerView]:
    """`hooks.weights.layer_views` after `check_family` (the one entry point of the measurements)."""
    check_family(model, what=what, error=error)
    return layer_views(model, what=what, error=error)
