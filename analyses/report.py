"""Self-contained HTML and Markdown reports from plain data: tables, embedded PNG plots and token
heat maps.

No probes code and no model: the caller (`probes.commands.report`) turns a cache and a `compare`
report into the plain objects below, and this module renders them.

* `Report` holds the page: a title, the run identity, headline lines, the token views and the
  sections. A `Section` is a list of blocks: paragraphs (str), `Table`, `Plot` (PNG bytes, embedded
  as a base64 data URI) and `Collapsed` (a table folded under a summary line).
* `TokenView` is one trace's text with a value per trajectory token for each colourable key;
  `TokenKey` describes a key (label, units, layer). `token_scales` gives each key one
  `ColourScale` shared by every view: diverging at 0 for signed values, or around the median on a
  log scale for magnitudes; 11 colour bins (`PALETTE`, ColorBrewer RdBu reversed).
* `render_html(report)`: one HTML file: no network, no external scripts or fonts, a small inline
  script that switches the trace and the colouring key and shows a hover card (the page reads
  fine without it: the default key is coloured server-side and every trace is shown).
* `render_markdown(report)`: the same tables as Markdown (for notebooks and issues); plots and
  token views stay in the HTML.
* Table builders for `compare`'s JSON: `lhat_comparison_table`, `update_comparison_table`,
  `fit_table`, `trend_lines`.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from analyses.token_sets import DELIMITER, REFLECTION

__all__ = [
    "BIN_LETTERS",
    "PALETTE",
    "Collapsed",
    "ColourScale",
    "Plot",
    "Report",
    "Section",
    "Table",
    "TokenKey",
    "TokenView",
    "colour_scale",
    "fit_table",
    "fmt",
    "lhat_comparison_table",
    "render_html",
    "render_markdown",
    "token_scales",
    "trend_lines",
    "update_comparison_table",
]

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
    """

    id: str
    title: str
    blocks: Sequence[Block] = ()


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


# --------------------------------------------------------------------------------------------------
# Formatting and the builders for `compare`'s JSON


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


def _ci(value: Any, ci: Sequence[Any] | None) -> str:
    lo, hi = (ci or (None, None))[:2]
    return f"{fmt(value)} [{fmt(lo)}, {fmt(hi)}]"


def _effect_cell(effect: str | None) -> tuple[str, str]:
    text = effect or "n/a"
    return (text, {"more": "more", "less": "less"}.get(text, "ns"))


def lhat_comparison_table(table: Mapping[str, Any], *, caption: str = "") -> Table:
    """`compare`'s L̂ comparison (`report["table"]`) as a table with 95% CIs.

    Columns: comparison, traces, median a [CI], median b [CI], median difference [CI], Cliff's δ,
    Wilcoxon p, Holm p, and the verdict at Holm p < 0.05 with a CI excluding 0.
    """
    rows = []
    for r in table.get("rows", []):
        lo, hi = (r.get("ci_median_diff") or (None, None))[:2]
        p = r.get("p_holm")
        if p is None or lo is None or hi is None or (isinstance(p, float) and math.isnan(p)):
            verdict = "n/a"
        elif p < 0.05 and lo > 0:
            verdict = "more"
        elif p < 0.05 and hi < 0:
            verdict = "less"
        else:
            verdict = "n.s."
        rows.append([f"{r['a']} vs {r['b']}", fmt(r.get("n_traces")),
                     _ci(r.get("median_a"), r.get("ci_median_a")),
                     _ci(r.get("median_b"), r.get("ci_median_b")),
                     _ci(r.get("median_diff"), r.get("ci_median_diff")),
                     fmt(r.get("cliffs_delta"), ".2f"), fmt(r.get("wilcoxon_p"), ".2g"),
                     fmt(p, ".2g"), _effect_cell(verdict)])
    meta = table.get("meta", {})
    note = (f"per-trace {meta.get('statistic', 'mean')} of {meta.get('metric', '?')} "
            f"(unit: {meta.get('unit', '?')}); medians over traces with bootstrap 95% CIs; "
            "Wilcoxon signed-rank, Holm over every row")
    return Table(["comparison", "traces", "median a [95% CI]", "median b [95% CI]",
                  "difference [95% CI]", "Cliff's δ", "Wilcoxon p", "Holm p", "a vs b"],
                 rows, caption=caption, note=note)


