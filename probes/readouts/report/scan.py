"""What `report` reads from a cache before the comparison (`_Scan`) and the token heat maps it
shows: the traces picked, their per-token values and the colouring keys.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from analyses.report_data import TokenKey, TokenView
from analyses.report_text import plain_text
from cache import store_bytes
from probes import arrays
from probes.errors import ProbesError
from probes.models.cache_text import cache_decoder, phrase_names
from probes.pipeline.progress import Stages
from probes.readouts.loader import load_traces, open_cache

if TYPE_CHECKING:
    from probes.readouts.configs import ReportConfig
    from probes.readouts.loader import TraceArrays

LAYER_VALUE_BUDGET = 1_500_000
"""Per-layer colouring keys are offered while (per-layer keys x shown tokens) stays below this;
above it only the mean over layers is (the page stays a few MB)."""

_LHAT_VIEW = ("lhat", "lhat_delta", "lhat_rho", "lhat_log_ratio")
_LHAT_LABELS = {"lhat": "L̂ after the token", "lhat_delta": "ΔL̂", "lhat_rho": "ρ (RaML)",
                "lhat_log_ratio": "Δ log L̂"}
_PREFERRED_DEFAULT = ("lhat_delta", "upd_m7@mean", "upd_sigma_gate@mean")


@dataclass
class _Scan:
    """What the report needs to know about a cache before the comparison."""

    path: Path
    meta: dict[str, Any]
    ids: list[str]
    n_incomplete: int
    tokens: dict[str, int]
    traces_with: dict[str, int]
    n_lhat: int
    n_updates: int
    sites: dict[str, Any]
    reflective: list[str]
    file_bytes: int
    """Size on disk: the index file plus its segments (`cache.store_bytes`)."""


def _scan(path: Path) -> _Scan:
    with open_cache(path) as reader:
        meta = dict(reader.metadata)
        codes = dict(sorted(reader.category_codes.items(), key=lambda kv: kv[1]))
        traces = load_traces(reader, [])
        sites = {name: {"dtype": s.dtype, "row_shape": list(s.row_shape), "layers": list(s.layers)}
                 for name, s in reader.sites.items()}
        n_incomplete = len(reader.incomplete_ids())
    names = {int(v): k for k, v in codes.items()}
    tokens = dict.fromkeys(codes, 0)
    traces_with = dict.fromkeys(codes, 0)
    ids, reflective, n_lhat, n_upd = [], [], 0, 0
    for tr in traces:
        ids.append(tr.id)
        counts = np.bincount(np.asarray(tr.category, np.int64), minlength=max(names) + 1)
        for code, name in names.items():
            tokens[name] += int(counts[code])
            traces_with[name] += int(counts[code] > 0)
        n_lhat += "lhat" in tr.stored
        n_upd += "upd_contrib" in tr.stored
        if counts[codes["reflection"]] > 0:
            reflective.append(tr.id)
    return _Scan(path, meta, ids, n_incomplete, tokens, traces_with, n_lhat, n_upd, sites,
                 reflective, store_bytes(path))


def _pick_views(scan: _Scan, cfg: ReportConfig) -> list[str]:
    if cfg.trace_ids:
        unknown = [i for i in cfg.trace_ids if i not in set(scan.ids)]
        if unknown:
            raise ProbesError(f"--trace-id {unknown} not among the {len(scan.ids)} complete traces of "
                              f"{scan.path} (e.g. {scan.ids[:5]})")
        return list(cfg.trace_ids)
    chosen = set(scan.reflective[:cfg.n_views])
    rest = [i for i in scan.ids if i not in chosen][:max(0, cfg.n_views - len(chosen))]
    chosen |= set(rest)
    return [i for i in scan.ids if i in chosen]


def _decoder(meta: dict[str, Any]) -> tuple[Any, str]:
    """The token-text decoder of the cache's tokenizer, or (None, why not)."""

    try:
        return cache_decoder(meta), ""
    except (ProbesError, OSError, ValueError) as err:
        return None, (f"token ids shown instead of text: the tokenizer of {meta.get('model')!r} "
                      f"could not be loaded here ({err})")


_VIEW_ARRAYS = ("phrase_id", *_LHAT_VIEW, *arrays.names(arrays.UPDATES))
"""The arrays a token view shows, when its trace has them."""


