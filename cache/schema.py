"""Schema v1 of the HDF5 cache: group, dataset and attribute names, and the rules that use them.

Pure constants and small pure functions (no h5py), so every name is spelled once. The layout
(`cache/SCHEMA.md` has the same text with the reasons)::

    /                         root attributes (small; JSON strings where marked):
        schema_version        int, SCHEMA_VERSION
        toolkit_version       str, version of the toolkit that created the file (metadata["toolkit_version"])
        created               str, ISO 8601 UTC time of creation
        model                 str, the model spec (local folder or hub id)          [identity]
        architecture          JSON, ArchInfo.to_dict()                               [identity]
        model_dtype           str, parameter dtype, e.g. "bfloat16"                  [identity]
        weight_convention     str, hooks.model.WEIGHT_CONVENTION ("hf-raw: ...")   [identity]
        tokenizer_fingerprint str                                                    [identity]
        lexicon_fingerprint   str, Lexicon.fingerprint()                             [identity]
        category_codes        JSON {category name: uint8 code}                       [identity]
        weights_fingerprint   str, sampled hash of the model's weights (optional)   [identity]
        versions              JSON {package: version}, e.g. transformers, torch      [informational]
    /meta/config              UTF-8 JSON string dataset: the run config              [identity]
                              (sites, positions, storage dtype, prompt/scaffold templates, ...)
    /meta/info                UTF-8 JSON string dataset: anything else (lexicon JSON, host, ...)
    /traces/<escaped id>/     one group per trace, in write order (creation order tracked)
        attrs: trace_id (the original id), n_tokens, spans (JSON {name: [start, end]}),
               source (e.g. "traces.jsonl:12"), complete (False at creation, True LAST),
               plus small caller attrs
        tokens                int32 [n_tokens]
        category              uint8 [n_tokens], codes in the root `category_codes`
        positions             int32 [n_sel], strictly increasing token indices of the site rows
        text/<key>            UTF-8 string scalars, e.g. text/question, text/answer
        <site>                [n_sel, n_layers, d] (or any shape whose first axis is n_sel);
                              attrs kind="site", site, layers (JSON list), dtype;
                              chunks (min(n_sel, 512), 1, d) (balanced above 512 rows);
                              no compression unless asked
        <array>               per-trace metric arrays (e.g. lhat float32 [T+1]), any shape;
                              attrs kind="array", dtype; contiguous unless compressed

`dtype` is the logical dtype: float16/float32/float64 are stored natively; "bfloat16" is stored
bit-exact as the raw uint16 bits (see `cache.bf16`). A trace counts only once `complete` is True.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from cache.errors import CacheInputError

__all__ = [
    "BFLOAT16",
    "CHUNK_TOKENS",
    "IDENTITY_KEYS",
    "INFORMATIONAL_KEYS",
    "METADATA_KEYS",
    "OPTIONAL_IDENTITY_KEYS",
    "READER_CHUNK_CACHE_BYTES",
    "RESERVED_NAMES",
    "SCHEMA_VERSION",
    "escape_trace_id",
    "site_chunks",
    "unescape_trace_id",
    "validate_dataset_name",
]

SCHEMA_VERSION: Final = 1
"""Bumped whenever a reader of the previous version would misread a new file."""

# Groups and datasets.
TRACES_GROUP: Final = "traces"
META_GROUP: Final = "meta"
CONFIG_DATASET: Final = "meta/config"
INFO_DATASET: Final = "meta/info"
TOKENS: Final = "tokens"
CATEGORY: Final = "category"
POSITIONS: Final = "positions"
TEXT_GROUP: Final = "text"
RESERVED_NAMES: Final = frozenset({TOKENS, CATEGORY, POSITIONS, TEXT_GROUP})
"""Per-trace names that sites and metric arrays may not use."""
TMP_PREFIX: Final = ".tmp."
"""Prefix of a dataset being replaced by `CacheWriter.add_to_trace`; readers skip such names."""

# Root attributes.
ATTR_SCHEMA_VERSION: Final = "schema_version"
ATTR_TOOLKIT_VERSION: Final = "toolkit_version"
ATTR_CREATED: Final = "created"
ATTR_MODEL: Final = "model"
ATTR_ARCHITECTURE: Final = "architecture"
ATTR_MODEL_DTYPE: Final = "model_dtype"
ATTR_WEIGHT_CONVENTION: Final = "weight_convention"
ATTR_TOKENIZER_FINGERPRINT: Final = "tokenizer_fingerprint"
ATTR_LEXICON_FINGERPRINT: Final = "lexicon_fingerprint"
ATTR_CATEGORY_CODES: Final = "category_codes"
ATTR_WEIGHTS_FINGERPRINT: Final = "weights_fingerprint"
ATTR_VERSIONS: Final = "versions"

# Trace-group attributes.
ATTR_TRACE_ID: Final = "trace_id"
ATTR_N_TOKENS: Final = "n_tokens"
ATTR_SPANS: Final = "spans"
ATTR_SOURCE: Final = "source"
ATTR_COMPLETE: Final = "complete"
TRACE_ATTRS: Final = frozenset(
    {ATTR_TRACE_ID, ATTR_N_TOKENS, ATTR_SPANS, ATTR_SOURCE, ATTR_COMPLETE}
)
"""Trace attributes the writer sets; caller attrs may not reuse these names."""

# Dataset attributes.
ATTR_KIND: Final = "kind"
ATTR_SITE: Final = "site"
ATTR_LAYERS: Final = "layers"
ATTR_DTYPE: Final = "dtype"
KIND_SITE: Final = "site"
KIND_ARRAY: Final = "array"

# Metadata passed to `open_writer(metadata=...)`.
IDENTITY_KEYS: Final = (
    ATTR_MODEL,
    ATTR_ARCHITECTURE,
    ATTR_MODEL_DTYPE,
    ATTR_WEIGHT_CONVENTION,
    ATTR_TOKENIZER_FINGERPRINT,
    ATTR_LEXICON_FINGERPRINT,
    ATTR_CATEGORY_CODES,
    "config",
)
"""Keys that define what the cached numbers mean: appending with any of them different is
refused."""
OPTIONAL_IDENTITY_KEYS: Final = (ATTR_WEIGHTS_FINGERPRINT,)
"""Identity keys a file may lack (written before they were recorded): compared only when both the
file and the run have them; a file without one keeps lacking it."""
INFORMATIONAL_KEYS: Final = (ATTR_TOOLKIT_VERSION, ATTR_VERSIONS, "info")
"""Optional keys recorded at creation but never compared (the writing toolkit's version, package
versions, free-form info). The toolkit version is passed in by the caller, so `cache` needs nothing
of the toolkit that uses it."""
METADATA_KEYS: Final = IDENTITY_KEYS + OPTIONAL_IDENTITY_KEYS + INFORMATIONAL_KEYS
JSON_ROOT_ATTRS: Final = frozenset({ATTR_ARCHITECTURE, ATTR_CATEGORY_CODES, ATTR_VERSIONS})
"""Root attributes stored as JSON strings (dicts)."""
STRING_ROOT_ATTRS: Final = (
    ATTR_MODEL,
    ATTR_MODEL_DTYPE,
    ATTR_WEIGHT_CONVENTION,
    ATTR_TOKENIZER_FINGERPRINT,
    ATTR_LEXICON_FINGERPRINT,
)

# Storage.
BFLOAT16: Final = "bfloat16"
"""Logical dtype name of arrays stored as raw uint16 bfloat16 bits."""
SITE_DTYPES: Final = ("float16", "float32", "float64", BFLOAT16)
"""Logical dtypes a site dataset may have."""
CHUNK_TOKENS: Final = 512
"""Token rows per chunk of a site dataset (docs/tooling.md#chunking: 256–1024, 1 layer, d)."""
READER_CHUNK_CACHE_BYTES: Final = 64 * 2**20
"""`rdcc_nbytes` of readers: holds every chunk one `[tokens, layer]` read touches."""
GZIP_LEVEL: Final = 4
"""Level of the opt-in gzip filter (with shuffle); docs/tooling.md#compression."""
MAX_ATTR_BYTES: Final = 16 * 1024
"""Caller attrs above this size belong in a dataset (HDF5 advises < 64 KiB per attribute)."""

_SAFE_ID_CHARS: Final = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:@+,=~"
)


