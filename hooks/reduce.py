"""In-hook reductions: position selection, per-token norms and storage casts (pure tensor code).

`resolve_positions` turns a user's position choice ("all", a span name, a slice, explicit indices)
into a `PositionSelector` over *global* token indices; `selector.local(start, n)` gives the rows of
one forward chunk. `extract` drops the batch axis and keeps only those rows, `finish` applies the
reduction and moves the result off the device (cast first, then copy). Nothing here holds a model.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import torch
from jaxtyping import Float, Int, Shaped
from torch import Tensor

from hooks.errors import HooksError
from hooks.model import resolve_device, resolve_dtype
from hooks.sites import HookSite, Layout

__all__ = [
    "CaptureError",
    "PositionSelector",
    "PositionSpec",
    "Reduce",
    "extract",
    "finish",
    "resolve_positions",
]


class CaptureError(HooksError, ValueError):
    """A capture request that cannot be met (bad positions, batch size, reduction)."""


Reduce = Literal["none", "norm"]
"""In-hook reduction: keep the activation ("none") or only its L2 norm over the last axis."""
REDUCTIONS: tuple[str, ...] = get_args(Reduce)

PositionSpec = str | slice | Sequence[int] | np.ndarray | Tensor
"""'all', a span name, a slice of global token indices, or increasing global indices."""


@dataclass(frozen=True)
class PositionSelector:
    """Which global token positions to keep: a range (`start:stop:step`) or explicit indices.

    Attributes:
        label: How the selection was asked for (recorded with the captured data).
        start: First position of a range selection.
        stop: End (exclusive) of a range selection; None = up to the last token.
        step: Stride of a range selection (>= 1).
        indices: int64 [n_sel] strictly increasing global indices; None for a range.
    """

    label: str
    start: int = 0
    stop: int | None = None
    step: int = 1
    indices: Int[Tensor, " n_sel"] | None = None

    def local(self, chunk_start: int, chunk_len: int) -> slice | Int[Tensor, " n_sel"]:
        """Rows of a chunk holding global positions `[chunk_start, chunk_start + chunk_len)`.

        Returns:
            A slice (range selections; cheap, no copy) or int64 local indices (explicit ones).
        """
        chunk_end = chunk_start + chunk_len
        if self.indices is not None:
            idx = self.indices
            return idx[(idx >= chunk_start) & (idx < chunk_end)] - chunk_start
        first = max(self.start, chunk_start)
        first += (-(first - self.start)) % self.step  # next position on the stride
        end = chunk_end if self.stop is None else min(self.stop, chunk_end)
        if first >= end:
            return slice(0, 0)
        return slice(first - chunk_start, end - chunk_start, self.step)

    def global_positions(self, chunk_start: int, chunk_len: int) -> Int[Tensor, " n_sel"]:
        """Global indices of the rows `local(chunk_start, chunk_len)` selects (int64, CPU)."""
        rows = self.local(chunk_start, chunk_len)
        if isinstance(rows, slice):
            return torch.arange(chunk_len, dtype=torch.int64)[rows] + chunk_start
        return rows + chunk_start


def resolve_positions(
    positions: PositionSpec, spans: Mapping[str, tuple[int, int]] | None = None
) -> PositionSelector:
    """Resolve a position choice into global token indices.

    Args:
        positions: "all"; a span name looked up in `spans`; a `slice` of global indices (start,
            stop >= 0, step >= 1; stop None = open-ended); or a 1-D sequence/array/tensor of
            strictly increasing global indices >= 0.
        spans: Named half-open `(start, end)` token ranges, e.g. `TokenizedTrace.spans`.

    Returns:
        The selector.

    Raises:
        CaptureError: For an unknown span, a negative or decreasing index, or a bad slice.
    """
    if isinstance(positions, str):
        if positions == "all":
            return PositionSelector("all")
        if not spans or positions not in spans:
            raise CaptureError(
                f"Unknown position selection {positions!r}: use 'all', a slice, explicit indices, "
                f"or a span name from spans={sorted(spans or {})} (pass spans=trace.spans)."
            )
        start, end = (int(v) for v in spans[positions])
        if not 0 <= start <= end:
            raise CaptureError(
                f"Span {positions!r}={spans[positions]!r} is not a (start, end) range."
            )
        return PositionSelector(f"span:{positions}", start, end, 1)
    if isinstance(positions, slice):
        start = 0 if positions.start is None else int(positions.start)
        step = 1 if positions.step is None else int(positions.step)
        stop = None if positions.stop is None else int(positions.stop)
        if start < 0 or (stop is not None and stop < 0) or step < 1:
            raise CaptureError(
                f"Position slice {positions!r} must use global indices: start, stop >= 0 and "
                "step >= 1 (negative indices are not defined when the length is not yet known)."
            )
        return PositionSelector(f"slice({start},{stop},{step})", start, stop, step)
    idx = torch.as_tensor(np.asarray(positions) if not isinstance(positions, Tensor) else positions)
    if idx.ndim != 1 or idx.dtype.is_floating_point or idx.dtype == torch.bool:
        raise CaptureError(
            f"Explicit positions must be a 1-D integer array, got dtype {idx.dtype} and shape "
            f"{tuple(idx.shape)}; use 'all', a span name or a slice otherwise."
        )
    idx = idx.to(device="cpu", dtype=torch.int64)
    if idx.numel() and (idx[0] < 0 or bool((idx[1:] <= idx[:-1]).any())):
        raise CaptureError(
            "Explicit positions must be strictly increasing global indices >= 0 "
            f"(sort and deduplicate them), got {idx.tolist()[:20]}."
        )
    return PositionSelector(f"indices[{idx.numel()}]", indices=idx)


def extract(
    act: Shaped[Tensor, "1 ..."], layout: Layout, rows: slice | Int[Tensor, " n_sel"]
) -> Shaped[Tensor, "n_sel ..."] | Shaped[Tensor, "head n_sel key"]:
    """Drop the batch axis of a hooked activation and keep only the selected positions.

    Args:
        act: The activation as the hook sees it, batch first (batch must be 1).
        layout: Its axes after the batch axis (`SiteSpec.layout`).
        rows: Local positions within this chunk (query rows for attention patterns).

    Returns:
        `[n_sel, d]` ("pos d"), `[n_sel, head, d_head]` (both head layouts), `[head, n_sel, key]`
        ("head pos key"), or `[n_sel]` ("pos 1"). May be a view of `act`.
    """
    if not isinstance(rows, slice):
        rows = rows.to(act.device)
    x = act[0]
    if layout == "pos d":
        return x[rows]  # [n_sel, d]
    if layout == "pos head d_head":
        return x[rows]  # [n_sel, head, d_head]
    if layout == "head pos d_head":
        return x[:, rows].transpose(0, 1)  # [head, n_sel, d_head] -> [n_sel, head, d_head]
    if layout == "head pos key":
        return x[:, rows]  # [head, n_sel, key]
    if layout == "pos 1":
        return x[rows, 0]  # [n_sel]
    raise AssertionError(f"unhandled layout {layout!r}")  # table and code out of sync


def finish(
    x: Shaped[Tensor, "*lead last"],
    *,
    source: Shaped[Tensor, "1 ..."],
    reduce: Reduce,
    dtype: torch.dtype | None,
    device: torch.device | None,
) -> Shaped[Tensor, "*lead last"] | Float[Tensor, "*lead"]:
    """Reduce, cast on the source device, then copy to the storage device.

    The result never shares memory with `source`, so a kept row of a large activation does not keep
    the whole activation alive, and a later in-place change of it cannot alter what was captured.

    Args:
        x: The selected rows (from `extract`), possibly a view of `source`.
        source: The hooked activation `x` came from.
        reduce: "none", or "norm" for the fp32 L2 norm over the last axis (`[pos, d]` -> `[pos]`,
            `[pos, head, d_head]` -> `[pos, head]`; `[pos]` -> `|x|`).
        dtype: Storage dtype; None keeps the activation's (norms default to float32).
        device: Storage device; None keeps the activation's.

    Returns:
        The stored tensor.
    """
    if reduce == "norm":  # a per-token scalar (ln scale, [n_sel]) is its own norm: |x|
        x = torch.linalg.vector_norm(x.float(), dim=-1) if x.ndim > 1 else x.float().abs()
    out = x.detach().to(dtype=dtype) if dtype is not None else x.detach()
    out = out.to(device=device) if device is not None else out
    if out.untyped_storage().data_ptr() == source.untyped_storage().data_ptr():
        out = out.clone(memory_format=torch.contiguous_format)
    return out


def delta_rows(
    pre: Float[Tensor, "n_sel d_model"], post: Float[Tensor, "n_sel d_model"]
) -> Float[Tensor, "n_sel d_model"]:
    """What a block writes at each kept position, `post - pre`, computed in float32."""
    return post.float() - pre.float()


def resolve_storage(
    reduce: str, dtype: str | torch.dtype | None, device: str | torch.device | None
) -> tuple[torch.dtype | None, torch.device | None]:
    """Validate the reduction and resolve the storage dtype and device.

    Raises:
        CaptureError: For an unknown reduction.
        HooksError: For an unsupported dtype or an unknown/unavailable device.
    """
    if reduce not in REDUCTIONS:
        raise CaptureError(f"Unknown reduce={reduce!r}; use one of {list(REDUCTIONS)}.")
    resolved = None if dtype is None else resolve_dtype(dtype)
    if reduce == "norm" and resolved is None:
        resolved = torch.float32
    return resolved, None if device is None else resolve_device(device)


def check_reducible(sites: Sequence[HookSite], reduce: str) -> None:
    """Refuse reductions that are undefined for a site (norms of attention patterns).

    Raises:
        CaptureError: If `reduce="norm"` is asked for an attention score/pattern site.
    """
    if reduce == "norm":
        bad = [str(s) for s in sites if s.spec.layout == "head pos key"]
        if bad:
            raise CaptureError(
                f"reduce='norm' is not defined for attention scores/patterns {bad}; capture them "
                "with reduce='none' (only the selected query rows are kept) in a separate capture."
            )
