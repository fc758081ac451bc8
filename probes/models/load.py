"""Load any supported causal LM as a TransformerLens 4.x bridge, strictly offline.

Entry points: `load_model(spec)` for a built-in name, a local HF folder or a hub id already in the
local HF cache; `boot_model(hf_model, tokenizer, spec=...)` for a model built in code (both share one
code path). Caveat: the bridge runs in raw mode (no weight processing, numbers match HF); never call
`enable_compatibility_mode` on it.

A model folder is checked file by file before anything is computed or written: `config.json` (valid
JSON, a configuration transformers accepts, positive sizes), every `*.safetensors` header (a
truncated file), and the tokenizer (one that turns text into no tokens: an empty vocabulary or no
tokenizer file at all). Each problem is one `ProbesError` naming the folder, the file, the cause
and the fix.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from hooks.model import ArchInfo, LoadedModel, resolve_device, resolve_dtype
from probes.errors import ModelNotFoundError, ProbesError
from probes.models.kv import ensure_kv_cache_shim
from probes.models.placement import dispatched_device
from probes.models.spec import ModelSpec, model_spec

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


BUILTIN_MODELS: dict[str, Path] = {
    # Trained by `python -m probes.reasoner.train`; shipped as package data.
    "tiny-reasoner": Path(__file__).resolve().parents[1] / "reasoner" / "checkpoint",
    # The same SFT run stopped early, and a GRPO fine-tune of tiny-reasoner (docs/models.md, "Models along
    # training"); they share tiny-reasoner's tokenizer.
    "tiny-reasoner-sft-early": Path(__file__).resolve().parents[1] / "reasoner" / "checkpoint_sft_early",
    "tiny-reasoner-grpo": Path(__file__).resolve().parents[1] / "reasoner" / "checkpoint_grpo",
    # The planted-effect organism (docs/models.md, "The planted-effect organism"): its own task
    # (probes.reasoner.planted) and tokenizer; the reflection's effect on L̂ is known by design.
    "tiny-reasoner-planted": Path(__file__).resolve().parents[1] / "reasoner" / "checkpoint_planted",
}
"""Built-in model names and the checkpoint folder each resolves to (the one source of truth)."""


_BUILTIN_REBUILD: dict[str, str] = {
    "tiny-reasoner": "python -m probes.reasoner.train",
    "tiny-reasoner-sft-early": (
        "python -m probes.reasoner.train --stop-after 150 --threads 1 "
        "--out probes/reasoner/checkpoint_sft_early"
    ),
    "tiny-reasoner-grpo": "python -m probes.reasoner.grpo --out probes/reasoner/checkpoint_grpo",
    "tiny-reasoner-planted": "python -m probes.reasoner.train --task planted",
}
"""How to rebuild each built-in checkpoint when its folder is missing."""


_SPEC_FORMS = (
    "a built-in name ({builtins}); a local folder containing config.json, model weights "
    "(*.safetensors or *.bin) and tokenizer files; or a Hugging Face hub id such as "
    "'Qwen/Qwen2.5-0.5B' that is already in the local HF cache"
)


_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _accepted_forms() -> str:
    return _SPEC_FORMS.format(builtins=", ".join(repr(n) for n in sorted(BUILTIN_MODELS)))


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
    A model dispatched over devices by accelerate (`hf_device_map`, from `load_model` with a
    device map) stays where it is; `LoadedModel.device` is then its input embedding's device.

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
    ensure_kv_cache_shim()
    spread = dispatched_device(hf_model)
    target_device = resolve_device(device) if spread is None else spread
    target_dtype = _param_dtype(hf_model) if dtype is None else resolve_dtype(dtype)
    if _param_dtype(hf_model) != target_dtype:
        from transformer_lens.utilities.multi_gpu import maybe_cast_floating_params

        # Casts parameters only; float32 buffers such as RoPE inv_freq stay float32, as HF does.
        maybe_cast_floating_params(hf_model, target_dtype)
    if spread is None:
        hf_model.to(target_device)
    hf_model.eval()
    if not getattr(hf_model.config, "architectures", None):
        # A config built in code has no `architectures`; TransformerLens picks its adapter from it
        # (Gemma-3 and OLMo-2 are refused without it). `from_pretrained` folders always have it.
        hf_model.config.architectures = [type(hf_model).__name__]
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
        device_map=None if spread is None else dict(hf_model.hf_device_map),
    )


TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer.model")
"""Files a tokenizer is read from (any of them: tokenizer.json, vocab.json + merges.txt, or a
SentencePiece tokenizer.model)."""


_TOKENIZER_PROBE = "Question: what is 12 + 30? Answer: 42"
"""A text every usable tokenizer turns into at least one token."""


def _config_errors() -> tuple[type[Exception], ...]:
    """What transformers raises for a configuration it refuses (its validators raise
    huggingface_hub's StrictDataclassError, which is not a ValueError)."""
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:  # an older huggingface_hub: no strict dataclasses
        return (ValueError, KeyError, TypeError)
    return (ValueError, KeyError, TypeError, StrictDataclassError)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _read_tokenizer(folder: Path, spec: str) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    _check_config_json(folder, spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, *_config_errors()) as err:
        raise ProbesError(
            f"Cannot read a tokenizer from {str(folder)!r} (model {spec!r}): {_one_line(err)}. The "
            "folder needs tokenizer files (tokenizer.json, or vocab.json + merges.txt, or "
            "tokenizer.model) next to a valid config.json; save them with "
            "tokenizer.save_pretrained(folder)."
        ) from None
    _check_tokenizer(tokenizer, folder, spec)
    return tokenizer


def _check_tokenizer(tokenizer: PreTrainedTokenizerBase, folder: Path, spec: str) -> None:
    """Refuse a tokenizer that turns text into no tokens (an empty vocabulary, or none of the
    tokenizer files: transformers then builds an empty tokenizer and the first forward fails)."""
    ids = tokenizer(_TOKENIZER_PROBE, add_special_tokens=False)["input_ids"]
    if ids:
        return
    present = [name for name in TOKENIZER_FILES if (folder / name).is_file()]
    cause = (f"{' and '.join(str(folder / n) for n in present)} "
             f"{'holds' if len(present) == 1 else 'hold'} no tokens (an empty vocabulary)" if present else
             f"it has none of the tokenizer files ({', '.join(TOKENIZER_FILES)})")
    raise ProbesError(
        f"The tokenizer of model folder {str(folder)!r} (model {spec!r}) turns text into no "
        f"tokens: {cause}. Copy the model's tokenizer files into the folder (or save them with "
        "tokenizer.save_pretrained(folder))."
    )


_POSITIVE_SIZES = ("num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size",
                   "intermediate_size", "num_key_value_heads")
"""Configuration sizes that must be positive integers where a config.json has them."""


def _check_model_config(folder: Path, spec: str) -> None:
    """Refuse a config.json that transformers would not accept (its own validators, e.g.
    `num_hidden_layers` not matching `layer_types`) or with a size that is not a positive
    integer, before the tokenizer and the weights are read."""
    from transformers import AutoConfig

    path = folder / "config.json"
    fix = "fix the file or save it again with model.save_pretrained(folder)"
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, *_config_errors()) as err:
        raise ProbesError(f"{str(path)!r} (model {spec!r}) is not a configuration transformers "
                          f"accepts: {_one_line(err)}; {fix}.") from None
    text_config = getattr(config, "get_text_config", lambda: config)()
    for key in _POSITIVE_SIZES:
        value = getattr(text_config, key, None)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):
            raise ProbesError(f"{str(path)!r} (model {spec!r}) has {key} = {value!r}; it must "
                              f"be a positive integer: {fix}.")


