"""Several short traces per forward (`cache`): the per-trace fixed costs paid once per batch.

A trace of a hundred tokens costs little compute, so one forward each is dominated by what every
call pays (module dispatch, the private HF view, small kernels, one commit). `plan_batches` cuts
the traces, in input order, into *groups* of consecutive traces that are committed together (one
segment); `capture_batch` runs a group as a few right-padded forwards `[batch, longest]` through
the HF fast path (`hooks.run_residual_hf`), its traces sorted by length so that little is padding,
and splits the rows back per trace. Right padding needs no mask: attention is causal, so no real
token sees the padding after it, and every row counts its positions from 0, exactly as alone.

The result equals one forward per trace up to float rounding (the matrix products have other
shapes; tested to 1e-6 in fp32). Groups and their forwards are a function of the input alone
(never of what a resumed run still has to do), so a resumed or sharded run computes every trace
in the same forward as an uninterrupted single-process run: the stored bits are the same.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np
import torch

from cache import SiteArray
from hooks import run_residual_hf
from probes.measures.capture import BATCH_TOKENS as BATCH_TOKENS
from probes.measures.capture.activations import TraceArrays, hook_sites, selection, to_numpy

if TYPE_CHECKING:
    from hooks.model import LoadedModel
    from probes.traces.tokenize import TokenizedTrace


GROUP_FORWARDS = 4
"""A group (one commit) holds up to this many forwards' worth of tokens."""


@runtime_checkable
class BatchSettings(Protocol):
    """What `capture_batch` reads from a run's settings (`probes.pipeline.capture.CacheConfig`)."""

    positions: str
    dtype: str
    batch_tokens: int


def row_bytes(site_map: Mapping[str, tuple[int, ...] | None], d_model: int, dtype: str) -> int:
    """Stored bytes of one token row over every component (every fast-path site is d_model wide)."""
    itemsize = 4 if dtype == "float32" else 2
    return sum(1 if layers is None else len(layers) for layers in site_map.values()) * (
        d_model * itemsize)


def plan_batches(
    tts: Sequence[TokenizedTrace],
    *,
    positions: str,
    batch_tokens: int,
    max_tokens: int,
    bytes_per_row: int,
    max_bytes: int | float,
) -> list[list[int]]:
    """Cut traces (in input order) into groups of consecutive ones, each committed together.

    A trace joins the current group while the group's run tokens stay within `GROUP_FORWARDS *
    batch_tokens` and its stored rows within `max_bytes`; a trace longer than `max_tokens` (the
    prefill chunk: it needs the KV-cache path) or than `batch_tokens` is a group of its own.

    Args:
        tts: The traces.
        positions: The row selection ("trajectory" or "all").
        batch_tokens: Padded tokens per forward; below 2 every trace is its own group.
        max_tokens: Longest run length a batched trace may have.
        bytes_per_row: Stored bytes per selected token (`row_bytes`).
        max_bytes: Stored bytes a group may hold in RAM.

    Returns:
        Lists of indices into `tts`, covering each once, in order.
    """
    groups: list[list[int]] = []
    current: list[int] = []
    tokens = rows = 0
    limit = min(max_tokens, batch_tokens)
    for i, tt in enumerate(tts):
        first, end = selection(tt, positions)
        alone = end > limit
        fits = (current and not alone and tokens + end <= GROUP_FORWARDS * batch_tokens
                and (rows + end - first) * bytes_per_row <= max_bytes)
        if not fits and current:
            groups.append(current)
            current, tokens, rows = [], 0, 0
        current.append(i)
        tokens, rows = tokens + end, rows + end - first
        if alone:
            groups.append(current)
            current, tokens, rows = [], 0, 0
    if current:
        groups.append(current)
    return groups


