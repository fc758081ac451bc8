"""Load any supported causal LM as a TransformerLens 4.x bridge, strictly offline.

Entry points: `load_model(spec)` for a built-in name, a local HF folder or a hub id already in the
local HF cache; `boot_model(hf_model, tokenizer, spec=...)` for a model built in code (both share one
code path). `kv_parity` checks that the bridge's KV cache really is used. Caveat: the bridge runs in
raw mode (no weight processing, numbers match HF); never call `enable_compatibility_mode` on it.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib.metadata
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from probes.errors import ModelNotFoundError, ProbesError

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "BUILTIN_MODELS",
    "DTYPES",
    "WEIGHT_CONVENTION",
    "ArchInfo",
    "LoadedModel",
    "boot_model",
    "load_tokenizer",
    "default_hub_cache",
    "kv_parity",
    "load_model",
    "resolve_device",
    "resolve_dtype",
    "resolve_spec",
]

BUILTIN_MODELS: dict[str, Path] = {
    # Trained by `python -m probes.reasoner.train`; shipped as package data.
    "tiny-reasoner": Path(__file__).resolve().parent / "reasoner" / "checkpoint",
}
"""Built-in model names and the checkpoint folder each resolves to (the one source of truth)."""

_BUILTIN_REBUILD: dict[str, str] = {"tiny-reasoner": "python -m probes.reasoner.train"}
"""How to rebuild each built-in checkpoint when its folder is missing."""

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

_SPEC_FORMS = (
    "a built-in name ({builtins}); a local folder containing config.json, model weights "
    "(*.safetensors or *.bin) and tokenizer files; or a Hugging Face hub id such as "
    "'Qwen/Qwen2.5-0.5B' that is already in the local HF cache"
)
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_KV_SHIM_FROM = (5, 24)


def _accepted_forms() -> str:
    return _SPEC_FORMS.format(builtins=", ".join(repr(n) for n in sorted(BUILTIN_MODELS)))


# ----------------------------------------------------------------------------------------------
# Architecture summary
# ----------------------------------------------------------------------------------------------


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
            ProbesError: If keys are missing or unknown.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
        unknown, missing = set(data) - names, required - set(data)
        if unknown or missing:
            raise ProbesError(
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
            ProbesError: If a field cannot be derived (unsupported architecture).
        """
        family = str(config.model_type)
        d_model = _first_attr(config, family, "d_model", ("hidden_size", "n_embd", "d_model"))
        n_layers = _first_attr(config, family, "n_layers", ("num_hidden_layers", "n_layer"))
        n_heads = _first_attr(config, family, "n_heads", ("num_attention_heads", "n_head"))
        n_kv_heads = getattr(config, "num_key_value_heads", None) or n_heads
        d_head = getattr(config, "head_dim", None) or d_model // n_heads
        d_mlp = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
        if d_mlp is None:
            if family != "gpt2" and not hasattr(config, "n_inner"):
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
        )


# Families whose MLP is act(W_in x) rather than act(W_gate x) * (W_up x). Config fields cannot tell the
# two apart (GPT-NeoX also has `intermediate_size` + `hidden_act`), so this is a list of model types.
_PLAIN_MLP_FAMILIES = frozenset(
    {"gpt2", "gpt_neox", "gptj", "gpt_neo", "opt", "bloom", "phi", "codegen", "falcon", "mpt"}
)


def _first_attr(config: Any, family: str, field: str, names: tuple[str, ...]) -> int:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    raise _underivable(family, field, names)


