"""The plain objects a report is built from (`Report`, `Section`, `Table`, `Plot`, `Collapsed`,
`TokenView`, `TokenKey`) and the token heat map's colours: `PALETTE`, `ColourScale`,
`colour_scale`, `token_scales`; and `fmt`, the number formatting of every table and legend.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from analyses.token_sets import DELIMITER, REFLECTION

PALETTE: tuple[str, ...] = (
    "#053061", "#2166ac", "#4393c3", "#92c5de", "#d1e5f0", "#f7f7f7",
    "#fddbc7", "#f4a582", "#d6604d", "#b2182b", "#67001f",
)
"""The 11 colour bins of the token heat map, most negative first (ColorBrewer RdBu, reversed):
bin 5 is the centre (0, or the median of a magnitude)."""

BIN_LETTERS = "abcdefghijk"
"""How the page stores a token's bin: one letter per token ("." = no value)."""

_DARK_BINS = frozenset({0, 1, 9, 10})
"""Bins dark enough for white text."""

_N_BINS = len(PALETTE)
_HALF = (_N_BINS - 1) // 2
_CLIP_QUANTILE = 0.98
"""Scales are clipped at this quantile of |value| (signed) or |log ratio| (magnitudes)."""

MARKERS: dict[int, tuple[str, str]] = {REFLECTION: ("reflection", "#d62728"),
                                       DELIMITER: ("delimiter", "#2ca02c")}
"""Token categories marked in the heat map (name, underline colour; the plots' tab:red/green)."""


def fmt(x: Any, spec: str = ".3g") -> str:
    """A number for a table: `spec` for floats, "n/a" for None/NaN, ints and text as they are."""
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    if isinstance(x, (float, np.floating)):
        return "n/a" if math.isnan(x) else format(float(x), spec)
    return str(x)


# --------------------------------------------------------------------------------------------------
# Page content


@dataclass(frozen=True)
class Table:
    """A table: a header and rows of cells.

    Attributes:
        columns: Header cells.
        rows: Rows; a cell is any value (`fmt` formats numbers) or a `(text, css_class)` pair
            (the class colours the cell in HTML, e.g. "more", "less", "ns").
        caption: Shown above the table.
        note: Shown below it.
    """

    columns: Sequence[str]
    rows: Sequence[Sequence[Any]]
    caption: str = ""
    note: str = ""


@dataclass(frozen=True)
class Plot:
    """A PNG plot, embedded as a data URI.

    Attributes:
        title: Caption.
        png: The PNG file's bytes.
        name: File name it was drawn to (shown small, for reference).
    """

    title: str
    png: bytes
    name: str = ""


@dataclass(frozen=True)
class Collapsed:
    """A table folded under a one-line summary (`<details>` in HTML and Markdown)."""

    summary: str
    table: Table


Block = str | Table | Plot | Collapsed
"""One block of a section: a paragraph, a table, a plot or a folded table."""


@dataclass(frozen=True)
class Section:
    """A titled part of the report.

    Attributes:
        id: Anchor (letters, digits, '-').
        title: Heading.
        blocks: Paragraphs, tables, plots and folded tables, in order.
        links: (text, href) pairs shown under the heading (the method notes).
        computed: False for an analysis the input does not hold (its blocks say how to run it).
    """

    id: str
    title: str
    blocks: Sequence[Block] = ()
    links: Sequence[tuple[str, str]] = ()
    computed: bool = True


@dataclass(frozen=True)
class TokenKey:
    """A per-token quantity the heat map can colour by.

    Attributes:
        key: Identifier in the page (e.g. "lhat_delta", "upd_m7@mean", "upd_m7@2").
        label: Menu text.
        units: Units and sign convention (legend).
        group: Menu group (e.g. "L̂", "upd_m7").
        hover: List this key's value in the hover card (per-layer keys are left out).
    """

    key: str
    label: str
    units: str = ""
    group: str = ""
    hover: bool = True


@dataclass(frozen=True)
class TokenView:
    """One trace's text with per-token values.

    Attributes:
        trace_id: The trace id.
        pieces: Text of every token of the trace [n_tokens] (token ids as text when no tokenizer).
        category: uint8 [n_tokens] category codes (`analyses.token_sets.CATEGORY_CODES`).
        phrase: Lexicon phrase of each token ("" for none) [n_tokens].
        traj_span: Half-open token range of the trajectory; values index its tokens.
        values: {key: float [T]}: per trajectory token (NaN = no value).
        note: Shown under the view (e.g. "token ids shown: tokenizer not available").
    """

    trace_id: str
    pieces: Sequence[str]
    category: np.ndarray
    phrase: Sequence[str]
    traj_span: tuple[int, int]
    values: Mapping[str, np.ndarray] = field(default_factory=dict)
    note: str = ""

    @property
    def n_trajectory(self) -> int:
        """Number of trajectory tokens T (the coloured tokens)."""
        return self.traj_span[1] - self.traj_span[0]


