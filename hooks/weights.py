"""Per-architecture weight views: the decoder layers of a model, by role.

The one place that knows the Hugging Face module names of each block layout (which family has
which layout, and where its blocks are, is its record in `hooks.families`). A
measurement asks a view for what it needs (q/k/v/o weights, the MLP input matrices, the norm before
and after each sublayer, the activation, the attention scale) instead of reaching into
`model.model.layers[i].mlp.gate_proj` or branching on the family itself.

* `layer_views(model, what=...)` → one `LayerView` per decoder layer for every family in
  `FAMILIES`: Llama / Qwen2 / Qwen2.5 / DeepSeek-R1-Distill / Qwen3 / Mistral (the Llama layout),
  Phi-3 / Phi-4 (fused `qkv_proj` and `gate_up_proj`: the views are slices of the fused weights),
  Gemma-2 / Gemma-3 (a norm after attention and after the MLP, RMSNorm scaled by 1 + γ, GeGLU,
  query scale `query_pre_attn_scalar^-1/2`, attention logit soft-capping on Gemma-2), OLMo-2 (no
  norm before the sublayers, a norm after each), GPT-2 (LayerNorm, GELU without a gate, Conv1D
  weights: the view transposes them to the `[out, in]` layout). Anything else is refused with one
  line naming its `model_type` and the supported ones.
* `llama_layers(model, what=...)` → the strict Llama-layout view (`LlamaLayer`, the HF modules
  themselves) for the measurements that still hook those modules by name; it refuses every family
  outside `LLAMA_FAMILIES` with one line naming what is missing (a Gemma / OLMo-2 block has the
  same module names but a different computation, so names alone are not the check).

Weights in a view are `[out, in]` tensors sharing storage with the model (a slice or transpose
view, never a copy): an in-place edit of a view edits the model.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from hooks.errors import UnsupportedModelError
from hooks.families import FAMILIES as RECORDS
from hooks.families import family_of_model_type, model_types
from hooks.model import LoadedModel

LLAMA_FAMILIES = model_types(lambda f: f.llama_layout)
"""`model_type`s with the Llama layout: RMSNorm before attention and MLP, separate q/k/v/o
projections, a gated SiLU MLP with gate/up/down projections, nothing after the sublayers."""

LLAMA_STYLE = ", ".join(f.label for f in RECORDS if f.llama_layout)
"""The families that have the Llama-style layout (named in every refusal)."""

FAMILIES = model_types()
"""Every `model_type` `layer_views` describes (every record of `hooks.families`)."""


@dataclass(frozen=True)
class Norm:
    """One normalisation layer, as a function the measurements can re-evaluate (float64).

    Attributes:
        kind: "rms" (γ ⊙ x/rms(x)), "rms_1p" (Gemma: (1 + γ) ⊙ x/rms(x)) or "layer" (LayerNorm:
            γ ⊙ (x − mean)/std + β).
        weight: γ [d] (the model's parameter).
        bias: β [d] for LayerNorm, else None.
        eps: ε inside the square root.
        module: The norm module itself.
    """

    kind: str
    weight: Tensor
    bias: Tensor | None
    eps: float
    module: nn.Module

    def apply(self, x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
        """The norm of `x` over its last axis, in `x`'s dtype (pass float64 copies of the
        parameters as `weight` / `bias` to keep everything in float64 on `x`'s device)."""
        w = (self.weight if weight is None else weight).to(x)
        if self.kind == "layer":
            b = self.bias if bias is None else bias
            xc = x - x.mean(-1, keepdim=True)
            out = w * xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + self.eps)
            return out if b is None else out + b.to(x)
        scale = (1.0 + w) if self.kind == "rms_1p" else w
        return scale * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


