"""What identifies a run in a cache: the model's label, the fingerprints of its tokenizer and of its
weights, and the metadata `cache.open_writer` records and compares (`run_metadata`)."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from analyses.token_sets import CATEGORY_CODES
from probes import __version__
from probes.errors import ProbesError
from probes.models.load import BUILTIN_MODELS

if TYPE_CHECKING:
    from hooks.model import LoadedModel
    from probes.traces.categories import Lexicon


_CANONICAL_JSON: dict[str, Any] = {"sort_keys": True, "ensure_ascii": False,
                                   "separators": (",", ":"), "default": str}
"""The one serialisation the tokenizer fingerprint hashes (sorted keys, compact, UTF-8)."""
_FINGERPRINTS: dict[tuple[str, str], str] = {}
"""Fingerprints computed in this process, by (sha256 of the backend JSON, the small fields)."""


def _backend(tokenizer: Any) -> Any:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ProbesError(f"{type(tokenizer).__name__} has no backend tokenizer to fingerprint; "
                          "load a fast tokenizer (tokenizer.json)")
    return backend


def _small_fields(tokenizer: Any) -> dict[str, Any]:
    """Everything the fingerprint hashes besides the backend."""
    return {
        "chat_template": getattr(tokenizer, "chat_template", None),
        "special": {name: getattr(tokenizer, f"{name}_token_id", None)
                    for name in ("bos", "eos", "pad", "unk")},
        "all_special_ids": sorted(int(i) for i in getattr(tokenizer, "all_special_ids", []) or []),
        "encode_a": list(tokenizer("a", add_special_tokens=True)["input_ids"]),
    }


def tokenizer_fingerprint_reference(tokenizer: Any) -> str:
    """`tokenizer_fingerprint` computed the direct way (parse the whole backend JSON, dump it
    canonically, hash): the definition the fast path must equal, kept for the tests."""
    spec = json.loads(_backend(tokenizer).to_str())
    spec.pop("truncation", None)
    spec.pop("padding", None)
    canonical = {"backend": spec, **_small_fields(tokenizer)}
    text = json.dumps(canonical, **_CANONICAL_JSON)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _canonical_fast(backend_json: str, small: dict[str, Any]) -> str | None:
    """The canonical text of `tokenizer_fingerprint_reference` without parsing the model's merges
    or re-encoding the whole backend generically (most of a large BPE tokenizer's JSON), or None
    where the layout is not the one this relies on (then the caller takes the reference path).

    Relies on: the backend JSON (serde_json, compact) ends with the model object, whose last two
    fields are `"vocab":{...}` (token -> id) and `"merges":[...]` (strings or string pairs). serde
    and Python's `json.dumps(ensure_ascii=False)` escape strings the same way (only `"`, `\\` and
    U+0000..U+001F, short forms for \\b \\f \\n \\r \\t, else lowercase \\u00xx), so the merges
    text (no objects inside, nothing to sort) is copied as is; the vocab (a flat token -> id object)
    is parsed and written sorted, as `json.dumps(sort_keys=True)` writes it.
    """
    iv, im = backend_json.rfind('"vocab":{'), backend_json.rfind('"merges":[')
    if not (0 < iv < im and backend_json.endswith("]}}") and backend_json[im - 2:im] == "},"):
        return None
    try:
        spec = json.loads(backend_json[:iv] + '"vocab":{},"merges":[]}}')
    except ValueError:
        return None
    model = spec.get("model")
    if not isinstance(model, dict) or model.get("vocab") != {} or model.get("merges") != []:
        return None
    try:
        vocab = json.loads(backend_json[iv + 8:im - 1])
    except ValueError:
        return None
    if not isinstance(vocab, dict) or not all(type(v) is int for v in vocab.values()):
        return None
    merges_text = backend_json[im + 10:-3]
    spec.pop("truncation", None)
    spec.pop("padding", None)
    model["vocab"], model["merges"] = "\x00vocab", "\x00merges"
    text = json.dumps({"backend": spec, **small}, **_CANONICAL_JSON)
    marks = ('"\\u0000vocab"', '"\\u0000merges"')
    if any(text.count(m) != 1 for m in marks):
        return None
    key = json.encoder.encode_basestring                # what json.dumps writes keys with
    vocab_text = "{" + ",".join([f"{key(k)}:{vocab[k]}" for k in sorted(vocab)]) + "}"
    return text.replace(marks[0], vocab_text).replace(marks[1], f"[{merges_text}]")


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 (hex) of what decides token ids: the backend tokenizer, chat template, special ids.

    Hashes `tokenizer.backend_tokenizer.to_str()` (without its transient truncation/padding state),
    the chat template, the special-token ids and the ids the tokenizer gives "a" with special
    tokens (whether it adds BOS), as one canonical JSON text (`tokenizer_fingerprint_reference`).
    Two loads of the same files give the same fingerprint. Computed without parsing the model's
    vocab and merges where the layout allows (`_canonical_fast`, same text), and once per process
    per content (memoised by the sha256 of the backend JSON and the small fields).

    Args:
        tokenizer: A Hugging Face fast tokenizer.

    Returns:
        64 hex characters.

    Raises:
        ProbesError: For a slow tokenizer (no backend to hash).
    """
    backend_json = _backend(tokenizer).to_str()
    small = _small_fields(tokenizer)
    key = (hashlib.sha256(backend_json.encode("utf-8")).hexdigest(),
           json.dumps(small, **_CANONICAL_JSON))
    if key not in _FINGERPRINTS:
        text = _canonical_fast(backend_json, small)
        if text is None:
            _FINGERPRINTS[key] = tokenizer_fingerprint_reference(tokenizer)
        else:
            _FINGERPRINTS[key] = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return _FINGERPRINTS[key]


WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
"""Files of a model folder whose bytes `weights_fingerprint_of_folder` samples."""
_WINDOW = 64
"""Bytes sampled per place (start, middle, end of each tensor; or of each file stretch)."""
_FILE_PLACES = 64
"""Evenly spaced places sampled in a weight file that is not safetensors."""


def weights_fingerprint(loaded: LoadedModel) -> str:
    """A cheap fingerprint of the model's weights: "files:<sha256>" of the weight files of the folder
    it was loaded from (`weights_fingerprint_of_folder`), or "params:<sha256>" of sampled parameter
    values for a model built in memory (a random-init control, a model built in code).

    Sampled, not a hash of every byte (it reads kilobytes, not gigabytes): it changes when weights
    are replaced, re-trained, re-saved in another dtype or layout, or edited tensor-wide in place;
    an edit of a few values away from the sampled places can go unseen.
    """
    if loaded.source != "in-memory" and Path(loaded.source).is_dir():
        found = weights_fingerprint_of_folder(Path(loaded.source))
        if found is not None:
            return found
    return _parameters_fingerprint(loaded.hf_model)


def weights_fingerprint_of_folder(folder: Path) -> str | None:
    """"files:<sha256>" over the weight files of `folder` (None when it has none).

    Per file (by name): its name and size; for safetensors its header (every tensor's name,
    dtype, shape and offsets) and the first, middle and last `_WINDOW` bytes of every tensor;
    for other formats `_FILE_PLACES` evenly spaced windows of the file.
    """
    files = sorted(p for p in folder.iterdir()
                   if p.suffix in WEIGHT_FILE_SUFFIXES and p.is_file())
    if not files:
        return None
    h = hashlib.sha256(b"weights-files-v1")
    for path in files:
        size = path.stat().st_size
        h.update(f"\0{path.name}\0{size}\0".encode())
        with path.open("rb") as fh:
            if path.suffix == ".safetensors":
                _hash_safetensors(fh, size, h)
            else:
                for k in range(_FILE_PLACES):
                    fh.seek(size * k // _FILE_PLACES)
                    h.update(fh.read(_WINDOW))
                fh.seek(max(size - _WINDOW, 0))
                h.update(fh.read(_WINDOW))
    return f"files:{h.hexdigest()}"


def _hash_safetensors(fh: Any, size: int, h: Any) -> None:
    raw = fh.read(8)
    n = int.from_bytes(raw, "little") if len(raw) == 8 else 0
    if not 0 < n <= size - 8:  # not a readable safetensors file: its bytes as any file's
        fh.seek(0)
        h.update(fh.read(_WINDOW))
        return
    header = fh.read(n)
    h.update(raw + header)
    try:
        tensors = json.loads(header)
    except ValueError:
        return
    spans = sorted(tuple(v["data_offsets"]) for k, v in tensors.items()
                   if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v)
    for start, end in spans:
        for at in (start, (start + end) // 2, max(end - _WINDOW, start)):
            fh.seek(8 + n + at)
            h.update(fh.read(min(_WINDOW, max(end - at, 0))))


def _parameters_fingerprint(model: Any) -> str:
    """"params:<sha256>" of every parameter and buffer's name, dtype, shape and the values at
    its start, middle and end (16 each, as float32)."""
    import torch

    h = hashlib.sha256(b"weights-params-v1")
    with torch.no_grad():
        for name, t in model.state_dict().items():
            h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
            if t.is_meta or t.numel() == 0:
                continue
            flat = t.reshape(-1)
            n = flat.numel()
            for at in (0, n // 2, max(n - 16, 0)):
                h.update(flat[at:at + 16].to(device="cpu", dtype=torch.float32).numpy().tobytes())
    return f"params:{h.hexdigest()}"


def model_label(loaded: LoadedModel) -> str:
    """The model spec as stored: built-in names and hub ids verbatim, folders as absolute paths."""

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

    Identity keys (model, architecture, dtype, weight convention, tokenizer, weights and lexicon
    fingerprints, category codes, `config`) must match to append (the weights where the file
    records them); the toolkit version, `versions`
    and `info` are recorded at creation only.
    """

    arch = loaded.arch
    return {
        "model": model_label(loaded),
        "architecture": arch.to_dict(),
        "model_dtype": arch.dtype,
        "weight_convention": arch.weight_convention,
        "tokenizer_fingerprint": tokenizer_fingerprint(loaded.tokenizer),
        "weights_fingerprint": weights_fingerprint(loaded),
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
