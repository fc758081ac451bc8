"""Test helper: everything a cache holds, as comparable Python values (external links followed)."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from cache import open_cache


def snapshot(path: Path, *, skip_attrs: tuple[str, ...] = ("created",)) -> dict:
    """Root attrs + /meta, and per trace (by id, in the reader's order) attrs and every dataset's
    dtype, shape, chunks, compression, attrs and raw bytes, read through `open_cache`."""
    out: dict = {}
    with open_cache(path) as reader:
        f = reader._require_open()
        out["/"] = {k: _plain(v) for k, v in f.attrs.items() if k not in skip_attrs}
        out["/meta"] = (f["meta/config"][()], f["meta/info"][()])
        out["order"] = reader.trace_ids()
        for trace_id in reader.trace_ids():
            group = f["traces"][reader.trace(trace_id)._group.name.rsplit("/", 1)[-1]]
            entry = {"attrs": {k: _plain(v) for k, v in group.attrs.items()}}
            _visit("", group, entry)
            out[trace_id] = entry
    return out


def _visit(prefix: str, group: h5py.Group, entry: dict) -> None:
    for key, obj in group.items():
        if isinstance(obj, h5py.Group):
            _visit(f"{prefix}{key}/", obj, entry)
            continue
        value = obj[()]
        entry[prefix + key] = (
            obj.dtype.str, obj.shape, obj.chunks, obj.compression,
            value if isinstance(value, bytes) else np.asarray(value).tobytes(),
            {k: _plain(v) for k, v in obj.attrs.items()})


def _plain(value):
    if isinstance(value, np.ndarray):
        return (value.dtype.str, value.tolist())
    return (type(value).__name__, value.item()) if isinstance(value, np.generic) else value
