"""Sentences as units: split a trajectory into chunks, map them to tokens, label and aggregate.

Splitting rules (`split_text`, character level; docs/methods.md#chunks):

1. Math is atomic: nothing inside `$$…$$`, `$…$`, `\\[…\\]` or `\\(…\\)` is ever a boundary.
2. `<think>` and `</think>` are chunks of their own (a boundary before and after each).
3. Every line break ends a chunk (so a blank-line paragraph break does too, and so does each line
   of a list of equations).
4. A sentence end `.`, `!` or `?` (optionally followed by closing `)`, `]`, `"`, `'` or `*`) ends a
   chunk when whitespace or the end of the text follows, except after an enumeration number or
   letter at the start of a line (`1.`, `a.`) and after the abbreviations in `ABBREVIATIONS`.
5. A boundary sits right after the punctuation, so the whitespace that follows opens the next
   chunk; a chunk that holds only whitespace is merged into the next one (into the previous one
   at the end of the text).

Tokens (`token_chunks`): trajectory token k belongs to the chunk holding its first character
(its start offset); chunks that receive no token are dropped. The result, `chunk_spans` [C, 2]
(half-open, trajectory token coordinates: index i = trajectory token i), covers every trajectory
token exactly once.

Labels (`chunk_labels`): a chunk that opens with a lexicon phrase (its first non-space
character starts a phrase occurrence) takes that phrase's category (reflection / delimiter); every
other chunk is ordinary. Codes are `probes.traces.categories.CATEGORY_CODES`.

Aggregation (`aggregate`, `AGGREGATION`): every per-token array with a trailing T axis, reduced to
chunks by the sum or the mean stated per array.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from probes import arrays
from probes.errors import ProbesError
from probes.traces.categories import CATEGORY_CODES

if TYPE_CHECKING:
    from probes.traces.categories import TokenCategories
    from probes.traces.tokenize import TokenizedTrace

ABBREVIATIONS = ("e.g", "i.e", "etc", "vs", "cf", "Dr", "Mr", "Mrs", "Ms", "St", "Fig", "Eq", "No")
"""Words after which a period does not end a sentence."""

_MATH = re.compile(r"\$\$.*?\$\$|\$(?:[^$\n]|\n(?!\s*\n))*?\$|\\\[.*?\\\]|\\\(.*?\\\)", re.S)
_TAG = re.compile(r"</?think>")
_SENTENCE_END = re.compile(r"[.!?][)\]\"'*]*(?=\s|$)")
_ENUMERATION = re.compile(r"(?:^|\n)[ \t]*(?:\d+|[A-Za-z])$")
_ABBREV = re.compile(r"(?:^|[\s(])(?:" + "|".join(re.escape(a) for a in ABBREVIATIONS) + r")$")


def _math_regions(text: str) -> list[tuple[int, int]]:
    return [(m.start(), m.end()) for m in _MATH.finditer(text)]


def split_text(text: str) -> list[tuple[int, int]]:
    """Character ranges `[start, end)` of the chunks of `text` (rules in the module docstring).

    The ranges are contiguous and cover `text` (an empty text gives no chunk).
    """
    if not text:
        return []
    regions = _math_regions(text)
    inside = np.zeros(len(text) + 1, dtype=bool)
    for a, b in regions:
        inside[a + 1:b] = True  # a boundary may sit at a region's edges, never inside

    cuts: set[int] = set()
    for m in _TAG.finditer(text):
        cuts.update((m.start(), m.end()))
    for m in re.finditer(r"\n", text):
        cuts.add(m.start())
    for m in _SENTENCE_END.finditer(text):
        before = text[:m.start()]
        if text[m.start()] == "." and (_ENUMERATION.search(before) or _ABBREV.search(before)):
            continue
        cuts.add(m.end())
    cuts = {c for c in cuts if 0 < c < len(text) and not inside[c]}
    # A cut at a newline would leave a chunk ending just before "\n"; the newline run starts
    # the next chunk (rule 5), which is what cutting at its start does.
    edges = [0, *sorted(cuts), len(text)]
    ranges = [(a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a]
    return _merge_blank(text, ranges)


def _merge_blank(text: str, ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Merge whitespace-only ranges into the next range (the previous one at the end)."""
    out: list[list[int]] = []
    pending: int | None = None
    for a, b in ranges:
        if not text[a:b].strip():
            pending = a if pending is None else pending
            continue
        out.append([pending if pending is not None else a, b])
        pending = None
    if pending is not None:
        if out:
            out[-1][1] = len(text)
        else:
            out.append([pending, len(text)])
    return [(a, b) for a, b in out]


@dataclass(frozen=True)
class Chunks:
    """The chunks of one tokenized trace.

    Attributes:
        spans: int32 [C, 2] half-open trajectory-token ranges (index i = trajectory token i).
        chars: int64 [C, 2] the character range of each chunk in `trajectory_text` (from its
            first token's start to the next chunk's first token's start).
        texts: The text of each chunk.
    """

    spans: np.ndarray
    chars: np.ndarray
    texts: list[str]

    def __len__(self) -> int:
        return int(self.spans.shape[0])

    def chunk_of_token(self) -> np.ndarray:
        """int32 [T]: the chunk index of each trajectory token."""
        lengths = self.spans[:, 1] - self.spans[:, 0]
        return np.repeat(np.arange(len(self), dtype=np.int32), lengths)