def update_comparison_table(comparison: Mapping[str, Any], *, layers: str = "pooled",
                            caption: str = "") -> Table:
    """`compare`'s update comparison (`report["updates"]["comparison"]`) as a table.

    Args:
        comparison: `{"meta": ..., "rows": [...]}`.
        layers: "pooled" (the pooled rows only) or "all" (every layer, then pooled).
        caption: Table caption.

    Returns:
        Columns: metric, layer, comparison, traces, median a, median b, difference [CI], Cliff's δ,
        Holm p, effect, and with a control: its effect and whether it reproduces the effect.
    """
    rows_in = [r for r in comparison.get("rows", []) if layers == "all" or r.get("layer") == "pooled"]
    magnitude = set(comparison.get("meta", {}).get("signed_as_magnitude", []))
    has_control = any(r.get("control") is not None for r in rows_in)
    rows = []
    for r in rows_in:
        name = f"|{r['metric']}|" if r["metric"] in magnitude else r["metric"]
        row = [name, str(r.get("layer")), f"{r['a']} vs {r['b']}", fmt(r.get("n_traces")),
               fmt(r.get("median_a")), fmt(r.get("median_b")),
               _ci(r.get("median_diff"), r.get("ci_median_diff")),
               fmt(r.get("cliffs_delta"), ".2f"), fmt(r.get("p_holm"), ".2g"),
               _effect_cell(r.get("effect"))]
        if has_control:
            rep = r.get("reproduced_by_random_init")
            row += [_effect_cell(r.get("control_effect")),
                    "—" if rep is None else ("yes" if rep else "no")]
        rows.append(row)
    columns = ["metric", "layer", "comparison", "traces", "median a", "median b",
               "difference [95% CI]", "Cliff's δ", "Holm p", "effect"]
    if has_control:
        columns += ["random-init effect", "reproduced by random-init"]
    meta = comparison.get("meta", {})
    note = (f"per-trace {meta.get('statistic', 'mean')} over tokens (unit: {meta.get('unit', '?')})"
            f"; one Holm family of {meta.get('n_tests', len(comparison.get('rows', [])))} tests "
            f"({meta.get('holm_family', 'metrics x layers x pairs')}); |x|: signed values "
            "compared by magnitude")
    return Table(columns, rows, caption=caption, note=note)


def fit_table(fit: Mapping[str, Any], *, caption: str = "") -> Table:
    """`compare`'s behaviour fit (`report["fit"]`) as a table: one row per target (ΔL̂, |ΔL̂|).

    Columns: target, tokens, traces, out-of-fold R² with mechanism + categories [CI], mechanism
    only, random-init mechanism, partial R² of the categories [CI] and of the mechanism [CI].
    """
    rows = []
    for target, f in fit.get("fits", {}).items():
        r2, part, ci = f.get("r2", {}), f.get("partial_r2", {}), f.get("ci", {})
        rows.append([{"delta": "ΔL̂", "abs_delta": "|ΔL̂|"}.get(target, target),
                     fmt(f.get("n_tokens")), fmt(f.get("n_traces")),
                     _ci(r2.get("full"), ci.get("full")), fmt(r2.get("controls+mechanism")),
                     fmt(r2.get("controls+mechanism_random")),
                     _ci(part.get("categories"), ci.get("categories")),
                     _ci(part.get("mechanism"), ci.get("mechanism"))])
    return Table(["target", "tokens", "traces", "R² full [95% CI]", "R² mechanism only",
                  "R² random-init mechanism", "partial R² categories [95% CI]",
                  "partial R² mechanism [95% CI]"], rows, caption=caption,
                 note="ridge regression per token, out of fold (GroupKFold by trace); CIs resample "
                      "traces")


