"""Shared h5py plumbing of the writer and the reader: opening with clear errors, root metadata.

Private to `cache/`. Turns h5py's `OSError`s into the `cache.errors` family with the path and the
fix, and reads/validates the root attributes written by `cache.writer`.
"""

from __future__ import annotations

import errno
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from cache import schema
from cache.errors import (
    CacheCorruptError,
    CacheError,
    CacheLockedError,
    CacheVersionError,
    NotACacheError,
)

STRING_DTYPE = h5py.string_dtype("utf-8")


_STRING_TYPE = h5py.h5t.py_create(STRING_DTYPE, logical=True)  # stored: vlen UTF-8
_STRING_MEMORY = h5py.h5t.py_create(STRING_DTYPE)  # in memory: Python objects (h5py converts)
_SCALAR = h5py.h5s.create_simple(())


def set_attrs(obj: h5py.HLObject, attrs: Mapping[str, Any]) -> None:
    """Set attributes of a new object (no attribute of these names yet).

    Strings are written through the low-level API (the same variable-length UTF-8 scalar that
    `obj.attrs[key] = value` writes, at half its cost: a segment holds dozens per trace); other
    values through h5py's own conversion.
    """
    for key, value in attrs.items():
        if isinstance(value, str):
            attr = h5py.h5a.create(obj.id, key.encode("utf-8"), _STRING_TYPE, _SCALAR)
            try:
                attr.write(np.array(value, dtype=STRING_DTYPE), mtype=_STRING_MEMORY)
            finally:
                attr.close()
        else:
            obj.attrs[key] = value


def check_file_path(path: Path, *, creating: bool) -> None:
    """Raise a `CacheError` naming `path` when it is a folder or its folder does not exist."""
    if path.is_dir():
        raise CacheError(f"{path} is a directory, not an HDF5 cache file; give a file path such "
                         f"as {path / 'run.h5'}")
    if creating and not path.parent.is_dir():
        raise CacheError(f"cannot create {path}: folder {path.parent} does not exist; create it "
                         f"first (mkdir -p {path.parent}) or choose another --out")
    if not creating and not path.exists():
        raise CacheError(f"{path} does not exist; check the path (or write a cache first)")


def open_file(path: Path, mode: str, *, writing: bool, **kwargs: Any) -> h5py.File:
    """`h5py.File(path, mode)` with the lock / corruption / not-HDF5 errors translated.

    Args:
        path: The file.
        mode: An h5py mode ("r", "r+", "x", "w").
        writing: Whether the caller is a writer (changes the lock message).
        **kwargs: Passed to `h5py.File` (e.g. `rdcc_nbytes`, `track_order`).

    Returns:
        The open file.
    """
    try:
        return h5py.File(path, mode, **kwargs)
    except OSError as exc:
        short = _truncated_by(exc)
        if not (writing and short):
            raise translate_os_error(path, exc, writing=writing) from None
    # A writer killed inside a flush can leave the file shorter than its superblock's end of
    # allocation; the missing tail belongs to the write in progress, which was not committed.
    # The writer extends the file with zeros to that end, and the interrupted trace is then
    # deleted and redone like any other.
    os.truncate(path, os.path.getsize(path) + short)
    try:
        return h5py.File(path, mode, **kwargs)
    except OSError as exc:
        raise translate_os_error(path, exc, writing=writing) from None


def _truncated_by(exc: OSError) -> int:
    """Bytes missing at the end of a file HDF5 calls truncated (0 for any other error)."""
    found = re.search(r"truncated file: eof = (\d+).*stored_eof = (\d+)", str(exc))
    return max(int(found.group(2)) - int(found.group(1)), 0) if found else 0


