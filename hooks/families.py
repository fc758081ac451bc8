"""One record per model family: everything that differs per family, in one place.

A `Family` says what the rest of the toolkit needs to know about one Hugging Face architecture:
how `ArchInfo` describes it (MLP kind, norm layout), what the capture knows of it (the HF fast
path's module table, the bridge's optional sites), which weight view `hooks.weights` builds for it
(and what it lacks of the Llama layout), which update passes `probes.measures.updates` runs on it,
and the tiny random-init config the tests build it from (`probes.models.tiny.tiny_config`).

Every per-family table is derived from `FAMILIES`: `hooks.model` (plain MLPs, norm layouts),
`hooks.sites` (family-only sites), `hooks.hf_fast.HF_SITE_PATHS`, `hooks.weights` (`FAMILIES`,
`LLAMA_FAMILIES`, `LLAMA_STYLE`, the view builders), `probes.measures.updates.families`
(`UPDATE_FAMILIES`, `EAGER_MISSING`, `SDPA_MISSING`) and `probes.models.tiny` (`TINY_FAMILIES`,
`MORE_FAMILIES`, `UPDATE_FAMILIES`, `tiny_config`). Adding a family whose weight layout
`hooks.weights` already has (`WEIGHT_LAYOUTS`) is one record here; removing a record removes the
family everywhere. Pure data: this module imports nothing of torch or transformers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "FAMILIES",
    "OTHER_PLAIN_MLP_MODEL_TYPES",
    "WEIGHT_LAYOUTS",
    "Family",
    "SitePaths",
    "family_named",
    "family_of_model_type",
    "model_types",
    "names",
]

SitePaths = Mapping[str, tuple[str, Literal["in", "out"]]]
"""Fast-path component -> (module path in the CausalLM, its first input "in" or its output "out")."""

WEIGHT_LAYOUTS = ("llama", "phi3", "gemma", "olmo2", "gpt2")
"""The block layouts `hooks.weights` has a view builder for (`Family.weight_layout`)."""


@dataclass(frozen=True, kw_only=True)
class Family:
    """What differs per model family.

    Attributes:
        name: The short name (`probes.models.tiny.tiny_config(name)`, test ids).
        hf_model_types: The HF `model_type`s of the family. The first is the causal LM's, what
            `ArchInfo.family` holds and every table is keyed by (`model_type`); any further one
            (Gemma-3's multimodal "gemma3") shares only the `ArchInfo` conventions (`mlp`,
            `norm_layout`).
        label: The models it covers, for messages (e.g. "Qwen2/Qwen2.5, DeepSeek-R1-Distill-Qwen").
        mlp: `ArchInfo.mlp`: "gated" (act(gate) * up) or "plain" (act(W_in x)); configs cannot
            tell the two apart, so the record does.
        norm_layout: `ArchInfo.norm_layout`: "pre", "sandwich" (Gemma) or "post" (OLMo-2).
        hf_site_paths: The HF fast path's module table (`hooks.hf_fast.HF_SITE_PATHS`), or None
            where the fast path does not cover the family (the bridge captures it).
        bridge_qk_normed: The bridge exposes `attn.q_normed` / `attn.k_normed` (Qwen3).
        weight_layout: Which view builder of `hooks.weights` describes the block (one of
            `WEIGHT_LAYOUTS`; "llama" = the Llama layout, what `llama_layers` accepts).
        blocks: Attribute path of the decoder layers in the CausalLM.
        attn_softcap: The attention module's `attn_logit_softcapping` is applied (Gemma-2).
        llama_missing: What the family lacks of the Llama layout, in a few words (the refusal of
            `hooks.weights.llama_layers`); unused for the "llama" layout.
        updates: `updates` (M1–M7) measures the family (a weight view and a tested pass).
        eager_missing: Why the eager reference pass cannot run on it (then the linear-memory pass
            only), or None.
        sdpa_missing: Why the linear-memory pass cannot run on it (then eager only), or None.
        tiny_config: The transformers config class of the tiny test model (e.g. "LlamaConfig").
        tiny_kwargs: Its arguments: the tiny test model's numbers (copied for every config).
        tiny_core: One of the first families (`probes.models.tiny.TINY_FAMILIES`: the tests of
            every measurement run on them); the others are `MORE_FAMILIES`.
    """

    name: str
    hf_model_types: tuple[str, ...]
    label: str
    mlp: Literal["gated", "plain"] = "gated"
    norm_layout: Literal["pre", "sandwich", "post"] = "pre"
    hf_site_paths: SitePaths | None = field(default=None, hash=False)
    bridge_qk_normed: bool = False
    weight_layout: str = "llama"
    blocks: str = "model.layers"
    attn_softcap: bool = False
    llama_missing: str = "the Llama module layout"
    updates: bool = True
    eager_missing: str | None = None
    sdpa_missing: str | None = None
    tiny_config: str
    tiny_kwargs: Mapping[str, Any] = field(hash=False)
    tiny_core: bool = False

    def __post_init__(self) -> None:
        if self.weight_layout not in WEIGHT_LAYOUTS:
            raise ValueError(f"Family {self.name!r}: weight_layout {self.weight_layout!r} is not "
                             f"one of {WEIGHT_LAYOUTS}; add a builder to hooks/weights.py first.")
        if not self.hf_model_types:
            raise ValueError(f"Family {self.name!r} names no HF model_type.")

    @property
    def model_type(self) -> str:
        """The causal LM's HF `model_type` (what every table is keyed by)."""
        return self.hf_model_types[0]

    @property
    def llama_layout(self) -> bool:
        """The Llama layout: RMSNorm before attention and MLP, separate q/k/v/o projections, a
        gated SiLU MLP with gate/up/down projections, nothing after the sublayers."""
        return self.weight_layout == "llama"

    @property
    def update_passes(self) -> tuple[str, ...]:
        """The update passes that run on the family ("sdpa", "eager"; none where not measured)."""
        if not self.updates:
            return ()
        return tuple(p for p, missing in (("sdpa", self.sdpa_missing),
                                          ("eager", self.eager_missing)) if missing is None)