def trend_lines(trend: Mapping[str, Any]) -> list[str]:
    """Plain lines on whether L̂ falls along the trajectory (`report["trend"]`)."""
    lo, hi = (trend.get("share_falling_ci") or (None, None))[:2]
    change = _ci(trend.get("median_change"), trend.get("median_change_ci"))
    lines = [
        f"L̂ falls along the trajectory in {fmt(trend.get('share_falling'), '.0%')} of "
        f"{fmt(trend.get('n_traces'))} traces [95% CI {fmt(lo, '.0%')}, {fmt(hi, '.0%')}].",
        f"Median change from no trajectory to the full trajectory: {change} nats "
        f"(Wilcoxon p {fmt(trend.get('wilcoxon_p'), '.2g')}).",
    ]
    if "median_spearman" in trend:
        lines.append(f"Median Spearman correlation of L̂ with the position: "
                     f"{_ci(trend.get('median_spearman'), trend.get('median_spearman_ci'))}.")
    return lines


# --------------------------------------------------------------------------------------------------
# HTML

_CSS = """
:root{--fg:#1d2330;--muted:#5c6370;--line:#dde1e7;--bg:#fff;--panel:#f6f7f9;--accent:#2759a8}
*{box-sizing:border-box}[hidden]{display:none!important}
body{margin:0;font:14px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;
color:var(--fg);background:var(--bg)}
header{padding:18px 28px 10px;border-bottom:1px solid var(--line)}
header h1{margin:0;font-size:22px}
header .sub{color:var(--muted);font-size:13px}
nav{position:sticky;top:0;z-index:5;background:#fffffff0;border-bottom:1px solid var(--line);
padding:6px 28px;font-size:13px}
nav a{margin-right:14px;color:var(--accent);text-decoration:none}
main{padding:6px 28px 40px;max-width:1400px}
h2{font-size:18px;margin:26px 0 8px;padding-top:4px;border-top:1px solid var(--line)}
h3{font-size:15px;margin:16px 0 6px}
.headline{background:var(--panel);border:1px solid var(--line);border-radius:6px;padding:8px 14px;
margin:12px 0}
.headline p{margin:3px 0}.headline p.in{margin-left:22px}
.idgrid{display:flex;flex-wrap:wrap;gap:6px 18px;align-items:flex-start}
.idgrid table{max-width:700px}
table{border-collapse:collapse;margin:6px 0 4px;font-size:12.5px}
th,td{border:1px solid var(--line);padding:3px 7px;text-align:left;vertical-align:top}
td{white-space:nowrap}.idgrid td{white-space:normal}.tw{overflow-x:auto;max-width:100%}
th{background:var(--panel);font-weight:600}
td.num{text-align:right;font-variant-numeric:tabular-nums}
caption{caption-side:top;text-align:left;font-weight:600;padding:2px 0}
.note{color:var(--muted);font-size:12px;margin:0 0 10px}
td.more{background:#fde0dc}td.less{background:#dbe8f7}td.ns{color:var(--muted)}
figure{display:inline-block;margin:8px 14px 8px 0;vertical-align:top;max-width:100%}
figure img{max-width:min(100%,620px);height:auto;border:1px solid var(--line)}
figcaption{font-size:12px;color:var(--muted)}
details{margin:6px 0}summary{cursor:pointer;color:var(--accent)}
.controls{display:flex;flex-wrap:wrap;gap:14px;align-items:center;margin:8px 0}
.controls label{font-size:13px}
.legend{display:flex;align-items:center;gap:10px;flex-wrap:wrap;font-size:12px;margin:4px 0 8px}
.swatches{display:inline-flex}.swatches span{width:18px;height:14px;display:inline-block}
.mk{display:inline-block;width:18px;height:0;border-bottom:3px solid;vertical-align:middle}
.view{border:1px solid var(--line);border-radius:6px;padding:8px 12px;margin:8px 0 14px}
.view h3{margin:2px 0 6px}
.tokens{font:13px/1.9 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;white-space:pre-wrap;
word-break:break-word}
.ctx{color:#8a919c}
.t{border-radius:2px;padding:1px 0;cursor:default}
.t.dark{color:#fff}
.t.nan{outline:1px dotted #b0b6bf}
.t.c1{box-shadow:inset 0 -3px 0 #d62728}.t.c2{box-shadow:inset 0 -3px 0 #2ca02c}
.t:hover{outline:2px solid #000}
#tip{position:fixed;z-index:10;display:none;max-width:420px;background:#fff;border:1px solid #9aa1ab;
border-radius:5px;padding:6px 9px;font-size:12px;box-shadow:0 2px 8px #0003;pointer-events:none}
#tip table{margin:4px 0 0;font-size:11.5px}#tip td{padding:1px 5px}#tip tr.cur{font-weight:600}
footer{color:var(--muted);font-size:12px;border-top:1px solid var(--line);margin-top:30px;padding-top:8px}
code{background:var(--panel);padding:0 3px;border-radius:3px}
"""