def translate_os_error(path: Path, exc: OSError, *, writing: bool) -> Exception:
    """The `CacheError` (or the original error) that explains h5py's `exc` for `path`."""
    text = str(exc)
    if isinstance(exc, BlockingIOError) or exc.errno == errno.EAGAIN or "unable to lock" in text:
        if writing:
            return CacheLockedError(
                f"{path} is open by another writer (pid unknown) or reader (HDF5 file lock, "
                f"errno 11); wait for it or write to another file (--out other.h5)"
            )
        return CacheLockedError(
            f"{path} is open by a writer (pid unknown; HDF5 file lock, errno 11); wait for it to "
            f"finish, or read a copy of the file"
        )
    if "file signature not found" in text:
        return NotACacheError(f"{path} is not an HDF5 file (no HDF5 signature); "
                              f"expected a cache written by `python -m probes.run cache`")
    if isinstance(exc, FileExistsError) or exc.errno == errno.EEXIST:
        return CacheError(f"{path} was created by another process at the same moment; rerun "
                          f"with --resume to add to it, or choose another --out")
    if isinstance(exc, (FileNotFoundError, IsADirectoryError, PermissionError)):
        return CacheError(f"cannot open {path}: {text}")
    return corrupt_error(path, exc)


def corrupt_error(path: Path, exc: BaseException) -> CacheCorruptError:
    """The `CacheCorruptError` for a file that HDF5 cannot read."""
    text = " ".join(str(exc).split())
    return CacheCorruptError(
        f"{path} is truncated or corrupt: {text}; re-create it (--resume cannot repair a damaged "
        f"single file; the segmented caches this toolkit writes keep every committed trace)"
    )


def read_string_dataset(f: h5py.File, name: str) -> str:
    """The UTF-8 text of the scalar string dataset `name`."""
    value = f[name][()]
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def as_str(value: Any) -> str:
    """An attribute value as `str` (h5py returns variable-length strings as `str` or `bytes`)."""
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def read_root_metadata(f: h5py.File, path: Path) -> dict[str, Any]:
    """Validate the root of a cache and return its metadata.

    Returns:
        {schema_version, toolkit_version, created, model, architecture (dict), model_dtype,
        weight_convention, tokenizer_fingerprint, lexicon_fingerprint, category_codes (dict),
        versions (dict), config (dict), info (dict)}, and weights_fingerprint where recorded.

    Raises:
        NotACacheError: No `schema_version` attribute.
        CacheVersionError: A schema version other than `schema.SCHEMA_VERSION`.
        CacheCorruptError: A schema attribute or the config is missing or unreadable.
    """
    attrs = f.attrs
    if schema.ATTR_SCHEMA_VERSION not in attrs:
        raise NotACacheError(
            f"{path} is an HDF5 file but not a trajectory-probes cache (no schema_version "
            f"attribute); point to a file written by `python -m probes.run cache`"
        )
    version = int(attrs[schema.ATTR_SCHEMA_VERSION])
    if version != schema.SCHEMA_VERSION:
        newer = version > schema.SCHEMA_VERSION
        raise CacheVersionError(
            f"{path} has cache schema_version {version}, this toolkit reads version "
            f"{schema.SCHEMA_VERSION}; "
            + ("upgrade trajectory-probes to read it" if newer
               else "re-create the cache with this toolkit")
        )
    out: dict[str, Any] = {schema.ATTR_SCHEMA_VERSION: version}
    try:
        out[schema.ATTR_TOOLKIT_VERSION] = as_str(attrs[schema.ATTR_TOOLKIT_VERSION])
        out[schema.ATTR_CREATED] = as_str(attrs[schema.ATTR_CREATED])
        for key in schema.STRING_ROOT_ATTRS:
            out[key] = as_str(attrs[key])
        for key in schema.OPTIONAL_IDENTITY_KEYS:
            if key in attrs:
                out[key] = as_str(attrs[key])
        for key in sorted(schema.JSON_ROOT_ATTRS):
            out[key] = json.loads(as_str(attrs[key]))
        out["config"] = json.loads(read_string_dataset(f, schema.CONFIG_DATASET))
        out["info"] = json.loads(read_string_dataset(f, schema.INFO_DATASET))
    except KeyError as exc:
        raise CacheCorruptError(
            f"{path} is missing schema v{version} metadata ({exc}); re-create the cache"
        ) from None
    except (OSError, ValueError) as exc:
        raise corrupt_error(path, exc) from None
    return out