@dataclass(frozen=True)
class LayerView:
    """One decoder layer by role, for any family in `FAMILIES`.

    The block computes m = x + N_attn_out(attn(N_attn_in(x))), y = m + N_mlp_out(mlp(N_mlp_in(m))),
    where a missing norm (None) is the identity; the MLP is act(W_gate u + b) ⊙ (W_up u + b) when
    gated, act(W_in u + b) when plain; attention scores are tanh(s/c)·c with soft-cap c (else s),
    s = q̃·k̃ · `attn_scale`.

    Attributes:
        family: The HF `model_type`.
        module: The decoder layer itself.
        attn_in_norm, attn_out_norm, mlp_in_norm, mlp_out_norm: The norms around the sublayers.
        w_q, w_k, w_v: Projection weights [H·d_h or H_kv·d_h, d] (views of fused weights where fused).
        b_q, b_k, b_v: Their biases or None.
        o_proj: The output projection module (its input is z, [.., H·d_h]).
        w_o: Its weight [d, H·d_h]; b_o its bias or None.
        mlp_in: The MLP input matrices [d_mlp, d] by name: {"gate", "up"} (gated) or {"in"} (plain).
        mlp_in_bias: Their biases by the same names (None where absent).
        w_down: The MLP output matrix [d, d_mlp]; b_down its bias or None.
        act: The HF activation name of the MLP (e.g. "silu", "gelu_pytorch_tanh", "gelu_new").
        attn_scale: The factor on q̃·k̃ before the softmax.
        attn_softcap: Gemma-2's attention logit soft-cap, or None.
        qk_norm: Whether q and k pass through a norm before RoPE (Qwen3, Gemma-3, OLMo-2).
        attn: The attention module (its HF forward returns (output, pattern or None)).
        mlp: The MLP module (its input is u, the MLP input; m itself where no norm precedes it).
        down: The MLP output module (its input is φ).
        outputs: Where a forward hook finds a tensor by name: {"v", and each name of `mlp_in`} →
            (module, column slice of its output): v = the values [.., H_kv·d_h], "gate" / "up" /
            "in" = the MLP pre-activations W u + b (slices of a fused projection where fused).
        mlp_params: The parameters behind `mlp_in` (one fused tensor or one per matrix), the ones
            a gradient is taken with respect to.
        mlp_split: Maps tensors shaped like `mlp_params` (e.g. their gradients) to the `mlp_in`
            layout {name: [d_mlp, d]} (the same slices / transposes as the weights).
    """

    family: str
    module: nn.Module
    attn_in_norm: Norm | None
    attn_out_norm: Norm | None
    mlp_in_norm: Norm | None
    mlp_out_norm: Norm | None
    w_q: Tensor
    w_k: Tensor
    w_v: Tensor
    b_q: Tensor | None
    b_k: Tensor | None
    b_v: Tensor | None
    o_proj: nn.Module
    w_o: Tensor
    b_o: Tensor | None
    mlp_in: dict[str, Tensor]
    mlp_in_bias: dict[str, Tensor | None]
    w_down: Tensor
    b_down: Tensor | None
    act: str
    attn_scale: float
    attn_softcap: float | None
    qk_norm: bool
    attn: nn.Module
    mlp: nn.Module
    down: nn.Module
    outputs: dict[str, tuple[nn.Module, slice]]
    mlp_params: tuple[Tensor, ...]
    mlp_split: Callable[..., dict[str, Tensor]]

    @property
    def gated(self) -> bool:
        """True for act(gate) ⊙ up, False for act(W_in u)."""
        return "gate" in self.mlp_in

    @property
    def llama_like(self) -> bool:
        """The Llama computation: RMSNorm before each sublayer, nothing after, a gated MLP."""
        return (self.attn_out_norm is None and self.mlp_out_norm is None and self.gated
                and self.mlp_in_norm is not None and self.mlp_in_norm.kind == "rms")


def _hf(model: LoadedModel | nn.Module) -> Any:
    """The HF causal LM, walked by attribute name (torch types `Module.x` as `Tensor | Module`)."""
    return model.hf_model if isinstance(model, LoadedModel) else model


def _family(hf: nn.Module) -> str:
    config = getattr(hf, "config", None)
    return str(getattr(config, "model_type", type(hf).__name__))


def _norm(module: Any, kind: str = "rms") -> Norm:
    eps = getattr(module, "variance_epsilon", None)
    if eps is None:
        eps = getattr(module, "eps", None)
    if eps is None:
        raise AttributeError(f"{type(module).__name__}.eps", name="norm eps")
    return Norm(kind=kind, weight=module.weight, bias=getattr(module, "bias", None),
                eps=float(eps), module=module)


def _bias(module: nn.Module) -> Tensor | None:
    return getattr(module, "bias", None)


def _act_name(config: Any) -> str:
    for name in ("hidden_activation", "hidden_act", "activation_function"):
        value = getattr(config, name, None)
        if isinstance(value, str):
            return value
    return "silu"


def _attn_common(attn: Any, family: str) -> dict[str, Any]:
    o = attn.o_proj
    return {"attn": attn, "o_proj": o, "w_o": o.weight, "b_o": _bias(o),
            "attn_scale": float(attn.scaling),
            "attn_softcap": getattr(attn, "attn_logit_softcapping", None)
            if family in _SOFTCAP else None,
            "qk_norm": hasattr(attn, "q_norm")}


def _separate_qkv(attn: Any) -> dict[str, Any]:
    return {"w_q": attn.q_proj.weight, "w_k": attn.k_proj.weight, "w_v": attn.v_proj.weight,
            "b_q": _bias(attn.q_proj), "b_k": _bias(attn.k_proj), "b_v": _bias(attn.v_proj)}