def forwards(ends: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """The forwards of one group: its traces sorted by run length (stable), cut so that each
    padded forward (traces x longest) stays within `batch_tokens` (a longer trace runs alone).

    Args:
        ends: Run length of each trace of the group.
        batch_tokens: Padded tokens per forward.

    Returns:
        Lists of indices into `ends`.
    """
    out: list[list[int]] = []
    current: list[int] = []
    for i in sorted(range(len(ends)), key=lambda k: ends[k]):
        if current and (len(current) + 1) * ends[i] > batch_tokens:
            out.append(current)
            current = []
        current.append(i)
    if current:
        out.append(current)
    return out


def capture_batch(
    loaded: LoadedModel,
    tts: Sequence[TokenizedTrace],
    site_map: Mapping[str, tuple[int, ...] | None],
    cfg: BatchSettings,
) -> list[TraceArrays]:
    """Capture a group of traces in a few right-padded forwards of the HF fast path.

    Args:
        loaded: The model.
        tts: The traces of one group (`plan_batches`).
        site_map: From `probes.measures.capture.activations.resolve_cache_sites` (fast-path components).
        cfg: The run's settings (positions, storage dtype, batch_tokens).

    Returns:
        One `TraceArrays` per trace in the order given, in RAM, as `capture_trace` gives for it
        alone (up to float rounding).
    """
    spans = [selection(tt, cfg.positions) for tt in tts]
    out: list[TraceArrays | None] = [None] * len(tts)
    for part in forwards([end for _, end in spans], cfg.batch_tokens):
        for i, arrays in zip(part, _one_forward(loaded, [tts[i] for i in part],
                                                [spans[i] for i in part], site_map, cfg),
                             strict=True):
            out[i] = arrays
    return [arrays for arrays in out if arrays is not None]


def _one_forward(
    loaded: LoadedModel,
    tts: Sequence[TokenizedTrace],
    spans: Sequence[tuple[int, int]],
    site_map: Mapping[str, tuple[int, ...] | None],
    cfg: BatchSettings,
) -> list[TraceArrays]:
    """One right-padded forward `[len(tts), longest]`, split back per trace."""

    longest = max(end for _, end in spans)
    ids = torch.empty((len(tts), longest), dtype=torch.long)
    for b, (tt, (_, end)) in enumerate(zip(tts, spans, strict=True)):
        row = torch.as_tensor(tt.ids[:end], dtype=torch.long)
        ids[b, :end] = row
        ids[b, end:] = row[-1]  # padding: any valid token (never seen by the real ones)
    flat = np.concatenate([b * longest + np.arange(first, end) for b, (first, end)
                           in enumerate(spans)])
    part = run_residual_hf(loaded, ids, hook_sites(site_map), positions=torch.as_tensor(flat),
                           dtype=cfg.dtype, device=None).by_name()
    arrays = {comp: to_numpy(part[comp] if layers is None else
                             torch.stack([part[f"L{layer}.{comp}"] for layer in layers], dim=1),
                             cfg.dtype)
              for comp, layers in site_map.items()}  # [rows, n_layers, d] or [rows, d]
    bad = _nonfinite_rows(arrays.values(), cfg.dtype, len(flat))
    out = []
    cursor = 0
    for (first, end) in spans:
        window = slice(cursor, cursor + end - first)
        cursor = window.stop
        out.append(TraceArrays(
            positions=np.arange(first, end, dtype=np.int64),
            sites={comp: SiteArray(arrays[comp][window],
                                   dtype="bfloat16" if cfg.dtype == "bfloat16" else None,
                                   layers=None if layers is None else list(layers))
                   for comp, layers in site_map.items()},
            n_nonfinite=int(bad[window].sum()),
            n_tokens=end,
        ))
    return out


_EXPONENT_BITS = {"float16": 0x7C00, "bfloat16": 0x7F80}
"""The exponent field of the 16-bit storage dtypes: all ones means inf or NaN."""


def _nonfinite_rows(arrays: Iterable[np.ndarray], dtype: str, n_rows: int) -> np.ndarray:
    """Per row, how many stored values are inf/NaN (16-bit storage overflows; float32: none).

    Read from the bits (exponent all ones): cheaper than `isfinite` on float16 on a CPU.
    """
    bad = np.zeros(n_rows, dtype=np.int64)
    mask = _EXPONENT_BITS.get(dtype)
    if mask is None:
        return bad
    for a in arrays:
        bits = a.view(np.uint16).reshape(n_rows, -1)
        bad += np.count_nonzero((bits & mask) == mask, axis=1)
    return bad