def escape_trace_id(trace_id: str) -> str:
    """The HDF5 link name of a trace: percent-encoding of every character outside a safe set.

    '/' (a path separator in HDF5), '%', spaces, non-ASCII characters and a leading '.' (so no name
    is "." or starts like `TMP_PREFIX`) become `%XX` of their UTF-8 bytes. The map is injective and
    `unescape_trace_id` inverts it; the original id is also kept in the `trace_id` attribute.

    Args:
        trace_id: Any non-empty string.

    Returns:
        The escaped name, e.g. "gsm8k/12" -> "gsm8k%2F12", ".x" -> "%2Ex".

    Raises:
        CacheInputError: `trace_id` is empty or not a string.
    """
    if not isinstance(trace_id, str) or not trace_id:
        raise CacheInputError(f"trace id must be a non-empty string, got {trace_id!r}")
    out = []
    for i, char in enumerate(trace_id):
        if char in _SAFE_ID_CHARS and not (i == 0 and char == "."):
            out.append(char)
        else:
            out.extend(f"%{byte:02X}" for byte in char.encode("utf-8"))
    return "".join(out)


def unescape_trace_id(name: str) -> str:
    """Inverse of `escape_trace_id`."""
    from urllib.parse import unquote

    return unquote(name, encoding="utf-8", errors="strict")


