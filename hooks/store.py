"""Where captured activations accumulate: `CaptureStore` (filled by hooks) and `Captured`.

A store takes every forward pass as the next chunk of one sequence and gives its tokens global
positions; each site's reduced rows are kept per chunk and concatenated on read (attention patterns
padded along keys). `drain()` hands over what has accumulated so far, to stream long sequences.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int, Shaped
from torch import Tensor

from hooks.reduce import CaptureError, PositionSelector, Reduce, delta_rows, extract, finish
from hooks.sites import HookSite, UnknownSiteError, as_site

__all__ = ["CHUNK_HOOK", "CaptureStore", "Captured"]

CHUNK_HOOK = "hook_embed"
"""Bridge hook that starts a chunk: it fires first in every forward, once, with [1, n_new, d]."""


@dataclass(frozen=True)
class Captured:
    """Activations captured over one or more forward chunks of one sequence.

    Attributes:
        positions: int64 [n_sel] global token index of each captured row (query row for patterns).
        tensors: Site -> tensor: `[n_sel, d]`, `[n_sel, head, d_head]` (k/v/rot_k keep n_kv_heads),
            `[head, n_sel, key]` for scores/patterns (key axis zero-padded, or finfo.min for scores,
            to the longest chunk), `[n_sel]` for ln scales; norms drop the last axis.
        selection: How positions were chosen (e.g. "all", "span:trajectory").
        reduce: "none" or "norm".
    """

    positions: Int[Tensor, " n_sel"]
    tensors: dict[HookSite, Tensor]
    selection: str
    reduce: str

    def __getitem__(self, site: HookSite | str) -> Tensor:
        site = as_site(site)
        if site not in self.tensors:
            raise UnknownSiteError(
                f"Site {str(site)!r} was not captured; captured sites: "
                f"{[str(s) for s in self.tensors]}."
            )
        return self.tensors[site]

    def by_name(self) -> dict[str, Tensor]:
        """The tensors keyed by canonical site string (for HDF5 keys)."""
        return {str(site): t for site, t in self.tensors.items()}


@dataclass
class _Chunk:
    start: int
    length: int
    rows: slice | Tensor
    positions: Tensor
    pieces: dict[HookSite, Tensor] = field(default_factory=dict)


class CaptureStore:
    """Accumulates reduced activations, chunk by chunk, with global token positions.

    Every forward pass inside the capture is taken as the next chunk of one sequence: its tokens get
    the global positions `next_position, next_position + 1, ...` (the first chunk starts at the
    `position_offset` given to `capture`). Start a new capture for a new sequence.
    """

    def __init__(
        self,
        sites: Sequence[HookSite],
        selector: PositionSelector,
        *,
        reduce: Reduce,
        dtype: torch.dtype | None,
        device: torch.device | None,
        position_offset: int,
    ) -> None:
        """Create an empty store (use `capture` / `run_residual_hf` rather than this directly)."""
        if (
            isinstance(position_offset, bool)
            or not isinstance(position_offset, int)
            or position_offset < 0
        ):
            raise CaptureError(f"position_offset must be an int >= 0, got {position_offset!r}.")
        self.sites: tuple[HookSite, ...] = tuple(sites)
        self.selector = selector
        self.reduce = reduce
        self.dtype = dtype
        self.device = device
        self._next = position_offset
        self._chunks: list[_Chunk] = []
        self._pending_pre: dict[HookSite, Tensor] = {}

    @property
    def next_position(self) -> int:
        """Global position the next forward chunk starts at."""
        return self._next

    @property
    def positions(self) -> Int[Tensor, " n_sel"]:
        """Global token index of every captured row so far (int64)."""
        return torch.cat([c.positions for c in self._chunks] or [torch.zeros(0, dtype=torch.int64)])

    def __getitem__(self, site: HookSite | str) -> Tensor:
        site = as_site(site)
        if site not in self.sites:
            raise UnknownSiteError(
                f"Site {str(site)!r} is not being captured; sites: {[str(s) for s in self.sites]}."
            )
        return self._assemble(site, self._chunks)

    def result(self) -> Captured:
        """Everything captured so far, concatenated along positions."""
        return Captured(
            positions=self.positions,
            tensors={site: self._assemble(site, self._chunks) for site in self.sites},
            selection=self.selector.label,
            reduce=self.reduce,
        )

    def drain(self) -> Captured:
        """Like `result()`, then forget it (stream long sequences chunk by chunk)."""
        out = self.result()
        self._chunks.clear()
        return out

    # -- called from hooks ------------------------------------------------------------------

    def begin_chunk(self, n_tokens: int) -> None:
        """Start the next chunk of `n_tokens` new tokens at `next_position`."""
        start = self._next
        self._next += n_tokens
        rows = self.selector.local(start, n_tokens)
        positions = self.selector.global_positions(start, n_tokens)
        self._chunks.append(_Chunk(start, n_tokens, rows, positions))
        self._pending_pre.clear()

    def current_rows(self) -> slice | Int[Tensor, " n_sel"]:
        """Local rows to keep in the current chunk."""
        if not self._chunks:
            raise CaptureError(
                "A hook fired before any chunk began: the forward did not pass through the "
                f"embedding hook {CHUNK_HOOK!r} (start_at_layer is not supported by capture)."
            )
        return self._chunks[-1].rows

    def record(self, site: HookSite, act: Shaped[Tensor, "1 ..."]) -> None:
        """Reduce a hooked activation of `site` and store it for the current chunk."""
        rows = self.current_rows()
        x = extract(act, site.spec.layout, rows)
        self._chunks[-1].pieces[site] = finish(
            x, source=act, reduce=self.reduce, dtype=self.dtype, device=self.device
        )

    def record_pre(self, site: HookSite, resid_pre: Float[Tensor, "1 pos d_model"]) -> None:
        """Keep the selected rows of resid_pre (fp32, on device) until the layer's resid_post."""
        rows = self.current_rows()
        self._pending_pre[site] = extract(resid_pre, "pos d", rows).to(torch.float32, copy=True)

    def record_delta(self, site: HookSite, resid_post: Float[Tensor, "1 pos d_model"]) -> None:
        """Store `resid_post - resid_pre` (computed in fp32) for the selected rows."""
        rows = self.current_rows()
        pre = self._pending_pre.pop(site, None)
        if pre is None:
            raise CaptureError(f"resid_pre of {str(site)!r} did not fire before its resid_post.")
        delta = delta_rows(pre, extract(resid_post, "pos d", rows))
        dtype = self.dtype if self.dtype is not None else resid_post.dtype
        self._chunks[-1].pieces[site] = finish(
            delta, source=resid_post, reduce=self.reduce, dtype=dtype, device=self.device
        )

    # -- assembly ---------------------------------------------------------------------------

    def _assemble(self, site: HookSite, chunks: list[_Chunk]) -> Tensor:
        missing = [c.start for c in chunks if site not in c.pieces]
        if missing:
            raise CaptureError(
                f"Site {str(site)!r} did not fire in the chunk(s) starting at positions {missing}; "
                "the forward pass stopped early or raised. Start a new capture."
            )
        pieces = [c.pieces[site] for c in chunks]
        if site.spec.layout == "head pos key":
            return _cat_patterns(site, pieces)
        if not pieces:
            return torch.zeros(0)
        return torch.cat(pieces, dim=0)


def _cat_patterns(site: HookSite, pieces: list[Tensor]) -> Tensor:
    """Concatenate `[head, n_q, key_i]` pieces along queries, padding keys to the longest chunk.

    Keys beyond a chunk's cache are future tokens, masked for every query of that chunk: 0 after the
    softmax, finfo.min (the bridge's mask value) before it.
    """
    if not pieces:
        return torch.zeros(0, 0, 0)
    n_key = max(p.shape[-1] for p in pieces)
    fill = 0.0 if site.component == "attn.pattern" else torch.finfo(pieces[0].dtype).min
    padded = [F.pad(p, (0, n_key - p.shape[-1]), value=fill) for p in pieces]
    return torch.cat(padded, dim=1)  # [head, n_sel, key]
