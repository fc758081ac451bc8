"""Errors raised by the HDF5 cache; `CacheError` is their root (one line each in the CLI).

Every message names the file and says how to fix the problem.
"""

__all__ = [
    "CacheCorruptError",
    "CacheError",
    "CacheInputError",
    "CacheLockedError",
    "CacheMismatchError",
    "CacheVersionError",
    "CacheWriteError",
    "DuplicateTraceError",
    "NotACacheError",
    "TraceNotFoundError",
]


class CacheError(Exception):
    """Base class of every cache error."""


class CacheInputError(CacheError, ValueError):
    """An array, name, id or attribute that the writer cannot store as given."""


class CacheLockedError(CacheError):
    """The file is held by another process (HDF5's file lock, errno 11)."""


class CacheCorruptError(CacheError):
    """The file is truncated or damaged (e.g. a writer died before its first flush)."""


class NotACacheError(CacheError):
    """The file is not HDF5, or is HDF5 without this toolkit's schema attributes."""


class CacheVersionError(CacheError):
    """The file's `schema_version` is not one this toolkit reads or appends to."""


class CacheWriteError(CacheError):
    """Writing failed (full disk, file-size limit, I/O error); what was committed is kept."""


class CacheMismatchError(CacheError, ValueError):
    """Appending would mix models, tokenizers or run configs in one file."""


class DuplicateTraceError(CacheError, ValueError):
    """A trace id was written twice in one run."""


class TraceNotFoundError(CacheError, LookupError):
    """A trace id that the cache does not hold (or holds only incompletely)."""