def validate_dataset_name(name: str, *, what: str) -> None:
    """Raise `CacheInputError` unless `name` can name a site or metric dataset inside a trace group.

    Args:
        name: The proposed name, e.g. "resid_post" or "lhat".
        what: "site" or "array", for the message.
    """
    if not isinstance(name, str) or not name:
        raise CacheInputError(f"{what} name must be a non-empty string, got {name!r}")
    if "/" in name or name.startswith("."):
        raise CacheInputError(
            f"{what} name {name!r} cannot contain '/' or start with '.'; "
            f"use e.g. 'resid_post' or 'L12.attn_out'"
        )
    if name in RESERVED_NAMES:
        raise CacheInputError(
            f"{what} name {name!r} is reserved for the trace's own data; reserved: "
            f"{sorted(RESERVED_NAMES)}"
        )


def site_chunks(shape: Sequence[int]) -> tuple[int, ...]:
    """Chunk shape of a site dataset: up to `CHUNK_TOKENS` rows, one layer, the full last axes.

    The token axis is split into ceil(T / 512) equal chunks rather than 512-row chunks plus a
    mostly empty edge chunk (HDF5 allocates edge chunks in full; docs/tooling.md#edge-chunks): T = 700 gives
    two chunks of 350 rows, not 512 + 188 (+46% on disk).

    Args:
        shape: The dataset shape, first axis = selected tokens, e.g. (T, L, d).

    Returns:
        (rows, 1, d) for (T, L, d), (rows, d) for (T, d), (rows,) for (T,), where
        rows = min(T, 512) for T <= 512 and ceil(T / ceil(T / 512)) above; every entry >= 1.
    """
    if not shape:
        raise CacheInputError("a site array needs at least one axis (the selected tokens)")
    n_rows = int(shape[0])
    n_chunks = max(1, -(-n_rows // CHUNK_TOKENS))
    first = max(1, -(-n_rows // n_chunks))  # balanced: edge chunks waste < n_chunks rows
    if len(shape) == 1:
        return (first,)
    if len(shape) == 2:
        return (first, max(1, int(shape[1])))
    return (first, 1, *(max(1, int(n)) for n in shape[2:]))
