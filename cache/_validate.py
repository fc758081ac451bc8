"""Per-trace checks of what the writer is asked to store: spans, attributes, token vectors, array
dtypes and the site layout every trace of a file must share; and whether a stored group is complete.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np

from cache import _h5, schema
from cache._meta import _short
from cache.errors import (
    CacheInputError,
)

_INT32 = np.iinfo(np.int32)


@dataclass(frozen=True)
class SiteArray:
    """An array plus how to label it on disk (needed for bfloat16 bits and explicit layers).

    Attributes:
        data: The numpy array, first axis = selected tokens for sites, e.g. [n_sel, n_layers, d].
            For bfloat16 give the raw bits as uint16: `t.view(torch.int16).numpy().view(np.uint16)`.
        dtype: "bfloat16" for uint16 bits; None (or the array's own dtype name) otherwise.
        layers: Layer index of each entry of axis 1; default `range(n_layers)` for 3-D sites and
            `[]` for sites without a layer axis.
    """

    data: np.ndarray
    dtype: str | None = None
    layers: Sequence[int] | None = None


@dataclass(frozen=True)
class _Prepared:
    """A validated array ready for `create_dataset`."""

    name: str
    data: np.ndarray
    attrs: dict[str, Any]
    chunks: tuple[int, ...] | None
    layout: tuple[str, tuple[int, ...], tuple[int, ...]]  # (dtype, row shape, layers)


# -- per-trace validation ------------------------------------------------------------------------
def _is_complete(group: Any) -> bool:
    """Whether `group` is a trace group with `complete=True`; False if unreadable."""
    try:
        return isinstance(group, h5py.Group) and bool(group.attrs.get(schema.ATTR_COMPLETE, False))
    except (OSError, KeyError, RuntimeError, ValueError):
        return False


def _trace_id(group: Any, name: str) -> str:
    try:
        return _h5.as_str(group.attrs[schema.ATTR_TRACE_ID])
    except Exception:
        return schema.unescape_trace_id(name)


def _group_layout(group: h5py.Group) -> dict[str, tuple[str, tuple[int, ...], tuple[int, ...]]]:
    out = {}
    for key, obj in group.items():
        if isinstance(obj, h5py.Dataset) and (
                _h5.as_str(obj.attrs.get(schema.ATTR_KIND, "")) == schema.KIND_SITE):
            layers = tuple(json.loads(_h5.as_str(obj.attrs[schema.ATTR_LAYERS])))
            out[key] = (_h5.as_str(obj.attrs[schema.ATTR_DTYPE]), tuple(obj.shape[1:]), layers)
    return out


def _site_layout(
    datasets: Iterable[_Prepared],
) -> dict[str, tuple[str, tuple[int, ...], tuple[int, ...]]]:
    return {d.name: d.layout for d in datasets if d.attrs[schema.ATTR_KIND] == schema.KIND_SITE}


def _describe_layout(layout: tuple[str, tuple[int, ...], tuple[int, ...]] | None) -> str:
    if layout is None:
        return "absent"
    dtype, row_shape, layers = layout
    return f"{dtype} rows {list(row_shape)} layers {_short(list(layers), 30)}"


def _int_vector(value: Any, what: str, where: str, *, lo: int = _INT32.min,
                hi: int = _INT32.max) -> np.ndarray:
    array = np.asarray(value)
    if array.ndim != 1 or not (array.dtype.kind in "iu" or array.size == 0):
        raise CacheInputError(f"{where}: {what} must be a 1-D integer array, got dtype "
                              f"{array.dtype} shape {array.shape}")
    if array.size and (int(array.min()) < lo or int(array.max()) > hi):
        raise CacheInputError(f"{where}: {what} values must lie in [{lo}, {hi}], got "
                              f"[{int(array.min())}, {int(array.max())}]")
    return array.astype(np.int32)


def _check_spans(spans: Mapping[str, Any], n_tokens: int, where: str) -> dict[str, list[int]]:
    out = {}
    for name, span in spans.items():
        try:
            start, end = (int(x) for x in span)
        except (TypeError, ValueError):
            raise CacheInputError(f"{where}: span {name!r} must be (start, end), "
                                  f"got {span!r}") from None
        if not (isinstance(name, str) and 0 <= start <= end <= n_tokens):
            raise CacheInputError(f"{where}: span {name!r} = ({start}, {end}) must satisfy "
                                  f"0 <= start <= end <= n_tokens = {n_tokens}")
        out[name] = [start, end]
    return out


def _check_attrs(attrs: Mapping[str, Any] | None) -> dict[str, Any]:
    out = {}
    for key, value in (attrs or {}).items():
        if not isinstance(key, str) or not key or key in schema.TRACE_ATTRS:
            raise CacheInputError(f"attribute name {key!r} is empty or reserved "
                                  f"({sorted(schema.TRACE_ATTRS)})")
        if isinstance(value, np.generic):
            value = value.item()
        if not isinstance(value, (str, int, float, bool)):
            raise CacheInputError(
                f"attribute {key!r} must be str/int/float/bool, got {type(value).__name__}; "
                f"store arrays with arrays= and long text with text="
            )
        if isinstance(value, str) and len(value.encode("utf-8")) > schema.MAX_ATTR_BYTES:
            raise CacheInputError(f"attribute {key!r} is over {schema.MAX_ATTR_BYTES} bytes; "
                                  f"store it with text= instead")
        out[key] = value
    return out


def _prepare_array(
    name: str,
    value: np.ndarray | SiteArray,
    *,
    kind: str,
    n_rows: int | None,
    where: str = "",
) -> _Prepared:
    """Validate one site / metric array and compute its dtype label, layers and chunks."""
    schema.validate_dataset_name(name, what=kind)
    prefix = f"{where}: {kind} {name!r}" if where else f"{kind} {name!r}"
    wrapper = value if isinstance(value, SiteArray) else SiteArray(value)
    data = wrapper.data
    if not isinstance(data, np.ndarray):
        raise CacheInputError(
            f"{prefix} must be a numpy array, got {type(data).__name__}; convert torch tensors "
            f"with t.cpu().numpy(), bfloat16 ones with t.view(torch.int16).numpy().view(np.uint16) "
            f"in SiteArray(bits, dtype='bfloat16')"
        )
    if wrapper.dtype == schema.BFLOAT16:
        if data.dtype not in (np.uint16, np.int16):
            raise CacheInputError(f"{prefix}: dtype='bfloat16' needs the raw bits as a uint16 "
                                  f"array, got {data.dtype}")
        data = data.view(np.uint16)
        label = schema.BFLOAT16
    elif wrapper.dtype is not None and wrapper.dtype != data.dtype.name:
        raise CacheInputError(f"{prefix}: dtype={wrapper.dtype!r} but the array is {data.dtype}; "
                              f"give dtype=None, or 'bfloat16' with uint16 bits")
    else:
        label = data.dtype.name
    if kind == schema.KIND_SITE:
        if label not in schema.SITE_DTYPES:
            hint = (" (bfloat16 bits? pass SiteArray(bits, dtype='bfloat16'))"
                    if data.dtype == np.uint16 else "")
            raise CacheInputError(f"{prefix} has dtype {label}; sites are "
                                  f"{list(schema.SITE_DTYPES)}{hint}")
        if data.ndim == 0 or data.shape[0] != n_rows:
            raise CacheInputError(f"{prefix} has shape {data.shape}; its first axis must be the "
                                  f"{n_rows} selected positions")
        chunks: tuple[int, ...] | None = schema.site_chunks(data.shape)
    else:
        if data.dtype.kind not in "biuf":
            raise CacheInputError(f"{prefix} has dtype {data.dtype}; arrays must be numeric")
        chunks = None
    if wrapper.layers is not None:
        layers = tuple(int(x) for x in wrapper.layers)
        if data.ndim < 2 or len(layers) != data.shape[1]:
            raise CacheInputError(f"{prefix}: {len(layers)} layers given for shape {data.shape}; "
                                  f"give one layer index per entry of axis 1")
    else:
        layers = tuple(range(data.shape[1])) if data.ndim >= 3 else ()
    attrs: dict[str, Any] = {schema.ATTR_KIND: kind, schema.ATTR_DTYPE: label}
    if kind == schema.KIND_SITE:
        attrs[schema.ATTR_SITE] = name
        attrs[schema.ATTR_LAYERS] = json.dumps(list(layers))
    elif wrapper.layers is not None:
        attrs[schema.ATTR_LAYERS] = json.dumps(list(layers))
    return _Prepared(name=name, data=data, attrs=attrs, chunks=chunks,
                     layout=(label, tuple(data.shape[1:]), layers))


def prepare_trace(
    known_codes: set[int],
    trace_id: str,
    *,
    tokens: np.ndarray,
    category: np.ndarray,
    positions: np.ndarray | None,
    spans: Mapping[str, tuple[int, int]] | None,
    sites: Mapping[str, np.ndarray | SiteArray] | None,
    arrays: Mapping[str, np.ndarray | SiteArray] | None,
    text: Mapping[str, str] | None,
    source: str,
    attrs: Mapping[str, Any] | None,
) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, str], list[_Prepared]]:
    """Validate everything before touching the file; returns what `write_trace` stores."""
    where = f"trace {trace_id!r}"
    token_ids = _int_vector(tokens, "tokens", where)
    n_tokens = int(token_ids.shape[0])
    codes = _int_vector(category, "category", where, lo=0, hi=255)
    if codes.shape[0] != n_tokens:
        raise CacheInputError(f"{where}: category has {codes.shape[0]} entries, tokens "
                              f"{n_tokens}; give one code per token")
    known = known_codes
    unknown = sorted(set(np.unique(codes).tolist()) - known)
    if unknown:
        raise CacheInputError(f"{where}: category codes {unknown} are not in the cache's "
                              f"category_codes {sorted(known)}")
    if positions is None:
        rows = np.arange(n_tokens, dtype=np.int32)
    else:
        rows = _int_vector(positions, "positions", where, lo=0, hi=max(n_tokens - 1, 0))
        if rows.size and (n_tokens == 0 or np.any(np.diff(rows.astype(np.int64)) <= 0)):
            raise CacheInputError(f"{where}: positions must be strictly increasing token "
                                  f"indices in [0, {n_tokens}), got {rows[:8].tolist()}...")
    n_sel = int(rows.shape[0])
    span_dict = _check_spans(spans or {}, n_tokens, where)
    if not isinstance(source, str):
        raise CacheInputError(f"{where}: source must be a string, got {type(source).__name__}")
    text_items = {}
    for key, value in (text or {}).items():
        schema.validate_dataset_name(key, what="text")
        if not isinstance(value, str):
            raise CacheInputError(f"{where}: text[{key!r}] must be str, "
                                  f"got {type(value).__name__}")
        text_items[key] = value
    group_attrs = {
        schema.ATTR_TRACE_ID: trace_id,
        schema.ATTR_N_TOKENS: np.int64(n_tokens),
        schema.ATTR_SPANS: json.dumps(span_dict),
        schema.ATTR_SOURCE: source,
        **_check_attrs(attrs),
    }
    datasets = [_prepare_array(key, value, kind=schema.KIND_SITE, n_rows=n_sel,
                               where=where)
                for key, value in (sites or {}).items()]
    datasets += [_prepare_array(key, value, kind=schema.KIND_ARRAY, n_rows=None,
                                where=where)
                 for key, value in (arrays or {}).items()]
    names = [d.name for d in datasets]
    if len(set(names)) != len(names):
        raise CacheInputError(f"{where}: a name is used both as a site and an array: "
                              f"{sorted({n for n in names if names.count(n) > 1})}")
    core = {schema.TOKENS: token_ids, schema.CATEGORY: codes.astype(np.uint8),
            schema.POSITIONS: rows}
    return group_attrs, core, text_items, datasets

