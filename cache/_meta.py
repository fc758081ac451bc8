"""Root metadata of a cache: creating a file atomically with its metadata, normalising what the
caller passes, and the identity check that decides whether a run may append to a file.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from cache import _h5, schema
from cache.errors import (
    CacheError,
    CacheInputError,
    CacheLockedError,
    CacheMismatchError,
)


# -- file creation and metadata ------------------------------------------------------------------
def _create_file(path: Path, meta: dict[str, Any], *, replace: bool, fsync: bool) -> None:
    """Write the root metadata to a temporary file and move it into place (never half-made)."""
    if replace and path.exists():
        try:  # never pull the file from under a live writer or reader
            _h5.open_file(path, "r+", writing=True).close()
        except CacheLockedError:
            raise
        except CacheError:
            pass
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with h5py.File(tmp, "w") as f:
            _write_root(f, meta)
            f.flush()
            if fsync:
                os.fsync(f.id.get_vfd_handle())
        if replace:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # atomic and never replaces: a concurrent creator wins
            except FileExistsError:
                pass
            except OSError:  # no hard links on this filesystem
                if not path.exists():
                    os.replace(tmp, path)
        if fsync:
            _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _write_root(f: h5py.File, meta: dict[str, Any]) -> None:
    attrs = f.attrs
    attrs[schema.ATTR_SCHEMA_VERSION] = np.int64(schema.SCHEMA_VERSION)
    attrs[schema.ATTR_TOOLKIT_VERSION] = meta[schema.ATTR_TOOLKIT_VERSION]
    attrs[schema.ATTR_CREATED] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    for key in schema.STRING_ROOT_ATTRS:
        attrs[key] = meta[key]
    for key in schema.OPTIONAL_IDENTITY_KEYS:
        if key in meta:
            attrs[key] = meta[key]
    for key in sorted(schema.JSON_ROOT_ATTRS):
        attrs[key] = json.dumps(meta[key], sort_keys=True, ensure_ascii=False)
    f.create_group(schema.META_GROUP)
    f.create_dataset(schema.CONFIG_DATASET, dtype=_h5.STRING_DTYPE,
                     data=json.dumps(meta["config"], sort_keys=True, ensure_ascii=False))
    f.create_dataset(schema.INFO_DATASET, dtype=_h5.STRING_DTYPE,
                     data=json.dumps(meta["info"], sort_keys=True, ensure_ascii=False))
    f.create_group(schema.TRACES_GROUP, track_order=True)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems can't fsync a directory; the file itself is synced
        pass
    finally:
        os.close(fd)


def _normalize_metadata(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """Validate `metadata` and return it JSON-normalised, with the library versions added."""
    if not isinstance(metadata, Mapping):
        raise CacheInputError(f"metadata must be a dict, got {type(metadata).__name__}")
    unknown = sorted(set(metadata) - set(schema.METADATA_KEYS))
    missing = [key for key in schema.IDENTITY_KEYS if key not in metadata]
    if unknown or missing:
        raise CacheInputError(
            f"cache metadata has unknown keys {unknown} / lacks required keys {missing}; "
            f"required: {list(schema.IDENTITY_KEYS)}, optional: "
            f"{list(schema.OPTIONAL_IDENTITY_KEYS + schema.INFORMATIONAL_KEYS)}"
        )
    meta: dict[str, Any] = {}
    for key in (*schema.STRING_ROOT_ATTRS, *schema.OPTIONAL_IDENTITY_KEYS):
        if key not in metadata:
            continue
        if not isinstance(metadata[key], str):
            raise CacheInputError(f"metadata[{key!r}] must be a string, got {metadata[key]!r}")
        meta[key] = metadata[key]
    for key in (schema.ATTR_ARCHITECTURE, schema.ATTR_CATEGORY_CODES, "config"):
        meta[key] = _json_dict(metadata[key], key)
    codes = meta[schema.ATTR_CATEGORY_CODES]
    if not all(isinstance(c, int) and 0 <= c <= 255 for c in codes.values()):
        raise CacheInputError(f"metadata['category_codes'] must map names to ints in [0, 255], "
                              f"got {codes}")
    versions = _json_dict(metadata.get(schema.ATTR_VERSIONS, {}), schema.ATTR_VERSIONS)
    versions.setdefault("h5py", h5py.version.version)
    versions.setdefault("hdf5", h5py.version.hdf5_version)
    versions.setdefault("numpy", np.__version__)
    meta[schema.ATTR_VERSIONS] = versions
    toolkit = metadata.get(schema.ATTR_TOOLKIT_VERSION, "unknown")
    if not isinstance(toolkit, str):
        raise CacheInputError(f"metadata['toolkit_version'] must be a string, got {toolkit!r}")
    meta[schema.ATTR_TOOLKIT_VERSION] = toolkit
    meta["info"] = _json_dict(metadata.get("info", {}), "info")
    return meta


def _json_dict(value: Any, key: str) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise CacheInputError(f"metadata[{key!r}] must be a dict, got {type(value).__name__}")
    try:
        return json.loads(json.dumps(value, sort_keys=True))
    except (TypeError, ValueError) as exc:
        raise CacheInputError(f"metadata[{key!r}] is not JSON-serialisable: {exc}") from None


def check_identity(path: str | os.PathLike[str], stored: Mapping[str, Any],
                   given: Mapping[str, Any], keys: tuple[str, ...] = schema.IDENTITY_KEYS
                   ) -> None:
    """Raise what `open_writer` raises when appending run `given` to the cache `stored` came from.

    Lets a caller refuse a cache before its work, once it knows a part of the identity (e.g. the
    model, before a pass over the traces that the config depends on).

    Args:
        path: The cache (named in the message).
        stored: Its metadata (`CacheReader.metadata`).
        given: This run's `open_writer` metadata.
        keys: The identity keys to compare (the weights fingerprint is always compared where both
            have one).

    Raises:
        CacheMismatchError: Naming every differing field with both values.
        CacheInputError: `given` is not valid `open_writer` metadata.
    """
    _check_identity(Path(path), dict(stored), _normalize_metadata(given), keys)


def _check_identity(path: Path, stored: dict[str, Any], given: dict[str, Any],
                    keys: tuple[str, ...] = schema.IDENTITY_KEYS) -> None:
    diffs: list[tuple[str, Any, Any]] = []
    for key in keys:
        diffs += _diff(stored[key], given[key], key)
    if diffs:
        fields = sorted({d[0].split(".")[0] for d in diffs})
        details = "; ".join(f"{where}: stored {_short(a)}, given {_short(b)}"
                            for where, a, b in diffs[:6])
        raise CacheMismatchError(
            f"cannot append to {path}: its {', '.join(fields)} differ(s) from this run's ("
            f"{details}). One cache holds one model, tokenizer and run config: write to another "
            f"file (--out other.h5), or rerun with the same model and settings"
        )
    key = schema.ATTR_WEIGHTS_FINGERPRINT
    if key in stored and key in given and stored[key] != given[key]:
        raise CacheMismatchError(
            f"cannot append to {path}: the weights of model {given[schema.ATTR_MODEL]} changed "
            f"since it was written (weights fingerprint stored {stored[key]}, this run "
            f"{given[key]}); one cache holds one model's numbers: restore the weights it was made "
            f"with, or write to another --out (or start again without --resume)"
        )


_ABSENT = object()


def _diff(stored: Any, given: Any, where: str) -> list[tuple[str, Any, Any]]:
    if isinstance(stored, dict) and isinstance(given, dict):
        out = []
        for key in sorted(set(stored) | set(given), key=str):
            out += _diff(stored.get(key, _ABSENT), given.get(key, _ABSENT), f"{where}.{key}")
        return out
    return [] if stored == given else [(where, stored, given)]


def _short(value: Any, limit: int = 60) -> str:
    text = "<absent>" if value is _ABSENT else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 1] + "…"