_JS = """
(function () {
  "use strict";
  var block = document.getElementById("probes-data");
  if (!block) { return; }  // a report without token views
  var data = JSON.parse(block.textContent);
  var views = Array.prototype.slice.call(document.querySelectorAll(".view"));
  var keySelect = document.getElementById("colour-by");
  var traceSelect = document.getElementById("trace-select");
  var tip = document.getElementById("tip");
  var current = data.default_key;
  document.querySelectorAll(".controls label[hidden]").forEach(function (c) { c.hidden = false; });
  document.querySelectorAll(".view .t[title]").forEach(function (s) { s.removeAttribute("title"); });

  function colour(key) {
    current = key;
    views.forEach(function (view) {
      var bins = data.views[+view.dataset.view].bins[key] || "";
      view.querySelectorAll(".t").forEach(function (s) {
        var b = bins.length ? bins.charCodeAt(+s.dataset.j) - 97 : -1;
        var ok = b >= 0 && b < data.palette.length;
        s.style.background = ok ? data.palette[b] : "";
        s.classList.toggle("dark", ok && data.dark.indexOf(b) >= 0);
        s.classList.toggle("nan", !ok);
      });
    });
    document.querySelectorAll(".legend[data-key]").forEach(function (l) {
      l.hidden = l.dataset.key !== key;
    });
  }

  function show(index) {
    views.forEach(function (view) {
      view.hidden = String(index) !== "all" && view.dataset.view !== String(index);
    });
  }

  function fmtValue(v) {
    if (v === null || v === undefined) { return "n/a"; }
    var a = Math.abs(v);
    return (a !== 0 && (a < 1e-3 || a >= 1e4)) ? v.toExponential(2) : String(+v.toPrecision(3));
  }

  function esc(text) {
    return String(text).replace(/[&<>"]/g, function (c) {
      return {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}[c];
    });
  }

  function card(span) {
    var view = span.closest(".view");
    var info = data.views[+view.dataset.view];
    var j = +span.dataset.j;
    function row(k) {
      var mark = k === current ? " class=\\"cur\\"" : "";
      return "<tr" + mark + "><td>" + esc(data.labels[k]) + "</td><td>" +
        fmtValue(info.values[k][j]) + "</td></tr>";
    }
    var keys = data.hover.filter(function (k) { return k in info.values; });
    if (keys.indexOf(current) < 0 && info.values[current]) { keys.unshift(current); }
    var rows = keys.map(row);
    var phrase = info.phrase[j] ? " &middot; phrase " + esc(JSON.stringify(info.phrase[j])) : "";
    return "<b>" + esc(JSON.stringify(span.textContent)) + "</b><br>position " + (info.start + j) +
      " in the trace, trajectory token " + j + " &middot; " + esc(info.category[j]) + phrase +
      "<table>" + rows.join("") + "</table>";
  }

  document.addEventListener("mouseover", function (e) {
    var span = e.target.closest ? e.target.closest(".view .t") : null;
    if (!span) { tip.style.display = "none"; return; }
    tip.innerHTML = card(span);
    tip.style.display = "block";
  });
  document.addEventListener("mousemove", function (e) {
    if (tip.style.display !== "block") { return; }
    var x = Math.min(e.clientX + 14, window.innerWidth - tip.offsetWidth - 8);
    var below = e.clientY + 16 + tip.offsetHeight <= window.innerHeight;
    var y = below ? e.clientY + 16 : e.clientY - tip.offsetHeight - 10;
    tip.style.left = Math.max(4, x) + "px";
    tip.style.top = Math.max(4, y) + "px";
  });
  if (keySelect) { keySelect.addEventListener("change", function () { colour(keySelect.value); }); }
  if (traceSelect) { traceSelect.addEventListener("change", function () { show(traceSelect.value); }); }
  if (data.views.length) {
    colour(current);
    show(traceSelect ? traceSelect.value : "all");
  }
})();
"""


