"""`render_html`: a report as one self-contained HTML page (inline CSS and script, embedded plots,
token heat maps).
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Mapping
from typing import Any

import numpy as np

from analyses.report_data import (
    _DARK_BINS,
    BIN_LETTERS,
    MARKERS,
    PALETTE,
    Block,
    Collapsed,
    ColourScale,
    Plot,
    Report,
    Section,
    Table,
    TokenKey,
    TokenView,
    fmt,
    token_scales,
)
from analyses.token_sets import CATEGORY_NAMES

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
.links{font-size:12px;margin:0 0 6px}.links a{color:var(--accent)}
section.absent h2{color:var(--muted)}section.absent p{color:var(--muted);font-style:italic}
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


def _section_html(s: Section) -> str:
    links = " · ".join(f'<a href="{_esc(href)}">{_esc(text)}</a>' for text, href in s.links)
    cls = "" if s.computed else ' class="absent"'
    return (f'<section id="{_esc(_anchor(s.id))}"{cls} data-computed="{str(s.computed).lower()}">'
            f"<h2>{_esc(s.title)}</h2>"
            + (f'<p class="links">{links}</p>' if links else "")
            + "".join(_block_html(b) for b in s.blocks) + "</section>")


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
        category_names = CATEGORY_NAMES
    nav = ['<a href="#run">run</a>'] + (['<a href="#tokens">tokens</a>'] if report.views else [])
    nav += [f'<a href="#{_esc(_anchor(s.id))}">{_esc(s.title)}</a>' for s in report.sections]
    identity = "".join(f"<div>{_table_html(t)}</div>" for t in report.identity)
    headline = "".join(f'<p class="in">{_esc(line.strip())}</p>' if line.startswith("  ")
                       else f"<p>{_esc(line)}</p>" for line in report.headline)
    sections = "".join(_section_html(s) for s in report.sections)
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
