"""The model handle the hooks work on: `LoadedModel` (bridge, tokenizer, `ArchInfo`, device) and the
shape/convention summary `ArchInfo` derived from a Hugging Face config; device and dtype names.

Loading lives in `probes.models`; this module only describes a booted model, so that `hooks` needs
nothing from `probes`.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch

from hooks.errors import HooksError
from hooks.families import FAMILIES, OTHER_PLAIN_MLP_MODEL_TYPES, model_types

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
"""Accepted dtype names."""


WEIGHT_CONVENTION = (
    "hf-raw: no weight processing (no fold_ln, no centering, no fold_value_biases); "
    "nn.Linear weights are [out, in], y = x W^T + b; GPT-2 Conv1D weights are [in, out], y = x W + b; "
    "bridge logits and activations equal Hugging Face eager"
)
"""How the weights behind a `LoadedModel` are laid out (recorded in `ArchInfo.weight_convention`)."""


_DEVICE_RE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


@dataclass(frozen=True, kw_only=True)
class ArchInfo:
    """Shape and convention summary of a loaded model, derived from its HF config.

    Attributes:
        family: HF `model_type`, e.g. "qwen2", "llama", "qwen3", "gpt2".
        n_layers: Number of transformer blocks.
        d_model: Residual-stream width.
        n_heads: Query heads per layer.
        n_kv_heads: Key/value heads per layer (< n_heads under GQA; `hook_k`/`hook_v` have this).
        d_head: Per-head width (Qwen3 sets it explicitly; it need not equal d_model / n_heads).
        d_mlp: MLP hidden width.
        vocab_size: Rows of the unembedding (may exceed the tokenizer's length).
        n_ctx: Maximum positions the config declares.
        norm: "rmsnorm" or "layernorm".
        positional: "rope" or "learned".
        mlp: "gated" (act(gate) * up) or "plain" (act(in)).
        dtype: Parameter dtype name, e.g. "float32", "bfloat16".
        weight_convention: How the weights are laid out; see `WEIGHT_CONVENTION`.
        norm_layout: Where the block's norms sit: "pre" (before attention and MLP: Llama, Qwen,
            Mistral, Phi-3, GPT-2), "sandwich" (before and after each: Gemma-2/3) or "post"
            (after each only: OLMo-2). `hooks.weights.layer_views` has the norms themselves.
        attn_softcap: Attention logit soft-cap c (scores c·tanh(s/c); Gemma-2), else None.
        final_softcap: Final logit soft-cap (Gemma-2), else None.
    """

    family: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_mlp: int
    vocab_size: int
    n_ctx: int
    norm: str
    positional: str
    mlp: str
    dtype: str
    weight_convention: str = WEIGHT_CONVENTION
    norm_layout: str = "pre"
    attn_softcap: float | None = None
    final_softcap: float | None = None

    @property
    def gqa_group(self) -> int:
        """Query heads per KV head (1 without grouped-query attention)."""
        return self.n_heads // self.n_kv_heads

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict of all fields."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ArchInfo:
        """Rebuild from `to_dict()` output.

        Raises:
            HooksError: If keys are missing or unknown.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
        unknown, missing = set(data) - names, required - set(data)
        if unknown or missing:
            raise HooksError(
                f"Cannot read ArchInfo: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}. "
                f"Expected keys: {sorted(names)}. Rewrite it with ArchInfo.to_dict()."
            )
        return cls(**data)

    @classmethod
    def from_hf_config(cls, config: Any, *, dtype: str | torch.dtype) -> ArchInfo:
        """Derive the summary from an HF `PretrainedConfig`.

        Handles both naming schemes: Llama/Qwen (`hidden_size`, `num_hidden_layers`,
        `num_attention_heads`, `num_key_value_heads`, `head_dim`, `intermediate_size`,
        `max_position_embeddings`) and GPT-2 (`n_embd`, `n_layer`, `n_head`, `n_inner` where None
        means 4 * d_model, `n_positions`).

        Args:
            config: The model's HF config.
            dtype: The parameter dtype (name or torch.dtype).

        Returns:
            The architecture summary.

        Raises:
            HooksError: If a field cannot be derived (unsupported architecture).
        """
        family = str(config.model_type)
        d_model = _first_attr(config, family, "d_model", ("hidden_size", "n_embd", "d_model"))
        n_layers = _first_attr(config, family, "n_layers", ("num_hidden_layers", "n_layer"))
        n_heads = _first_attr(config, family, "n_heads", ("num_attention_heads", "n_head"))
        n_kv_heads = getattr(config, "num_key_value_heads", None) or n_heads
        d_head = getattr(config, "head_dim", None) or d_model // n_heads
        d_mlp = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
        if d_mlp is None:
            if not hasattr(config, "n_inner"):
                raise _underivable(family, "d_mlp", ("intermediate_size", "n_inner"))
            d_mlp = 4 * d_model  # GPT-2 convention: n_inner=None means 4 * n_embd
        n_ctx = _first_attr(
            config, family, "n_ctx", ("max_position_embeddings", "n_positions", "n_ctx")
        )
        if getattr(config, "rms_norm_eps", None) is not None:
            norm = "rmsnorm"
        elif any(
            getattr(config, a, None) is not None for a in ("layer_norm_epsilon", "layer_norm_eps")
        ):
            norm = "layernorm"
        else:
            raise _underivable(family, "norm", ("rms_norm_eps", "layer_norm_epsilon"))
        rope = any(
            getattr(config, a, None) is not None
            for a in ("rope_parameters", "rope_theta", "rotary_dim", "rope_scaling")
        )
        positional = "rope" if rope else "learned"
        mlp = "plain" if family in _PLAIN_MLP_FAMILIES else "gated"
        dtype_name = dtype if isinstance(dtype, str) else _dtype_name(dtype)

        def softcap(name: str) -> float | None:
            value = getattr(config, name, None)
            return None if value is None else float(value)

        return cls(
            family=family,
            n_layers=int(n_layers),
            d_model=int(d_model),
            n_heads=int(n_heads),
            n_kv_heads=int(n_kv_heads),
            d_head=int(d_head),
            d_mlp=int(d_mlp),
            vocab_size=int(config.vocab_size),
            n_ctx=int(n_ctx),
            norm=norm,
            positional=positional,
            mlp=mlp,
            dtype=dtype_name,
            norm_layout=_NORM_LAYOUTS.get(family, "pre"),
            attn_softcap=softcap("attn_logit_softcapping"),
            final_softcap=softcap("final_logit_softcapping"),
        )