def _esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _anchor(text: str) -> str:
    return "".join(c if c.isalnum() or c == "-" else "-" for c in text.lower()).strip("-") or "x"


def _is_number(text: str) -> bool:
    t = text.replace("%", "").replace("≤", "").replace("≥", "").strip()
    try:
        float(t)
    except ValueError:
        return False
    return True


def _cell(value: Any, tag: str = "td") -> str:
    cls = ""
    if isinstance(value, tuple) and len(value) == 2:
        value, cls = value
    text = fmt(value) if not isinstance(value, str) else value
    if tag == "td" and not cls and (_is_number(text) or text == "n/a"):
        cls = "num"
    attr = f' class="{_esc(cls)}"' if cls else ""
    return f"<{tag}{attr}>{_esc(text)}</{tag}>"


def _table_html(t: Table) -> str:
    out = ['<div class="tw"><table>']
    if t.caption:
        out.append(f"<caption>{_esc(t.caption)}</caption>")
    if any(str(c) for c in t.columns):
        out.append("<thead><tr>" + "".join(_cell(c, "th") for c in t.columns) + "</tr></thead>")
    out.append("<tbody>")
    out += ["<tr>" + "".join(_cell(c) for c in row) + "</tr>" for row in t.rows]
    out.append("</tbody></table></div>")
    if t.note:
        out.append(f'<p class="note">{_esc(t.note)}</p>')
    return "\n".join(out)


def _plot_html(p: Plot) -> str:
    uri = "data:image/png;base64," + base64.b64encode(p.png).decode("ascii")
    name = f" <code>{_esc(p.name)}</code>" if p.name else ""
    return (f'<figure><img alt="{_esc(p.title)}" src="{uri}">'
            f"<figcaption>{_esc(p.title)}{name}</figcaption></figure>")


def _block_html(block: Block) -> str:
    if isinstance(block, Table):
        return _table_html(block)
    if isinstance(block, Plot):
        return _plot_html(block)
    if isinstance(block, Collapsed):
        return f"<details><summary>{_esc(block.summary)}</summary>{_table_html(block.table)}</details>"
    return f"<p>{_esc(block)}</p>"


def _legend_html(key: TokenKey, scale: ColourScale, *, hidden: bool) -> str:
    lo, mid, hi = scale.ticks()
    swatches = "".join(f'<span style="background:{c}"></span>' for c in PALETTE)
    units = f" ({_esc(key.units)})" if key.units else ""
    return (f'<div class="legend" data-key="{_esc(key.key)}"{" hidden" if hidden else ""}>'
            f"<span>{_esc(lo)}</span>"
            f'<span class="swatches">{swatches}</span><span>{_esc(hi)}</span>'
            f"<span><b>{_esc(key.label)}</b>{units}; white: {_esc(mid)}; {_esc(scale.describe())}"
            "</span></div>")


def _markers_html() -> str:
    marks = " ".join(f'<span class="mk" style="border-color:{c}"></span> {_esc(n)}'
                     for n, c in MARKERS.values())
    return f"<span>underlined: {marks}; dotted outline: no value</span>"


def _token_span(j: int, piece: str, code: int, b: int, title: str) -> str:
    classes = ["t"]
    if code in MARKERS:
        classes.append(f"c{code}")
    style = ""
    if b >= 0:
        style = f' style="background:{PALETTE[b]}"'
        if b in _DARK_BINS:
            classes.append("dark")
    else:
        classes.append("nan")
    return (f'<span class="{" ".join(classes)}" data-j="{j}"{style} title="{_esc(title)}">'
            f"{_esc(piece)}</span>")