def _gated(mlp: Any) -> dict[str, Any]:
    return {"mlp_in": {"gate": mlp.gate_proj.weight, "up": mlp.up_proj.weight},
            "mlp_in_bias": {"gate": _bias(mlp.gate_proj), "up": _bias(mlp.up_proj)},
            "w_down": mlp.down_proj.weight, "b_down": _bias(mlp.down_proj),
            "mlp": mlp, "down": mlp.down_proj,
            "mlp_params": (mlp.gate_proj.weight, mlp.up_proj.weight),
            "mlp_split": lambda gate, up: {"gate": gate, "up": up}}


_ALL = slice(None)


def _separate_outputs(attn: Any, mlp: Any) -> dict[str, tuple[nn.Module, slice]]:
    return {"v": (attn.v_proj, _ALL), "gate": (mlp.gate_proj, _ALL), "up": (mlp.up_proj, _ALL)}


def _llama_view(layer: Any, family: str, config: Any) -> LayerView:
    attn = layer.self_attn
    return LayerView(
        family=family, module=layer, attn_in_norm=_norm(layer.input_layernorm),
        attn_out_norm=None, mlp_in_norm=_norm(layer.post_attention_layernorm), mlp_out_norm=None,
        **_separate_qkv(attn), **_attn_common(attn, family), **_gated(layer.mlp),
        act=_act_name(config), outputs=_separate_outputs(attn, layer.mlp),
    )


def _phi3_view(layer: Any, family: str, config: Any) -> LayerView:
    attn, mlp = layer.self_attn, layer.mlp
    qkv = attn.qkv_proj.weight                       # [(H + 2 H_kv) d_h, d]
    n_q = config.num_attention_heads * attn.head_dim
    n_kv = config.num_key_value_heads * attn.head_dim
    d_mlp = mlp.gate_up_proj.weight.shape[0] // 2    # gate_up_proj output = [gate | up]
    gate_up = mlp.gate_up_proj.weight
    return LayerView(
        family=family, module=layer, attn_in_norm=_norm(layer.input_layernorm),
        attn_out_norm=None, mlp_in_norm=_norm(layer.post_attention_layernorm), mlp_out_norm=None,
        w_q=qkv[:n_q], w_k=qkv[n_q:n_q + n_kv], w_v=qkv[n_q + n_kv:], b_q=None, b_k=None, b_v=None,
        **_attn_common(attn, family),
        mlp_in={"gate": gate_up[:d_mlp], "up": gate_up[d_mlp:]},
        mlp_in_bias={"gate": None, "up": None}, w_down=mlp.down_proj.weight,
        b_down=_bias(mlp.down_proj), act=_act_name(config), mlp=mlp, down=mlp.down_proj,
        outputs={"v": (attn.qkv_proj, slice(n_q + n_kv, None)),
                 "gate": (mlp.gate_up_proj, slice(0, d_mlp)),
                 "up": (mlp.gate_up_proj, slice(d_mlp, None))},
        mlp_params=(mlp.gate_up_proj.weight,),
        mlp_split=lambda gu: {"gate": gu[:d_mlp], "up": gu[d_mlp:]},
    )


def _gemma_view(layer: Any, family: str, config: Any) -> LayerView:
    attn = layer.self_attn
    return LayerView(
        family=family, module=layer, attn_in_norm=_norm(layer.input_layernorm, "rms_1p"),
        attn_out_norm=_norm(layer.post_attention_layernorm, "rms_1p"),
        mlp_in_norm=_norm(layer.pre_feedforward_layernorm, "rms_1p"),
        mlp_out_norm=_norm(layer.post_feedforward_layernorm, "rms_1p"),
        **_separate_qkv(attn), **_attn_common(attn, family), **_gated(layer.mlp),
        act=_act_name(config), outputs=_separate_outputs(attn, layer.mlp),
    )


def _olmo2_view(layer: Any, family: str, config: Any) -> LayerView:
    attn = layer.self_attn
    return LayerView(
        family=family, module=layer, attn_in_norm=None,
        attn_out_norm=_norm(layer.post_attention_layernorm), mlp_in_norm=None,
        mlp_out_norm=_norm(layer.post_feedforward_layernorm),
        **_separate_qkv(attn), **_attn_common(attn, family), **_gated(layer.mlp),
        act=_act_name(config), outputs=_separate_outputs(attn, layer.mlp),
    )