# Families whose MLP is act(W_in x) rather than act(W_gate x) * (W_up x). Config fields cannot tell the
# two apart (GPT-NeoX also has `intermediate_size` + `hidden_act`), so this is a list of model types
# (`hooks.families`: the records', and those of model types without a record).
_PLAIN_MLP_FAMILIES = frozenset(
    model_types(lambda f: f.mlp == "plain", aliases=True)) | OTHER_PLAIN_MLP_MODEL_TYPES


# Families whose norms are not all before the sublayers (the rest: "pre").
_NORM_LAYOUTS = {mt: f.norm_layout for f in FAMILIES if f.norm_layout != "pre"
                 for mt in f.hf_model_types}


def _first_attr(config: Any, family: str, field: str, names: tuple[str, ...]) -> int:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    raise _underivable(family, field, names)


def _underivable(family: str, field: str, names: tuple[str, ...]) -> HooksError:
    return HooksError(
        f"Cannot derive ArchInfo.{field} for model_type {family!r}: its config has none of "
        f"{list(names)}. Supported families: {', '.join(model_types())} (hooks/families.py); "
        f"extend hooks/model.py:ArchInfo.from_hf_config for this one."
    )


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass
class LoadedModel:
    """A booted model: the bridge, its tokenizer and where it came from.

    Attributes:
        bridge: The TransformerLens bridge (raw mode; logits equal HF eager).
        tokenizer: The model's (fast) tokenizer exactly as its folder defines it; build token ids
            with it. (`bridge.tokenizer` is TransformerLens's normalised copy: BOS forced on,
            pad := eos; prefer ids you built yourself over `bridge.to_tokens`.)
        arch: Architecture summary.
        spec: What the user asked for (built-in name, path or hub id).
        source: The folder the weights were read from, or "in-memory".
        device: Where the parameters live; for a model split over devices (`device_map`), where
            the input embedding lives (token ids go there).
        device_map: Module name -> device of a model dispatched by accelerate (`--device-map`),
            else None.
    """

    bridge: TransformerBridge
    tokenizer: PreTrainedTokenizerBase
    arch: ArchInfo
    spec: str
    source: str
    device: torch.device
    device_map: dict[str, Any] | None = None

    @property
    def hf_model(self) -> PreTrainedModel:
        """The wrapped Hugging Face model (the same object the bridge runs)."""
        # TransformerBridge types it `nn.Module`; the bridge is always built around an HF model
        return cast("PreTrainedModel", self.bridge.original_model)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Turn a device name into a `torch.device`.

    Args:
        device: "auto" (cuda if available, else cpu), "cpu", "cuda" or "cuda:N".

    Returns:
        The device.

    Raises:
        HooksError: If the name is unknown or CUDA (or that CUDA index) is not available.
    """
    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str) or not _DEVICE_RE.match(device):
        raise HooksError(
            f"Unknown device {device!r}. Use one of 'auto', 'cpu', 'cuda', 'cuda:N' (N = GPU index)."
        )
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise HooksError(
                f"Device {device!r} requested but CUDA is not available on this machine. "
                "Use device='cpu' or device='auto'."
            )
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise HooksError(
                f"Device {device!r} requested but only {torch.cuda.device_count()} CUDA device(s) "
                f"exist (cuda:0 .. cuda:{torch.cuda.device_count() - 1})."
            )
    return resolved


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Turn a dtype name (or torch.dtype) into one of the supported torch dtypes.

    Args:
        dtype: "float32", "float16", "bfloat16" or the matching torch.dtype.

    Returns:
        The torch dtype.

    Raises:
        HooksError: If the dtype is not supported.
    """
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise HooksError(f"Unsupported dtype {dtype!r}. Use one of {sorted(DTYPES)}.")