def _view_html(index: int, view: TokenView, default: TokenKey | None, scale: ColourScale | None,
               category_names: Mapping[int, str]) -> str:
    a, b = view.traj_span
    values = view.values.get(default.key) if default is not None else None
    bins = scale.bins(values) if (values is not None and scale is not None) else np.full(b - a, -1)
    spans = []
    for j in range(b - a):
        i = a + j
        code = int(view.category[i])
        value = "" if values is None else f" · {default.label} {fmt(float(values[j]))}"
        phrase = f" · phrase {view.phrase[i]!r}" if view.phrase[i] else ""
        title = (f"{view.pieces[i]!r} · position {i}, trajectory token {j} · "
                 f"{category_names.get(code, code)}{phrase}{value}")
        spans.append(_token_span(j, view.pieces[i], code, int(bins[j]), title))
    before, after = "".join(view.pieces[:a]), "".join(view.pieces[b:])
    note = f'<p class="note">{_esc(view.note)}</p>' if view.note else ""
    return (f'<div class="view" data-view="{index}" data-trace="{_esc(view.trace_id)}">'
            f"<h3>trace {_esc(view.trace_id)} <span class=\"note\">({b - a} trajectory tokens of "
            f"{len(view.pieces)})</span></h3>"
            f'<details><summary>prompt ({a} tokens)</summary><div class="tokens ctx">{_esc(before)}'
            f"</div></details>"
            f'<div class="tokens">{"".join(spans)}<span class="ctx">{_esc(after)}</span></div>'
            f"{note}</div>")


def _views_data(report: Report, scales: Mapping[str, ColourScale],
                category_names: Mapping[int, str]) -> dict[str, Any]:
    views = []
    for view in report.views:
        a, b = view.traj_span
        bins = {k: "".join(BIN_LETTERS[x] if x >= 0 else "." for x in scales[k].bins(v))
                for k, v in view.values.items() if k in scales}
        values = {k: [float(f"{x:.4g}") if np.isfinite(x) else None for x in np.asarray(v, float)]
                  for k, v in view.values.items() if k in scales}
        views.append({"id": view.trace_id, "start": a, "bins": bins, "values": values,
                      "category": [category_names.get(int(c), str(int(c))) for c in view.category[a:b]],
                      "phrase": list(view.phrase[a:b])})
    return {"default_key": report.default_key or (report.keys[0].key if report.keys else None),
            "palette": list(PALETTE), "dark": sorted(_DARK_BINS),
            "labels": {k.key: k.label for k in report.keys},
            "hover": [k.key for k in report.keys if k.hover], "views": views}


def _tokens_section(report: Report, category_names: Mapping[int, str]) -> str:
    if not report.views:
        return ""
    scales = token_scales(report.views, report.keys)
    default_key = report.default_key or (report.keys[0].key if report.keys else None)
    default = next((k for k in report.keys if k.key == default_key), None)
    options, group = [], None
    for k in report.keys:
        if k.group != group:
            if group is not None:
                options.append("</optgroup>")
            options.append(f'<optgroup label="{_esc(k.group or "values")}">')
            group = k.group
        sel = " selected" if k.key == default_key else ""
        options.append(f'<option value="{_esc(k.key)}"{sel}>{_esc(k.label)}</option>')
    if group is not None:
        options.append("</optgroup>")
    traces = "".join(f'<option value="{i}"{" selected" if i == 0 else ""}>{_esc(v.trace_id)} '
                     f"({v.n_trajectory} tokens)</option>" for i, v in enumerate(report.views))
    traces += '<option value="all">all shown traces</option>'
    controls = (f'<div class="controls"><label hidden>trace <select id="trace-select">{traces}'
                f'</select></label><label hidden>colour by <select id="colour-by">{"".join(options)}'
                f"</select></label>{_markers_html()}</div>")
    legends = "".join(_legend_html(k, scales[k.key], hidden=k.key != default_key) for k in report.keys)
    views = "".join(_view_html(i, v, default, scales.get(default_key) if default_key else None,
                               category_names) for i, v in enumerate(report.views))
    data = json.dumps(_views_data(report, scales, category_names), ensure_ascii=False,
                      separators=(",", ":"), allow_nan=False).replace("</", "<\\/")
    intro = ("Each trajectory token coloured by the chosen per-token value; hover a token for its "
             "text, position and values. Prompt and answer tokens are grey.")
    return (f'<section id="tokens"><h2>Tokens</h2><p>{_esc(intro)}</p>{controls}{legends}{views}'
            f'<script type="application/json" id="probes-data">{data}</script></section>')


