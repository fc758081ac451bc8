"""The HTML and Markdown reports from plain data: self-contained page, token heat map, scales,
tables built from `compare`'s JSON (no browser, no model)."""

from __future__ import annotations

import base64
import io
import json
import re
from html.parser import HTMLParser

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from analyses.report import (
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
    fit_table,
    lhat_comparison_table,
    render_html,
    render_markdown,
    trend_lines,
    update_comparison_table,
)
from analyses.token_sets import CATEGORY_CODES

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png() -> bytes:
    fig = Figure(figsize=(2, 1.5))
    fig.add_subplot(1, 1, 1).plot([0, 1], [1, 0])
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=40)
    return buf.getvalue()


class Page(HTMLParser):
    """Collects what the structure checks need: tags with attributes, token spans per view."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.tokens: dict[str, list[dict[str, str | None]]] = {}
        self.scripts: list[str] = []
        self._view: str | None = None
        self._depth = 0
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag == "div" and "view" in (a.get("class") or "").split():
            self._view, self._depth = a["data-trace"], 0
            self.tokens[self._view] = []
        if self._view is not None and tag == "div":
            self._depth += 1
        if self._view is not None and tag == "span" and "t" in (a.get("class") or "").split():
            self.tokens[self._view].append(a)
        self._in_script = tag == "script"
        if tag == "script":
            self.scripts.append("")

    def handle_endtag(self, tag):
        if self._view is not None and tag == "div":
            self._depth -= 1
            if self._depth == 0:
                self._view = None
        if tag == "script":
            self._in_script = False

    def handle_data(self, data):
        if self._in_script:
            self.scripts[-1] += data


def _view(trace_id="t/1", n_prompt=3, values=None, pieces=None):
    traj = ["Wait", ",", " so", " 2", "+", "2", " is", " 4", "</script><b>x"]
    pieces = pieces or (["<p>", "Q", ":"][:n_prompt] + traj + ["\n", "4"])
    n = len(pieces)
    cat = np.full(n, CATEGORY_CODES["ordinary"], np.uint8)
    cat[:n_prompt] = CATEGORY_CODES["prompt"]
    cat[n_prompt] = CATEGORY_CODES["reflection"]
    cat[n - 2:] = CATEGORY_CODES["answer"]
    T = len(traj)
    rng = np.random.default_rng(len(trace_id))
    values = values or {"lhat_delta": rng.normal(size=T), "upd_m7@mean": np.abs(rng.normal(size=T)) + 0.1}
    values["lhat_delta"][2] = np.nan
    phrase = [""] * n
    phrase[n_prompt] = "wait"
    return TokenView(trace_id=trace_id, pieces=pieces, category=cat, phrase=phrase,
                     traj_span=(n_prompt, n_prompt + T), values=values)


KEYS = [TokenKey("lhat_delta", "ΔL̂ (lhat_delta)", "nats", "L̂"),
        TokenKey("upd_m7@mean", "upd_m7 · mean over layers", "nats", "upd_m7")]


def _report(views=None, png=None):
    png = png or _png()
    table = Table(["a", "b"], [["x", 1.5], ["y", ("more", "more")]], caption="cap", note="note")
    return Report(
        title="report <of> run.h5", subtitle="sub", identity=[table],
        headline=["line one", "  indented"],
        views=[_view("t/1"), _view("t&2", n_prompt=2)] if views is None else views, keys=KEYS,
        default_key="lhat_delta",
        sections=[Section("lhat", "L̂ part", ["para <b>", table, Plot("a plot", png, "a.png"),
                                              Collapsed("all rows", table)])],
        footer=["footer"])


def test_page_is_self_contained_and_well_formed():
    png = _png()
    text = render_html(_report(png=png))
    page = Page()
    page.feed(text)
    # no network: no external script, stylesheet, image, font or link target
    for tag, attrs in page.tags:
        for key in ("src", "href"):
            value = attrs.get(key) or ""
            assert not re.match(r"^(https?:)?//", value), (tag, key, value)
        if tag == "script":
            assert "src" not in attrs
        assert tag not in ("link", "iframe", "object", "embed")
    assert "@import" not in text and "url(" not in text
    # every image is an inline PNG that decodes to the bytes given
    images = [a["src"] for t, a in page.tags if t == "img"]
    assert len(images) == 1
    prefix = "data:image/png;base64,"
    assert images[0].startswith(prefix)
    assert base64.b64decode(images[0][len(prefix):]) == png
    # text is escaped (a token "</script><b>" stays text; the title too)
    assert "<b>x" not in text and "&lt;/script&gt;&lt;b&gt;x" in text
    assert "report &lt;of&gt; run.h5" in text
    # the data block parses and holds one entry per view
    data = json.loads(next(s for s in page.scripts if s.lstrip().startswith("{")))
    assert [v["id"] for v in data["views"]] == ["t/1", "t&2"]
    assert data["default_key"] == "lhat_delta" and data["palette"] == list(PALETTE)


def test_token_view_has_one_span_per_trajectory_token_coloured_by_the_default_key():
    report = _report()
    page = Page()
    page.feed(render_html(report))
    scale = colour_scale([v.values["lhat_delta"] for v in report.views])
    for view in report.views:
        spans = page.tokens[view.trace_id]
        assert len(spans) == view.n_trajectory
        assert [int(s["data-j"]) for s in spans] == list(range(view.n_trajectory))
        bins = scale.bins(view.values["lhat_delta"])
        for s, b in zip(spans, bins):
            if b < 0:
                assert "nan" in s["class"].split() and "style" not in s
            else:
                assert s["style"] == f"background:{PALETTE[b]}"
        # category markers: the reflection token is marked, the others are not
        assert "c1" in spans[0]["class"].split()
        assert not any("c1" in s["class"].split() for s in spans[1:])
        assert "position" in spans[0]["title"] and "reflection" in spans[0]["title"]
    data = json.loads(next(s for s in page.scripts if s.lstrip().startswith("{")))
    for view, d in zip(report.views, data["views"]):
        assert set(d["bins"]) == {"lhat_delta", "upd_m7@mean"}
        assert len(d["bins"]["lhat_delta"]) == view.n_trajectory
        assert d["bins"]["lhat_delta"][2] == "."
        assert set(d["bins"]["upd_m7@mean"]) <= set(BIN_LETTERS)
        assert d["values"]["lhat_delta"][2] is None
        assert d["values"]["upd_m7@mean"][0] == pytest.approx(view.values["upd_m7@mean"][0], rel=1e-3)
    legends = [a for t, a in page.tags if t == "div" and a.get("class") == "legend"]
    assert [(a["data-key"], "hidden" in a) for a in legends] == [("lhat_delta", False),
                                                                 ("upd_m7@mean", True)]


def test_page_without_views_or_keys():
    text = render_html(_report(views=[]))
    assert '<section id="tokens"' not in text and 'id="probes-data"' not in text
    assert "if (!block) { return; }" in text  # the script stops quietly without token views


def test_colour_scales():
    signed = colour_scale([np.array([-2.0, 0.0, 1.0, np.nan])])
    assert signed.kind == "signed" and signed.centre == 0
    assert list(signed.bins(np.array([-100.0, 0.0, 100.0, np.nan]))) == [0, 5, 10, -1]
    ratio = colour_scale(np.array([1.0, 10.0, 100.0, 0.0]))
    assert ratio.kind == "ratio" and ratio.centre == pytest.approx(10.0)
    assert list(ratio.bins(np.array([10.0, 1e6, 1e-6, 0.0]))) == [5, 10, 0, 0]
    assert ratio.ticks()[1] == "median 10"
    assert colour_scale(np.array([np.nan])).kind == "empty"
    assert colour_scale(np.zeros(3)).kind == "signed"  # all zeros: nothing to divide by


ROW = {"a": "reflection", "b": "ordinary", "n_traces": 10, "median_a": 1.0, "median_b": 0.5,
       "ci_median_a": [0.9, 1.1], "ci_median_b": [0.4, 0.6], "median_diff": 0.5,
       "ci_median_diff": [0.2, 0.8], "cliffs_delta": 0.7, "wilcoxon_p": 0.001, "p_holm": 0.004}


def test_tables_from_compare_json():
    t = lhat_comparison_table({"meta": {"metric": "abs_delta", "unit": "phrase"},
                               "rows": [ROW, {**ROW, "p_holm": None, "ci_median_diff": [None, None]}]})
    assert t.rows[0][4] == "0.5 [0.2, 0.8]" and t.rows[0][-1] == ("more", "more")
    assert t.rows[1][-1] == ("n/a", "ns")
    upd = {"meta": {"signed_as_magnitude": ["upd_m7"], "n_tests": 2},
           "rows": [{**ROW, "metric": "upd_m7", "layer": "pooled", "effect": "more", "control": {},
                     "control_effect": "n.s.", "reproduced_by_random_init": False},
                    {**ROW, "metric": "upd_m7", "layer": 0, "effect": "n.s.", "control": {},
                     "control_effect": "n.s.", "reproduced_by_random_init": None}]}
    pooled = update_comparison_table(upd)
    assert len(pooled.rows) == 1 and pooled.rows[0][0] == "|upd_m7|"
    assert pooled.columns[-1] == "reproduced by random-init" and pooled.rows[0][-1] == "no"
    assert len(update_comparison_table(upd, layers="all").rows) == 2
    fit = {"fits": {"delta": {"n_tokens": 5, "n_traces": 2, "r2": {"full": 0.1},
                              "partial_r2": {"categories": 0.01, "mechanism": 0.05},
                              "ci": {"full": [0.0, 0.2]}}}}
    assert fit_table(fit).rows[0][:4] == ["ΔL̂", "5", "2", "0.1 [0, 0.2]"]
    lines = trend_lines({"n_traces": 3, "share_falling": 1.0, "share_falling_ci": [1.0, 1.0],
                         "median_change": -2.0, "median_change_ci": [-3, -1], "wilcoxon_p": 0.25})
    assert lines[0].startswith("L̂ falls along the trajectory in 100% of 3 traces")


def test_markdown_has_the_tables_and_no_images():
    text = render_markdown(_report())
    assert text.startswith("# report <of> run.h5\n")
    assert "| a | b |\n|---|---|\n| x | 1.5 |\n| y | more |" in text
    assert "<details><summary>all rows</summary>" in text
    assert "  - indented" in text
    assert "data:image" not in text and "1 plots and 2 token heat maps are in the HTML report" in text


def test_empty_comparison_rows_are_dropped_with_their_count():
    empty = [{**ROW, "n_traces": 0, "median_diff": None}, {**ROW, "median_diff": float("nan")}]
    t = lhat_comparison_table({"meta": {}, "rows": [ROW, *empty]})
    assert [r[0] for r in t.rows] == ["reflection vs ordinary"]
    assert t.note.endswith("; 2 empty rows (n = 0 or no difference measurable) left out")
    upd = {"meta": {}, "rows": [{**ROW, "metric": "upd_m7", "layer": "pooled", "effect": "more"},
                                {**empty[0], "metric": "upd_loo", "layer": "pooled", "effect": None},
                                {**empty[0], "metric": "upd_loo", "layer": 1, "effect": None}]}
    pooled = update_comparison_table(upd)
    assert [r[0] for r in pooled.rows] == ["upd_m7"]
    assert pooled.note.endswith("; 1 empty row (n = 0 or no difference measurable) left out")
    assert update_comparison_table(upd, layers="all").note.endswith("; 2 empty rows (n = 0 or no "
                                                                     "difference measurable) left out")
    assert "left out" not in lhat_comparison_table({"meta": {}, "rows": [ROW]}).note


def test_latex_becomes_plain_text():
    from analyses.report_text import plain_text

    assert plain_text(r"so $\frac{3}{4} \times 8 = 6$, answer \boxed{6}") == "so 3/4 × 8 = 6, answer [6]"
    assert plain_text(r"\[ x = \frac{-b \pm \sqrt{b^2-4ac}}{2a} \]") == " x = (-b ± √(b^2-4ac))/(2a) "
    assert plain_text(r"\(\dfrac{\text{total}}{n_{i}} \le 10\%\)") == "total/(n_i) ≤ 10%"
    assert plain_text(r"\boxed{\frac{1}{\frac{2}{3}}}") == "[1/(2/3)]"
    assert plain_text("no latex here: 3 < 4") == "no latex here: 3 < 4"
    assert "\\" not in plain_text(r"$\left( \alpha + \beta \right) \cdot \mathrm{d}x$")
