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

The code is split by concept: `analyses.report_data` (the objects, colour scales and `fmt`),
`analyses.report_tables` (the builders), `analyses.report_html` (`render_html`); this
module renders Markdown and re-exports what callers import from here.
"""

from __future__ import annotations

import html
from typing import Any

from analyses.report_data import (
    BIN_LETTERS,
    PALETTE,
    Collapsed,
    Plot,
    Report,
    Section,
    Table,
    TokenKey,
    TokenView,
    colour_scale,
    fmt,
)
from analyses.report_html import render_html
from analyses.report_tables import (
    fit_table,
    lhat_comparison_table,
    trend_lines,
    update_comparison_table,
)

__all__ = [
    "BIN_LETTERS",
    "PALETTE",
    "Collapsed",
    "Plot",
    "Report",
    "Section",
    "Table",
    "TokenKey",
    "TokenView",
    "colour_scale",
    "fit_table",
    "lhat_comparison_table",
    "render_html",
    "render_markdown",
    "trend_lines",
    "update_comparison_table",
]


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
        if s.links:
            lines += [" · ".join(f"[{text}]({href})" for text, href in s.links), ""]
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