def _check_weights(folder: Path, spec: str) -> None:
    """Open the header of every *.safetensors file in `folder`: a truncated or damaged file is
    refused by name (safetensors itself says only "incomplete metadata")."""
    from safetensors import SafetensorError, safe_open

    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except (SafetensorError, OSError) as err:
            raise ProbesError(
                f"Weights file {str(path)!r} (model {spec!r}) cannot be read: {_one_line(err)} "
                "(a truncated or damaged file, e.g. an interrupted copy or download); copy it "
                "again, or save the model again with model.save_pretrained(folder)."
            ) from None


def _check_config_json(folder: Path, spec: str) -> None:
    """Refuse a config.json that is not a JSON object as a configuration problem (transformers would
    report it while reading the tokenizer, as a tokenizer problem)."""
    import json

    path = folder / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ProbesError(
            f"{str(path)!r} (model {spec!r}) is not valid JSON ({err}); it is the model's "
            "configuration: fix the file or save it again with model.save_pretrained(folder)."
        ) from None
    except OSError:
        return  # missing or unreadable: reported where it is needed
    if not isinstance(config, dict):
        raise ProbesError(f"{str(path)!r} (model {spec!r}) holds a JSON {type(config).__name__}, "
                          "not the model configuration object; save it again with "
                          "model.save_pretrained(folder).")


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
    spec: str | ModelSpec,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    cache_dir: str | Path | None = None,
) -> LoadedModel:
    """Load a causal LM as a TransformerLens bridge, strictly offline.

    Never downloads: sets `HF_HUB_OFFLINE=1` for the process and reads only local files.

    Example:
        >>> m = load_model("tiny-reasoner", device="cpu")
        >>> ids = m.tokenizer("2+3=", return_tensors="pt").input_ids      # [1, pos]
        >>> logits = m.bridge(ids.to(m.device), return_type="logits")      # [1, pos, vocab]

    Args:
        spec: A `ModelSpec` (name, device, dtype, device_map, max_memory: what the model flags
            give), or its name: a built-in name (see `BUILTIN_MODELS`), a local folder with
            config.json + weights + tokenizer files, or a hub id already in the local HF cache.
        device: "auto" (cuda if available, else cpu), "cpu", "cuda" or "cuda:N" (replaces the
            spec's; default "auto"). A `ModelSpec` with a `device_map` is dispatched over the
            devices by accelerate (`from_pretrained(device_map=..., max_memory=...)`).
        dtype: "float32", "float16", "bfloat16" or a torch.dtype; weights are loaded in it
            (replaces the spec's; default "float32").
        cache_dir: HF hub cache to search for hub ids; default `HF_HUB_CACHE` / `HF_HOME/hub`
            read at call time.

    Returns:
        The loaded model (eval mode, on `device`).

    Raises:
        ModelNotFoundError: If the spec does not resolve to a loadable local folder.
        ProbesError: For a bad device or dtype, or a folder whose files cannot be read.
    """
    _force_offline()
    full = model_spec(spec, device=device, dtype=dtype)
    assert isinstance(full, ModelSpec)
    spec = full.name
    target_device = resolve_device(full.device)
    target_dtype = resolve_dtype(full.dtype)
    folder = resolve_spec(spec, cache_dir=cache_dir)

    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    _check_config_json(folder, spec)
    _check_model_config(folder, spec)
    _check_weights(folder, spec)
    tokenizer = _read_tokenizer(folder, spec)
    placement = ({} if full.device_map is None else
                 {"device_map": full.device_map, "max_memory": full.max_memory_map})
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=target_dtype, local_files_only=True, attn_implementation="eager",
            **placement,
        )
    except (OSError, SafetensorError, *_config_errors()) as err:
        raise ProbesError(
            f"Cannot load a causal LM from {str(folder)!r} (model {spec!r}): {_one_line(err)}. "
            "The folder needs config.json and weights (model.safetensors or pytorch_model.bin); "
            "save them with model.save_pretrained(folder)."
        ) from err
    return boot_model(
        hf_model,
        tokenizer,
        spec=spec,
        source=str(folder),
        device=target_device,
        dtype=target_dtype,
    )