def render_html(report: Report, *, category_names: Mapping[int, str] | None = None) -> str:
    """The report as one self-contained HTML page (images inline, no network, small inline JS).

    Args:
        report: The content.
        category_names: Category code -> name for the hover card (default: the codes of
            `analyses.token_sets.CATEGORY_CODES`).

    Returns:
        The HTML text.
    """
    if category_names is None:
        from analyses.token_sets import CATEGORY_NAMES

        category_names = CATEGORY_NAMES
    nav = ['<a href="#run">run</a>'] + (['<a href="#tokens">tokens</a>'] if report.views else [])
    nav += [f'<a href="#{_esc(_anchor(s.id))}">{_esc(s.title)}</a>' for s in report.sections]
    identity = "".join(f"<div>{_table_html(t)}</div>" for t in report.identity)
    headline = "".join(f'<p class="in">{_esc(line.strip())}</p>' if line.startswith("  ")
                       else f"<p>{_esc(line)}</p>" for line in report.headline)
    sections = "".join(
        f'<section id="{_esc(_anchor(s.id))}"><h2>{_esc(s.title)}</h2>'
        + "".join(_block_html(b) for b in s.blocks) + "</section>"
        for s in report.sections
    )
    footer = "".join(f"<p>{_esc(line)}</p>" for line in report.footer)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{_esc(report.title)}</title><style>{_CSS}</style></head><body>"
        f"<header><h1>{_esc(report.title)}</h1><div class=\"sub\">{_esc(report.subtitle)}</div></header>"
        f"<nav>{''.join(nav)}</nav><main>"
        f'<section id="run"><div class="headline">{headline}</div>'
        f'<div class="idgrid">{identity}</div></section>'
        f"{_tokens_section(report, category_names)}{sections}"
        f"<footer>{footer}</footer></main><div id=\"tip\"></div>"
        f"<script>{_JS}</script></body></html>\n"
    )


# --------------------------------------------------------------------------------------------------
# Markdown


def _md_cell(value: Any) -> str:
    if isinstance(value, tuple) and len(value) == 2:
        value = value[0]
    text = fmt(value) if not isinstance(value, str) else value
    return text.replace("|", "\\|").replace("\n", " ")


def _table_md(t: Table) -> list[str]:
    lines = [f"**{t.caption}**", ""] if t.caption else []
    lines.append("| " + " | ".join(_md_cell(c) for c in t.columns) + " |")
    lines.append("|" + "---|" * len(t.columns))
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in t.rows]
    if t.note:
        lines += ["", f"_{t.note}_"]
    return [*lines, ""]


def render_markdown(report: Report) -> str:
    """The report's text and tables as Markdown (plots and token views are HTML only)."""
    lines = [f"# {report.title}", ""]
    if report.subtitle:
        lines += [report.subtitle, ""]
    lines += [f"  - {line.strip()}" if line.startswith("  ") else f"- {line}"
              for line in report.headline] + [""]
    lines += ["## Run", ""]
    for t in report.identity:
        lines += _table_md(t)
    n_plots = 0
    for s in report.sections:
        lines += [f"## {s.title}", ""]
        for b in s.blocks:
            if isinstance(b, Table):
                lines += _table_md(b)
            elif isinstance(b, Collapsed):
                lines += [f"<details><summary>{html.escape(b.summary)}</summary>", "",
                          *_table_md(b.table), "</details>", ""]
            elif isinstance(b, Plot):
                n_plots += 1
            else:
                lines += [b, ""]
    if n_plots or report.views:
        lines += [f"_{n_plots} plots and {len(report.views)} token heat maps are in the HTML report "
                  "(`--format html`)._", ""]
    lines += [line for f in report.footer for line in (f, "")]
    return "\n".join(lines).rstrip() + "\n"
