"""What identifies a run in a cache: the model's label, the fingerprint of its tokenizer, and the
metadata `cache.open_writer` records and compares (`run_metadata`)."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from analyses.token_sets import CATEGORY_CODES
from probes.errors import ProbesError

if TYPE_CHECKING:
    from hooks.model import LoadedModel
    from probes.traces.categories import Lexicon


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 (hex) of what decides token ids: the backend tokenizer, chat template, special ids.

    Hashes `tokenizer.backend_tokenizer.to_str()` (without its transient truncation/padding state),
    the chat template, the special-token ids and the ids the tokenizer gives "a" with special
    tokens (whether it adds BOS). Two loads of the same files give the same fingerprint.

    Args:
        tokenizer: A Hugging Face fast tokenizer.

    Returns:
        64 hex characters.

    Raises:
        ProbesError: For a slow tokenizer (no backend to hash).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ProbesError(f"{type(tokenizer).__name__} has no backend tokenizer to fingerprint; "
                          "load a fast tokenizer (tokenizer.json)")
    spec = json.loads(backend.to_str())
    spec.pop("truncation", None)
    spec.pop("padding", None)
    special = {
        name: getattr(tokenizer, f"{name}_token_id", None)
        for name in ("bos", "eos", "pad", "unk")
    }
    canonical = {
        "backend": spec,
        "chat_template": getattr(tokenizer, "chat_template", None),
        "special": special,
        "all_special_ids": sorted(int(i) for i in getattr(tokenizer, "all_special_ids", []) or []),
        "encode_a": list(tokenizer("a", add_special_tokens=True)["input_ids"]),
    }
    text = json.dumps(canonical, sort_keys=True, ensure_ascii=False, separators=(",", ":"),
                      default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def model_label(loaded: LoadedModel) -> str:
    """The model spec as stored: built-in names and hub ids verbatim, folders as absolute paths."""
    from probes.models.load import BUILTIN_MODELS

    spec = loaded.spec
    if spec in BUILTIN_MODELS or loaded.source == "in-memory":
        return spec
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.is_dir() else spec




def _versions() -> dict[str, str]:
    out = {}
    for package in ("torch", "transformers", "transformer-lens", "tokenizers"):
        try:
            out[package.replace("-", "_")] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package.replace("-", "_")] = "not installed"
    from probes import __version__

    out["trajectory_probes"] = __version__
    return out


def run_metadata(
    loaded: LoadedModel,
    lexicon: Lexicon,
    *,
    config: Mapping[str, Any],
    info: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """`cache.open_writer` metadata of a run.

    Identity keys (model, architecture, dtype, weight convention, tokenizer and lexicon
    fingerprints, category codes, `config`) must match to append; the toolkit version, `versions`
    and `info` are recorded at creation only.
    """
    from probes import __version__

    arch = loaded.arch
    return {
        "model": model_label(loaded),
        "architecture": arch.to_dict(),
        "model_dtype": arch.dtype,
        "weight_convention": arch.weight_convention,
        "tokenizer_fingerprint": tokenizer_fingerprint(loaded.tokenizer),
        "lexicon_fingerprint": lexicon.fingerprint(),
        "category_codes": dict(CATEGORY_CODES),
        "config": dict(config),
        "toolkit_version": __version__,
        "versions": _versions(),
        "info": {
            "device": str(loaded.device),
            "source": loaded.source,
            "lexicon_files": list(lexicon.sources),
            **dict(info or {}),
        },
    }