# --- shared data ---------------------------------------------------------------------------------

LLAMA_SITE_PATHS: SitePaths = {
    "embed": ("model.embed_tokens", "out"),
    "resid_pre": ("model.layers.{layer}", "in"),
    "resid_mid": ("model.layers.{layer}.post_attention_layernorm", "in"),
    "resid_post": ("model.layers.{layer}", "out"),
    "attn_out": ("model.layers.{layer}.self_attn", "out"),
    "mlp_out": ("model.layers.{layer}.mlp", "out"),
    "ln_final": ("model.norm", "out"),
}
"""The fast-path module table of the Llama layout."""

TINY_COMMON: Mapping[str, Any] = {
    "vocab_size": 300, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
    "initializer_range": 0.2,
}
"""The tiny test models' shape: 2 layers, d_model 32, GQA 4/2, vocab 300; `initializer_range=0.2`
makes attention peaked rather than uniform, so identity tests are not trivially satisfied."""

TINY_IDS: Mapping[str, int] = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
"""Special token ids of the byte tokenizer (`probes.models.tiny.byte_tokenizer`)."""

_GEMMA_TINY = {**TINY_COMMON, **TINY_IDS, "head_dim": 16, "sliding_window": 8}
# Gemma: head_dim 16, the published query_pre_attn_scalar default (256, so the query scale is not
# 1/√d_h), window 8 (the tests' sequences exceed it).

OTHER_PLAIN_MLP_MODEL_TYPES = frozenset(
    {"gpt_neox", "gptj", "gpt_neo", "opt", "bloom", "phi", "codegen", "falcon", "mpt"})
"""`model_type`s without a record whose MLP is plain (so `ArchInfo.mlp` is right for them too)."""


# --- the records ---------------------------------------------------------------------------------