def _read_view(tr: TraceArrays, decode: Any, names: list[str] | None) -> dict[str, Any]:
    """One trace's token texts, labels, values (keyed as the colouring keys) and [L, T] arrays."""
    ids = tr.tokens
    got = tr.arrays
    pieces = ([plain_text(p) for p in decode(ids.tolist())] if decode is not None
              else [f"[{int(i)}]" for i in ids])
    phrase_ids = got["phrase_id"] if "phrase_id" in got else np.full(len(ids), -1)
    phrase = [(names[p] if names is not None and 0 <= p < len(names) else f"phrase {p}") if p >= 0
              else "" for p in phrase_ids.tolist()]
    values: dict[str, np.ndarray] = {}
    for name in _LHAT_VIEW:
        if name in got:
            v = np.asarray(got[name], np.float64)
            values[name] = v[1:] if name == "lhat" else v
    layered = {n: np.asarray(got[n], np.float64) for n in arrays.names(arrays.UPDATES) if n in got}
    for name, v in layered.items():
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns stay NaN
            values[f"{name}@mean"] = np.nanmean(v, axis=0)
    try:
        layer_ids = [int(x) for x in json.loads(str(tr.attrs.get("upd_layers", "[]")))]
    except (TypeError, ValueError):
        layer_ids = []
    return {"id": tr.id, "pieces": list(pieces), "category": tr.category, "phrase": phrase,
            "span": tr.trajectory, "values": values, "layered": layered, "layers": layer_ids}


def _token_views(scan: _Scan, ids: list[str], stages: Stages) -> tuple[list[TokenView], list[TokenKey], str]:
    """The heat-map traces and the keys they can be coloured by; a note ("" if none)."""

    if not ids:
        return [], [], ""
    decode, note = _decoder(scan.meta)
    names = phrase_names(scan.meta)
    raw = []
    with open_cache(scan.path) as reader:
        for tid in ids:
            stages.step(f"token view {tid}")
            (tr,) = load_traces(reader, [], traces=[tid], optional=_VIEW_ARRAYS)
            raw.append(_read_view(tr, decode, names))
            stages.advance(tokens=raw[-1]["span"][1] - raw[-1]["span"][0])
    keys, layer_note = _keys(raw)
    note = "; ".join(n for n in (note, layer_note) if n)
    views = [TokenView(trace_id=r["id"], pieces=r["pieces"], category=r["category"], phrase=r["phrase"],
                       traj_span=r["span"], values=r["values"], note=note) for r in raw]
    return views, keys, note


def _keys(raw: list[dict[str, Any]]) -> tuple[list[TokenKey], str]:
    """Colouring keys present in every view: L̂ arrays, each update's mean over layers, and each
    layer while the page stays small (their values are added to the views' values)."""
    common = set.intersection(*(set(r["values"]) for r in raw))
    keys = [TokenKey(n, f"{_LHAT_LABELS[n]} ({n})", _units(n), "L̂") for n in _LHAT_VIEW if n in common]
    upd = [n for n in arrays.names(arrays.UPDATES) if all(n in r["layered"] for r in raw)]
    n_tokens = sum(r["span"][1] - r["span"][0] for r in raw)
    n_layers = max((raw[0]["layered"][n].shape[0] for n in upd), default=0)
    per_layer = len(upd) * n_layers * n_tokens <= LAYER_VALUE_BUDGET
    layer_ids = raw[0]["layers"] if len(raw[0]["layers"]) == n_layers else list(range(n_layers))
    for name in upd:
        keys.append(TokenKey(f"{name}@mean", f"{name} · mean over layers", _units(name), name))
        if not per_layer:
            continue
        for row, layer in enumerate(layer_ids):
            keys.append(TokenKey(f"{name}@{layer}", f"{name} · layer {layer}", _units(name), name,
                                 hover=False))
            for r in raw:
                r["values"][f"{name}@{layer}"] = r["layered"][name][row]
    note = "" if per_layer or not upd else (
        f"per-layer colouring left out ({len(upd)} arrays x {n_layers} layers x {n_tokens} tokens "
        "is too much for one page); the mean over layers is shown")
    return keys, note


def _units(name: str) -> str:
    decl = arrays.BY_NAME.get(name)
    if decl is None:
        return ""
    return f"{decl.meaning}; {decl.units}" if decl.units else decl.meaning


def _default_key(keys: list[TokenKey], wanted: str | None) -> str | None:
    known = [k.key for k in keys]
    if wanted is not None:
        for candidate in (wanted, f"{wanted}@mean"):
            if candidate in known:
                return candidate
        raise ProbesError(f"--colour-by {wanted!r} is not a per-token array of the shown traces; "
                          f"choose one of {known}")
    return next((k for k in _PREFERRED_DEFAULT if k in known), known[0] if known else None)