def token_chunks(tt: TokenizedTrace) -> Chunks:
    """Split the trajectory of `tt` into chunks and map them to its tokens.

    Raises:
        ProbesError: A trace with an empty trajectory.
    """
    text = tt.trajectory_text
    starts = np.asarray(tt.trajectory_offsets, dtype=np.int64).reshape(-1, 2)[:, 0]
    n = starts.shape[0]
    if n == 0:
        raise ProbesError(f"trace {tt.trace.id!r} has an empty trajectory; it has no chunks")
    ranges = split_text(text)
    bounds = np.asarray([a for a, _ in ranges] + [len(text) + 1], dtype=np.int64)
    # chunk of each token: the last chunk whose start <= the token's start offset
    which = np.clip(np.searchsorted(bounds, starts, side="right") - 1, 0, len(ranges) - 1)
    which = np.maximum.accumulate(which)  # offsets of byte pieces may step back; keep order
    firsts = np.flatnonzero(np.r_[True, which[1:] != which[:-1]])
    ends = np.r_[firsts[1:], n]
    spans = np.stack([firsts, ends], axis=1).astype(np.int32)
    c0 = starts[firsts].copy()
    c0[0] = 0
    chars = np.stack([c0, np.r_[c0[1:], len(text)]], axis=1)
    texts = [text[a:b] for a, b in chars.tolist()]
    return Chunks(spans=spans, chars=chars, texts=texts)


def chunk_labels(tt: TokenizedTrace, chunks: Chunks, cats: TokenCategories) -> np.ndarray:
    """uint8 [C]: the category code of each chunk (the phrase it opens with, else ordinary)."""
    text = tt.trajectory_text
    opening = {m.char_start: m.category for m in cats.matches}
    out = np.full(len(chunks), CATEGORY_CODES["ordinary"], dtype=np.uint8)
    for c, (a, b) in enumerate(chunks.chars.tolist()):
        piece = text[a:b]
        lead = len(piece) - len(piece.lstrip())
        first = a + lead
        # markdown emphasis or list markers before the phrase ("**Wait**", "- But") still open it
        while first < b and text[first] in "*_-#>":
            first += 1
        while first < b and text[first].isspace():
            first += 1
        category = opening.get(first) or opening.get(a + lead)
        if category is not None:
            out[c] = CATEGORY_CODES[category]
    return out


# --------------------------------------------------------------------------------------------------
# Aggregation of per-token arrays to chunks

SUM, MEAN = "sum", "mean"

AGGREGATION: dict[str, str] = {
    # L̂ changes add up along the trajectory: the chunk's ΔL̂ is L̂ after it minus L̂ before it.
    "lhat_delta": SUM,
    "lhat_log_ratio": SUM,
    "lhat_rho": MEAN,
    # attention mass of a chunk = the mass on all its tokens
    "upd_mass": SUM,
    # norms of per-token vectors and step sizes: the typical token of the chunk
    "upd_contrib": MEAN,
    "upd_loo": MEAN,
    "upd_dai_fro": MEAN,
    "upd_sigma_gate": MEAN,
    "upd_sigma_up": MEAN,
    # cosines: mean
    "upd_cos_gate": MEAN,
    "upd_align_cos": MEAN,
    # first-order loss changes are linear in the removed contributions: they add up
    "upd_dl_pred": SUM,
    "upd_m7": SUM,
    "paragraph_start": SUM,
}
"""How each per-token array (trailing axis T) is reduced to chunks: "sum" or "mean" (NaN-aware:
NaN tokens are left out; a chunk with none is NaN)."""


def per_token_arrays() -> tuple[str, ...]:
    """Names of the registered arrays with a trailing T axis (the ones `aggregate` reduces)."""
    return tuple(a.name for a in arrays.REGISTRY if a.axes.replace(" ", "").endswith("T]"))


def aggregate(values: np.ndarray, spans: np.ndarray, how: str) -> np.ndarray:
    """Reduce the trailing T axis of `values` to chunks.

    Args:
        values: [..., T] per-token values.
        spans: int [C, 2] chunk token spans covering 0..T.
        how: "sum" or "mean" (NaN-aware).

    Returns:
        float64 [..., C].
    """
    if how not in (SUM, MEAN):
        raise ProbesError(f"aggregation must be 'sum' or 'mean', got {how!r}")
    x = np.asarray(values, dtype=np.float64)
    spans = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
    if spans.size and (spans[0, 0] != 0 or spans[-1, 1] != x.shape[-1]):
        raise ProbesError(f"chunk spans cover tokens {spans[0, 0]}..{spans[-1, 1]}, but the array "
                          f"has {x.shape[-1]} tokens; use the chunks of the same trace")
    finite = ~np.isnan(x)
    csum = np.concatenate([np.zeros(x.shape[:-1] + (1,)), np.cumsum(np.where(finite, x, 0.0), -1)],
                          axis=-1)
    ccount = np.concatenate([np.zeros(x.shape[:-1] + (1,)), np.cumsum(finite, -1)], axis=-1)
    total = csum[..., spans[:, 1]] - csum[..., spans[:, 0]]
    count = ccount[..., spans[:, 1]] - ccount[..., spans[:, 0]]
    with np.errstate(invalid="ignore", divide="ignore"):
        out = total if how == SUM else total / count
    return np.where(count > 0, out, np.nan)


def aggregate_arrays(stored: Mapping[str, np.ndarray], spans: np.ndarray) -> dict[str, np.ndarray]:
    """Every per-token array of a trace reduced to chunks by its `AGGREGATION` rule.

    Arrays without a trailing T axis are skipped.

    Raises:
        ProbesError: A registered per-token array with no stated rule (state it in AGGREGATION).
    """
    per_token = set(per_token_arrays())
    out = {}
    for name, values in stored.items():
        if name not in per_token:
            continue
        how = AGGREGATION.get(name)
        if how is None:
            raise ProbesError(f"per-token array {name!r} has no chunk aggregation rule; add it "
                              f"to probes.traces.chunks.AGGREGATION ('sum' or 'mean')")
        out[name] = aggregate(values, spans, how)
    return out