FAMILIES: tuple[Family, ...] = (
    Family(
        name="llama", hf_model_types=("llama",), label="Llama, DeepSeek-R1-Distill-Llama",
        hf_site_paths=LLAMA_SITE_PATHS, tiny_core=True,
        tiny_config="LlamaConfig", tiny_kwargs={**TINY_COMMON, "attention_bias": True},
    ),
    Family(
        name="qwen2", hf_model_types=("qwen2",), label="Qwen2/Qwen2.5, DeepSeek-R1-Distill-Qwen",
        hf_site_paths=LLAMA_SITE_PATHS, tiny_core=True,
        tiny_config="Qwen2Config", tiny_kwargs={**TINY_COMMON, "tie_word_embeddings": True},
    ),
    Family(
        name="qwen3", hf_model_types=("qwen3",), label="Qwen3",
        hf_site_paths=LLAMA_SITE_PATHS, bridge_qk_normed=True, tiny_core=True,
        tiny_config="Qwen3Config", tiny_kwargs={**TINY_COMMON, "head_dim": 16},
    ),
    Family(
        # No sliding window in the tiny model (as Mistral-7B v0.2+ and Mistral-Small).
        name="mistral", hf_model_types=("mistral",), label="Mistral",
        tiny_config="MistralConfig", tiny_kwargs={**TINY_COMMON, **TINY_IDS, "sliding_window": None},
    ),
    Family(
        # LayerNorm, learned positions, GELU without a gate, Conv1D weights ([in, out]).
        name="gpt2", hf_model_types=("gpt2",), label="GPT-2", mlp="plain",
        hf_site_paths={
            "embed": ("transformer.wte", "out"),
            "resid_pre": ("transformer.h.{layer}", "in"),
            "resid_mid": ("transformer.h.{layer}.ln_2", "in"),
            "resid_post": ("transformer.h.{layer}", "out"),
            "attn_out": ("transformer.h.{layer}.attn", "out"),
            "mlp_out": ("transformer.h.{layer}.mlp", "out"),
            "ln_final": ("transformer.ln_f", "out"),
        },
        weight_layout="gpt2", blocks="transformer.h",
        llama_missing="RoPE, RMSNorm and a gated MLP (GPT-2 has learned positions, LayerNorm, "
                      "GELU without a gate)",
        tiny_config="GPT2Config",
        tiny_kwargs={"vocab_size": 300, "n_embd": 32, "n_layer": 2, "n_head": 4,
                     "n_positions": 256, "initializer_range": 0.2, "bos_token_id": 0,
                     "eos_token_id": 0},
    ),
    Family(
        # Fused qkv_proj and gate_up_proj (the weight views are slices of them).
        name="phi3", hf_model_types=("phi3",), label="Phi-3/Phi-4", weight_layout="phi3",
        llama_missing="separate q/k/v and gate/up projections (Phi-3 fuses them: qkv_proj, "
                      "gate_up_proj)",
        eager_missing="the Phi-3 bridge does not fire hook_rot_q / hook_rot_k, which the eager "
                      "capture reads",
        tiny_config="Phi3Config", tiny_kwargs={**TINY_COMMON, **TINY_IDS},
    ),
    Family(
        # Norms after the sublayers only, q/k norms.
        name="olmo2", hf_model_types=("olmo2",), label="OLMo-2", norm_layout="post",
        weight_layout="olmo2",
        llama_missing="RMSNorm before attention and MLP (OLMo-2 puts its norms after them)",
        tiny_config="Olmo2Config", tiny_kwargs={**TINY_COMMON, **TINY_IDS},
    ),
    Family(
        # Attention and final logit soft-capping; a sliding-window and a global layer.
        name="gemma2", hf_model_types=("gemma2",), label="Gemma-2", norm_layout="sandwich",
        weight_layout="gemma", attn_softcap=True,
        llama_missing="the Llama norm layout (Gemma-2 adds norms after attention and MLP, 1+γ "
                      "RMSNorm, GeGLU, soft-capping)",
        sdpa_missing="attention logit soft-capping, which the fused kernel cannot apply",
        tiny_config="Gemma2Config",
        tiny_kwargs={**_GEMMA_TINY, "final_logit_softcapping": 5.0,
                     "attn_logit_softcapping": 3.0},
    ),
    Family(
        name="gemma3", hf_model_types=("gemma3_text", "gemma3"), label="Gemma-3",
        norm_layout="sandwich", weight_layout="gemma",
        llama_missing="the Llama norm layout (Gemma-3 adds norms after attention and MLP, 1+γ "
                      "RMSNorm, GeGLU)",
        tiny_config="Gemma3TextConfig",
        tiny_kwargs={**_GEMMA_TINY, "layer_types": ["sliding_attention", "full_attention"]},
    ),
)
"""Every family the toolkit knows, in the order the tables list them."""


# --- lookups -------------------------------------------------------------------------------------

def model_types(where: Callable[[Family], bool] = lambda f: True, *,
                aliases: bool = False) -> tuple[str, ...]:
    """The `model_type`s of the families `where` selects, in record order (with `aliases`, every
    one of `hf_model_types`, else the causal LM's only)."""
    return tuple(mt for f in FAMILIES if where(f)
                 for mt in (f.hf_model_types if aliases else f.hf_model_types[:1]))


def names(where: Callable[[Family], bool] = lambda f: True) -> tuple[str, ...]:
    """The short names of the families `where` selects, in record order."""
    return tuple(f.name for f in FAMILIES if where(f))


def family_of_model_type(model_type: str) -> Family | None:
    """The family whose causal LM has this `model_type`, or None."""
    return next((f for f in FAMILIES if f.model_type == model_type), None)


def family_named(name: str) -> Family | None:
    """The family of this short name, or None."""
    return next((f for f in FAMILIES if f.name == name), None)