def _gpt2_view(layer: Any, family: str, config: Any) -> LayerView:
    attn, mlp = layer.attn, layer.mlp
    d = config.n_embd
    # Conv1D weights are [in, out] (y = x W + b): transpose views give the [out, in] layout.
    c_attn = attn.c_attn.weight.T if hasattr(attn, "c_attn") else None
    if c_attn is None:
        raise AttributeError("attn.c_attn", name="attn.c_attn")
    b_attn = attn.c_attn.bias
    head_dim = d // config.n_head
    scale = head_dim ** -0.5 if getattr(config, "scale_attn_weights", True) else 1.0
    return LayerView(
        family=family, module=layer, attn_in_norm=_norm(layer.ln_1, "layer"), attn_out_norm=None,
        mlp_in_norm=_norm(layer.ln_2, "layer"), mlp_out_norm=None,
        w_q=c_attn[:d], w_k=c_attn[d:2 * d], w_v=c_attn[2 * d:],
        b_q=b_attn[:d], b_k=b_attn[d:2 * d], b_v=b_attn[2 * d:],
        o_proj=attn.c_proj, w_o=attn.c_proj.weight.T, b_o=attn.c_proj.bias,
        mlp_in={"in": mlp.c_fc.weight.T}, mlp_in_bias={"in": mlp.c_fc.bias},
        w_down=mlp.c_proj.weight.T, b_down=mlp.c_proj.bias, act=_act_name(config),
        attn_scale=scale, attn_softcap=None, qk_norm=False, attn=attn, mlp=mlp, down=mlp.c_proj,
        outputs={"v": (attn.c_attn, slice(2 * d, 3 * d)), "in": (mlp.c_fc, _ALL)},
        mlp_params=(mlp.c_fc.weight,), mlp_split=lambda w: {"in": w.T},
    )


_LAYOUT_BUILDERS: dict[str, Callable[[Any, str, Any], LayerView]] = {
    "llama": _llama_view,
    "phi3": _phi3_view,
    "gemma": _gemma_view,
    "olmo2": _olmo2_view,
    "gpt2": _gpt2_view,
}
"""`hooks.families.Family.weight_layout` -> the view builder of that block layout."""

_BUILDERS = {f.model_type: _LAYOUT_BUILDERS[f.weight_layout] for f in RECORDS}

_SOFTCAP = frozenset(model_types(lambda f: f.attn_softcap))
"""Families whose attention applies `attn_logit_softcapping` (Gemma-2)."""

_BLOCKS = {f.model_type: f.blocks for f in RECORDS}
"""Where each family's decoder layers are in the CausalLM."""


def _blocks(hf: Any, family: str) -> Any:
    return functools.reduce(getattr, _BLOCKS[family].split("."), hf)


def layer_views(
    model: LoadedModel | nn.Module,
    *,
    what: str,
    error: type[Exception] = UnsupportedModelError,
) -> list[LayerView]:
    """The decoder layers of any family in `FAMILIES`, by role, or one clear refusal.

    Args:
        model: A `LoadedModel` or its Hugging Face causal LM.
        what: The measurement that needs the view (named in the error).
        error: The exception class to raise (a measurement's own error class).

    Returns:
        One `LayerView` per decoder layer.

    Raises:
        `error`: For a family outside `FAMILIES`, or a model of a known family that lacks one of
            its modules (naming the missing attribute).
    """
    hf = _hf(model)
    family = _family(hf)
    builder = _BUILDERS.get(family)
    if builder is None:
        raise error(
            f"{what} has no weight view for model_type {family!r}; supported: "
            f"{', '.join(FAMILIES)} (add its record to hooks/families.py)."
        )
    try:
        return [builder(layer, family, hf.config) for layer in _blocks(hf, family)]
    except AttributeError as exc:
        raise error(
            f"{what}: the {family!r} model lacks a module its weight view needs "
            f"(missing: {exc.name or exc})."
        ) from exc


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


def _llama_missing(family: str) -> str:
    """What a family in `FAMILIES` but outside `LLAMA_FAMILIES` lacks, in a few words."""
    record = family_of_model_type(family)
    return record.llama_missing if record is not None else "the Llama module layout"


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
    hf = _hf(model)
    family = model.arch.family if isinstance(model, LoadedModel) else _family(hf)
    spec = f"{model.spec!r} is a {family!r} model" if isinstance(model, LoadedModel) else (
        f"{type(hf).__name__!r} does not have them")
    if require_rope and isinstance(model, LoadedModel):
        arch = model.arch
        if arch.positional != "rope" or arch.mlp != "gated":
            raise error(
                f"{what} needs a Llama-style model with RoPE and a gated MLP ({LLAMA_STYLE}); "
                f"{spec} (positional={arch.positional!r}). Use one of those architectures."
            )
    if family in FAMILIES and family not in LLAMA_FAMILIES:
        raise error(
            f"{what} needs a Llama-style model ({LLAMA_STYLE}); {spec}: it has no "
            f"{_llama_missing(family)}."
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