@dataclass(frozen=True)
class Report:
    """A whole report.

    Attributes:
        title: Page title and heading.
        subtitle: One line under the title (cache, time).
        identity: Tables describing the run (model, versions, counts).
        headline: Summary lines shown first.
        views: Token views.
        keys: The colourable keys, in menu order.
        default_key: The key coloured when the page opens (None: the first of `keys`).
        sections: The analysis sections.
        footer: Lines at the end (how to reproduce).
    """

    title: str
    subtitle: str = ""
    identity: Sequence[Table] = ()
    headline: Sequence[str] = ()
    views: Sequence[TokenView] = ()
    keys: Sequence[TokenKey] = ()
    default_key: str | None = None
    sections: Sequence[Section] = ()
    footer: Sequence[str] = ()


# --------------------------------------------------------------------------------------------------
# Colour scales


@dataclass(frozen=True)
class ColourScale:
    """How values of one key map to the 11 colour bins.

    Attributes:
        kind: "signed" (diverging at 0, ±`half`), "ratio" (log10(value / `centre`) in ±`half`;
            for magnitudes, zero and below fall in the lowest bin) or "empty" (no finite value).
        centre: The value drawn white (0 for signed; the median for ratio).
        half: Half-range: in value units (signed) or decades (ratio).
    """

    kind: str
    centre: float
    half: float

    def positions(self, values: np.ndarray) -> np.ndarray:
        """Values mapped to [-1, 1] (NaN where the value is NaN)."""
        v = np.asarray(values, dtype=np.float64)
        if self.kind == "empty":
            return np.full(v.shape, np.nan)
        with np.errstate(divide="ignore", invalid="ignore"):
            if self.kind == "signed":
                t = v / self.half
            else:
                t = np.where(v > 0, np.log10(np.where(v > 0, v, 1.0) / self.centre) / self.half, -1.0)
        t = np.where(np.isfinite(v), t, np.nan)
        return np.clip(t, -1.0, 1.0)

    def bins(self, values: np.ndarray) -> np.ndarray:
        """int [n] colour bins 0..10 (-1 where there is no value)."""
        t = self.positions(values)
        out = np.full(t.shape, -1, dtype=np.int64)
        ok = ~np.isnan(t)
        out[ok] = np.rint((t[ok] + 1.0) * _HALF).astype(np.int64)
        return out

    def ticks(self) -> tuple[str, str, str]:
        """Labels of the lowest, centre and highest bin."""
        if self.kind == "empty":
            return ("", "no values", "")
        if self.kind == "signed":
            return (f"≤ {fmt(-self.half)}", "0", f"≥ {fmt(self.half)}")
        lo, hi = self.centre * 10.0 ** -self.half, self.centre * 10.0 ** self.half
        return (f"≤ {fmt(lo)}", f"median {fmt(self.centre)}", f"≥ {fmt(hi)}")

    def describe(self) -> str:
        """One line on how the colours were chosen."""
        if self.kind == "signed":
            return ("diverging at 0; clipped at the 98th percentile of |value| over the shown "
                    "tokens")
        if self.kind == "ratio":
            return ("relative to the median of the shown tokens, log scale; clipped at the 98th "
                    "percentile of |log ratio|")
        return "no finite value in the shown tokens"


def colour_scale(values: Sequence[np.ndarray] | np.ndarray) -> ColourScale:
    """The scale of one key, from its values over every shown token.

    Signed when any finite value is negative (centre 0, half-range the 98th percentile of |x|);
    otherwise a magnitude: log ratio to the median of the positive values (half-range the 98th
    percentile of |log10(x / median)|). Degenerate ranges fall back to 1 (signed) or a factor 2.
    """
    parts = [np.asarray(v, dtype=np.float64).ravel() for v in
             (values if isinstance(values, (list, tuple)) else [values])]
    x = np.concatenate(parts) if parts else np.zeros(0)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return ColourScale("empty", 0.0, 1.0)
    positive = x[x > 0]
    if np.any(x < 0) or positive.size == 0:
        half = float(np.quantile(np.abs(x), _CLIP_QUANTILE)) or float(np.max(np.abs(x))) or 1.0
        return ColourScale("signed", 0.0, half)
    centre = float(np.median(positive))
    logs = np.abs(np.log10(positive / centre))
    half = float(np.quantile(logs, _CLIP_QUANTILE)) or float(np.max(logs)) or math.log10(2.0)
    return ColourScale("ratio", centre, half)


def token_scales(views: Sequence[TokenView], keys: Sequence[TokenKey]) -> dict[str, ColourScale]:
    """One scale per key, shared by every view (so the traces' colours compare)."""
    return {k.key: colour_scale([v.values[k.key] for v in views if k.key in v.values] or [np.zeros(0)])
            for k in keys}
