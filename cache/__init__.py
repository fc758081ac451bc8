"""HDF5 store of per-token activations and metrics: the only package that imports h5py.

Write with `open_writer(path, metadata=...)` (append / resume; safe against kills and failed
writes: a segmented store, cache/SCHEMA.md#segmented-store), read lazily without torch with
`open_cache(path)`, overview with `summarize(path)`, one self-contained file with `pack_cache`.
The layout is schema v1 (`cache.schema`, `cache/SCHEMA.md`); bfloat16 is stored as raw bits
(`cache.bf16`).
"""

from cache._meta import check_identity
from cache._pack import pack_cache
from cache._store import (
    check_segments_folder,
    describe_os_error,
    fix_hint,
    segments_dir,
    store_bytes,
    store_exists,
)
from cache.bf16 import bf16_bits_to_float32, float32_to_bf16_bits
from cache.errors import (
    CacheCorruptError,
    CacheError,
    CacheInputError,
    CacheLockedError,
    CacheMismatchError,
    CacheVersionError,
    CacheWriteError,
    DuplicateTraceError,
    NotACacheError,
    TraceNotFoundError,
)
from cache.reader import CachedTrace, CacheReader, LazyArray, SiteInfo, open_cache, summarize
from cache.schema import SCHEMA_VERSION
from cache.writer import (
    CacheWriter,
    SiteArray,
    check_unlocked,
    open_writer,
    remove_cache,
    try_lock,
)

__all__ = [
    "SCHEMA_VERSION",
    "CacheCorruptError",
    "CacheError",
    "CacheInputError",
    "CacheLockedError",
    "CacheMismatchError",
    "CacheReader",
    "CacheVersionError",
    "CacheWriteError",
    "CacheWriter",
    "CachedTrace",
    "DuplicateTraceError",
    "LazyArray",
    "NotACacheError",
    "SiteArray",
    "SiteInfo",
    "TraceNotFoundError",
    "bf16_bits_to_float32",
    "check_identity",
    "check_segments_folder",
    "check_unlocked",
    "describe_os_error",
    "fix_hint",
    "float32_to_bf16_bits",
    "open_cache",
    "open_writer",
    "pack_cache",
    "remove_cache",
    "segments_dir",
    "store_bytes",
    "store_exists",
    "summarize",
    "try_lock",
]