def _underivable(family: str, field: str, names: tuple[str, ...]) -> ProbesError:
    return ProbesError(
        f"Cannot derive ArchInfo.{field} for model_type {family!r}: its config has none of "
        f"{list(names)}. Supported families include qwen2, qwen3, llama and gpt2; extend "
        f"probes/models.py:ArchInfo.from_hf_config for this one."
    )


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ----------------------------------------------------------------------------------------------
# Loaded model
# ----------------------------------------------------------------------------------------------


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
        device: Where the parameters live.
    """

    bridge: TransformerBridge
    tokenizer: PreTrainedTokenizerBase
    arch: ArchInfo
    spec: str
    source: str
    device: torch.device

    @property
    def hf_model(self) -> PreTrainedModel:
        """The wrapped Hugging Face model (the same object the bridge runs)."""
        return self.bridge.original_model


# ----------------------------------------------------------------------------------------------
# Argument validation
# ----------------------------------------------------------------------------------------------


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Turn a device name into a `torch.device`.

    Args:
        device: "auto" (cuda if available, else cpu), "cpu", "cuda" or "cuda:N".

    Returns:
        The device.

    Raises:
        ProbesError: If the name is unknown or CUDA (or that CUDA index) is not available.
    """
    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str) or not _DEVICE_RE.match(device):
        raise ProbesError(
            f"Unknown device {device!r}. Use one of 'auto', 'cpu', 'cuda', 'cuda:N' (N = GPU index)."
        )
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ProbesError(
                f"Device {device!r} requested but CUDA is not available on this machine. "
                "Use device='cpu' or device='auto'."
            )
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ProbesError(
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
        ProbesError: If the dtype is not supported.
    """
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ProbesError(f"Unsupported dtype {dtype!r}. Use one of {sorted(DTYPES)}.")


# ----------------------------------------------------------------------------------------------
# Spec resolution (no network, ever)
# ----------------------------------------------------------------------------------------------


def _force_offline() -> None:
    """Forbid hub access for this process before anything from huggingface_hub runs.

    `huggingface_hub.constants.HF_HUB_OFFLINE` is read at import time, so the env var alone is
    too late once transformers is imported; every call below also passes `local_files_only=True`.
    """
    os.environ["HF_HUB_OFFLINE"] = "1"


def default_hub_cache() -> Path:
    """Return the HF hub cache folder, honouring `HF_HUB_CACHE` / `HF_HOME` as set *now*.

    `huggingface_hub.constants.HF_HUB_CACHE` is frozen when the module is imported; reading the
    environment at call time keeps a later change (e.g. in tests or notebooks) effective.
    """
    from huggingface_hub import constants

    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.path.expandvars(os.environ[var])).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.path.expandvars(os.environ["HF_HOME"])).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def resolve_spec(spec: str, *, cache_dir: str | Path | None = None) -> Path:
    """Resolve a model spec to a local folder holding config.json, without touching the network.

    Args:
        spec: A name in `BUILTIN_MODELS`, a local folder, or a hub id in the local HF cache.
        cache_dir: HF hub cache to search for hub ids; default `default_hub_cache()`.

    Returns:
        The folder to load from.

    Raises:
        ModelNotFoundError: If the spec resolves to nothing loadable; the message says how to fix it.
    """
    if spec in BUILTIN_MODELS:
        folder = BUILTIN_MODELS[spec]
        if not (folder / "config.json").is_file():
            rebuild = _BUILTIN_REBUILD.get(spec, "its training script")
            raise ModelNotFoundError(
                f"The built-in model {spec!r} has no checkpoint: {folder / 'config.json'} is missing. "
                f"Rebuild it with `{rebuild}` (writes {folder}), or pass a local folder instead."
            )
        return folder

    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelNotFoundError(
                f"Model spec {spec!r} is a file, not a folder. Pass the folder that contains "
                f"config.json. Accepted forms: {_accepted_forms()}."
            )
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"Folder {str(path)!r} has no config.json, so it is not a Hugging Face model folder. "
                f"Accepted forms: {_accepted_forms()}."
            )
        return path

    looks_like_path = spec.startswith((".", "/", "~")) or spec.count("/") > 1 or "\\" in spec
    if looks_like_path or not _HUB_ID_RE.match(spec):
        raise ModelNotFoundError(
            f"Model {spec!r} not found: no such folder, and it is not a built-in name or a valid hub id. "
            f"Accepted forms: {_accepted_forms()}."
        )
    return _resolve_hub_id(spec, cache_dir=cache_dir)


def _resolve_hub_id(repo_id: str, *, cache_dir: str | Path | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HFValidationError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
    )

    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_hub_cache()
    how_to = (
        f"This tool never downloads. On a machine with network run `hf download {repo_id}` "
        f"(or `huggingface-cli download {repo_id}`) with the same HF_HOME / HF_HUB_CACHE and copy "
        f"the cache here, or pass a local model folder instead. Accepted forms: {_accepted_forms()}."
    )
    try:
        folder = snapshot_download(repo_id, cache_dir=str(cache), local_files_only=True)
    except IncompleteSnapshotError as err:
        raise ModelNotFoundError(
            f"Hub id {repo_id!r} is only partially in the local Hugging Face cache ({cache}): {err} "
            + how_to
        ) from None
    except (LocalEntryNotFoundError, HFValidationError):
        raise ModelNotFoundError(
            f"Model {repo_id!r} is not a local folder and is not in the local Hugging Face cache "
            f"({cache}). " + how_to
        ) from None
    folder_path = Path(folder)
    if not (folder_path / "config.json").is_file():
        raise ModelNotFoundError(
            f"Hub id {repo_id!r} is in the local Hugging Face cache ({folder_path}) but has no "
            f"config.json there, so it cannot be loaded as a causal LM. " + how_to
        )
    return folder_path


# ----------------------------------------------------------------------------------------------
# KV-cache shim (transformers >= 5.24)
# ----------------------------------------------------------------------------------------------


def _kv_shim_needed(transformers_version: str) -> bool:
    """Whether this transformers version passes the KV cache to attention as `cache=`.

    transformers 5.24.0 renamed the keyword (`@deprecate_kwarg("past_key_values", "5.40.0",
    new_name="cache")`); TransformerLens 4.3.0's `AttentionBridge._update_kv_cache` reads only
    `past_key_values` / `layer_past`, so the cache silently stays empty. Compared on the release
    tuple so that a 5.24 dev or rc build counts as 5.24.
    """
    from packaging.version import Version

    return Version(transformers_version).release[:2] >= _KV_SHIM_FROM


def _install_kv_cache_shim() -> None:
    """Patch `AttentionBridge._update_kv_cache` to also read the cache from `cache=`. Idempotent.

    Every attention bridge in TL 4.3.0 (position-embeddings, joint-QKV, ALiBi, Bloom, CodeGen)
    calls `self._update_kv_cache(k, v, **kwargs)` and none overrides it, so patching the base
    class covers them all. The wrapper only acts when `past_key_values` and `layer_past` are both
    absent and `cache` is present, so it is a no-op on transformers < 5.24.
    """
    from transformer_lens.model_bridge.generalized_components.attention import (
        AttentionBridge,
    )

    current = AttentionBridge._update_kv_cache
    if getattr(current, "_probes_kv_shim", False):
        return

    @functools.wraps(current)
    def _update_kv_cache(
        self: Any, k: torch.Tensor, v: torch.Tensor, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if (
            kwargs.get("past_key_values") is None
            and kwargs.get("layer_past") is None
            and kwargs.get("cache") is not None
        ):
            kwargs["past_key_values"] = kwargs["cache"]
        return current(self, k, v, **kwargs)

    _update_kv_cache._probes_kv_shim = True  # type: ignore[attr-defined]
    AttentionBridge._update_kv_cache = _update_kv_cache  # type: ignore[method-assign]


def _ensure_kv_cache_shim() -> None:
    """Install the KV-cache shim when the installed transformers needs it (>= 5.24).

    pyproject pins transformers < 5.24, but an environment that ignores the pin (a user upgrade,
    another package's requirement) would otherwise get KV-cached logits off by ~4 with no warning
    (TOOLING-NOTES §1.5). `kv_parity` and the tests detect that failure either way.
    """
    if _kv_shim_needed(importlib.metadata.version("transformers")):
        _install_kv_cache_shim()


# ----------------------------------------------------------------------------------------------
# Booting and loading
# ----------------------------------------------------------------------------------------------


def _param_dtype(model: torch.nn.Module) -> torch.dtype:
    for param in model.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.float32


def _bridge_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """A private copy of `tokenizer` for the bridge to normalise, so the caller's stays untouched.

    TL 4.3.0's boot (`setup_tokenizer`) mutates the tokenizer it is given: pad := eos, bos := eos
    when absent (Qwen), padding side, possibly new special tokens; and when `add_bos_token` is off
    it re-loads the tokenizer by `init_kwargs["name_or_path"]` with `add_bos_token=True` (a KeyError
    when that key is absent, a hub lookup when it is not a local folder). The copy absorbs all of
    that; where a re-load could not be done from a local folder it is skipped by marking the copy
    as already adding BOS (TL then detects the real BOS behaviour by tokenising).
    """
    bridge_tok = copy.deepcopy(tokenizer)
    name = bridge_tok.init_kwargs.get("name_or_path")
    if not (isinstance(name, str) and name and Path(name).is_dir()):
        bridge_tok.init_kwargs["name_or_path"] = name or "in-memory"
        bridge_tok.init_kwargs["add_bos_token"] = True
    return bridge_tok


def boot_model(
    hf_model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    spec: str,
    source: str = "in-memory",
    device: str | torch.device = "auto",
    dtype: str | torch.dtype | None = None,
) -> LoadedModel:
    """Wrap an HF causal LM (loaded or built in code) in a TransformerLens bridge.

    The model is cast (floating parameters only) when `dtype` differs from its weights, moved to
    `device`, put in eval mode and switched to eager attention (the bridge does this in place).

    Args:
        hf_model: An HF `*ForCausalLM` model; it becomes `bridge.original_model`.
        tokenizer: Its tokenizer. Required: without one the bridge would fetch one from the hub.
            Left unmodified; the bridge gets a copy (see `_bridge_tokenizer`).
        spec: What the user asked for (recorded in `LoadedModel.spec`, used as the bridge's label).
        source: Where the weights came from (a folder, or "in-memory").
        device: "auto", "cpu", "cuda" or "cuda:N".
        dtype: Target dtype; None keeps the weights' dtype.

    Returns:
        The loaded model.

    Raises:
        ProbesError: For an unknown device or dtype, or a model the bridge does not support.
    """
    from transformer_lens.model_bridge import TransformerBridge

    _force_offline()
    _ensure_kv_cache_shim()
    target_device = resolve_device(device)
    target_dtype = _param_dtype(hf_model) if dtype is None else resolve_dtype(dtype)
    if _param_dtype(hf_model) != target_dtype:
        from transformer_lens.utilities.multi_gpu import maybe_cast_floating_params

        # Casts parameters only; float32 buffers such as RoPE inv_freq stay float32, as HF does.
        maybe_cast_floating_params(hf_model, target_dtype)
    hf_model.to(target_device)
    hf_model.eval()
    # The label is only used by the bridge for naming and alias lookup; a local folder avoids any
    # chance of it being read as a hub id.
    label = source if source != "in-memory" and Path(source).is_dir() else spec
    try:
        bridge = TransformerBridge.boot_transformers(
            label,
            hf_model=hf_model,
            tokenizer=_bridge_tokenizer(tokenizer),
            dtype=target_dtype,
            device=str(target_device),
        )
    except (ValueError, NotImplementedError) as err:
        raise ProbesError(
            f"TransformerLens cannot wrap model {spec!r} ({type(hf_model).__name__}, model_type "
            f"{hf_model.config.model_type!r}): {err}. Use a supported architecture "
            "(e.g. Qwen2/2.5, Qwen3, Llama, GPT-2)."
        ) from err
    bridge.eval()
    arch = ArchInfo.from_hf_config(hf_model.config, dtype=target_dtype)
    return LoadedModel(
        bridge=bridge,
        tokenizer=tokenizer,
        arch=arch,
        spec=spec,
        source=source,
        device=target_device,
    )


def _read_tokenizer(folder: Path, spec: str) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError) as err:
        raise ProbesError(
            f"Cannot read a tokenizer from {str(folder)!r} (model {spec!r}): {err}. The folder needs "
            "tokenizer files (tokenizer.json, or vocab.json + merges.txt, or tokenizer.model) next to "
            "config.json; save them with tokenizer.save_pretrained(folder)."
        ) from err


def load_tokenizer(spec: str, *, cache_dir: str | Path | None = None) -> PreTrainedTokenizerBase:
    """Load only the tokenizer of a model spec, strictly offline (same resolution as `load_model`).

    Args:
        spec: A built-in name, a local folder with tokenizer files (config.json not required), or a
            hub id already in the local HF cache.
        cache_dir: HF hub cache to search for hub ids.

    Returns:
        The tokenizer exactly as saved (fast tokenizer where the files allow one).

    Raises:
        ModelNotFoundError: If the spec does not resolve to a local folder.
        ProbesError: If the folder has no readable tokenizer files.
    """
    _force_offline()
    folder = Path(spec).expanduser()
    if not (folder.is_dir() and spec not in BUILTIN_MODELS):
        folder = resolve_spec(spec, cache_dir=cache_dir)
    return _read_tokenizer(folder, spec)


def load_model(
    spec: str,
    *,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "float32",
    cache_dir: str | Path | None = None,
) -> LoadedModel:
    """Load a causal LM as a TransformerLens bridge, strictly offline.

    Never downloads: sets `HF_HUB_OFFLINE=1` for the process and reads only local files.

    Example:
        >>> m = load_model("tiny-reasoner", device="cpu")
        >>> ids = m.tokenizer("2+3=", return_tensors="pt").input_ids      # [1, pos]
        >>> logits = m.bridge(ids.to(m.device), return_type="logits")      # [1, pos, vocab]

    Args:
        spec: A built-in name (see `BUILTIN_MODELS`), a local folder with config.json + weights +
            tokenizer files, or a hub id already in the local HF cache.
        device: "auto" (cuda if available, else cpu), "cpu", "cuda" or "cuda:N".
        dtype: "float32", "float16", "bfloat16" or a torch.dtype; weights are loaded in it.
        cache_dir: HF hub cache to search for hub ids; default `HF_HUB_CACHE` / `HF_HOME/hub`
            read at call time.

    Returns:
        The loaded model (eval mode, on `device`).

    Raises:
        ModelNotFoundError: If the spec does not resolve to a loadable local folder.
        ProbesError: For a bad device or dtype, or a folder whose files cannot be read.
    """
    _force_offline()
    target_device = resolve_device(device)
    target_dtype = resolve_dtype(dtype)
    folder = resolve_spec(spec, cache_dir=cache_dir)

    from transformers import AutoModelForCausalLM

    tokenizer = _read_tokenizer(folder, spec)
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=target_dtype, local_files_only=True, attn_implementation="eager"
        )
    except (OSError, ValueError, KeyError) as err:
        raise ProbesError(
            f"Cannot load a causal LM from {str(folder)!r} (model {spec!r}): {err}. The folder needs "
            "config.json and weights (model.safetensors or pytorch_model.bin); save them with "
            "model.save_pretrained(folder)."
        ) from err
    return boot_model(
        hf_model,
        tokenizer,
        spec=spec,
        source=str(folder),
        device=target_device,
        dtype=target_dtype,
    )


# ----------------------------------------------------------------------------------------------
# Self-check
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def kv_parity(loaded: LoadedModel, ids: torch.Tensor, split: int) -> float:
    """Max |logits via KV cache - logits of the full sequence| over the suffix positions.

    Runs `ids[:, :split]` into a fresh HF `DynamicCache`, then `ids[:, split:]` with
    `past_key_values=cache`, and compares the suffix logits with one forward over all of `ids`.
    A working cache gives ~1e-6 in float32; a silently ignored cache (TL 4.3.0 with
    transformers >= 5.24 without the shim) gives ~1 or more.

    Args:
        loaded: The model.
        ids: Token ids, [batch, pos] or [pos]; no padding.
        split: Prefix length, 0 < split < pos.

    Returns:
        The largest absolute difference, as a float.

    Raises:
        ProbesError: If `split` is out of range.
    """
    from transformers import DynamicCache

    if ids.ndim == 1:
        ids = ids.unsqueeze(0)  # [pos] -> [1, pos]
    n_pos = ids.shape[1]
    if not 0 < split < n_pos:
        raise ProbesError(
            f"kv_parity split={split} is out of range for {n_pos} tokens; use 0 < split < {n_pos}."
        )
    ids = ids.to(loaded.device)
    bridge = loaded.bridge
    full = bridge(ids, return_type="logits")  # [batch, pos, vocab]
    cache = DynamicCache(config=loaded.hf_model.config)
    bridge(ids[:, :split], return_type="logits", past_key_values=cache)
    suffix = bridge(ids[:, split:], return_type="logits", past_key_values=cache)
    diff = (suffix.float() - full[:, split:].float()).abs().max()
    return float(diff)
