"""The report in a real browser (headless Chromium over the DevTools protocol): no console errors,
no network request, every image decodes, the coloured-token view shows one token per trajectory
token of the selected trace, the menus recolour and switch traces, hovering shows the token card,
and a screenshot is taken. Skipped where Chromium is absent (the structure is checked without a
browser in test_report_cli.py)."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from analyses.report import Report, Section, render_html
from cache import open_cache
from probes.readouts.report.browser import CHROMIUM_ENV, Page, find_chromium
from tests.probes.commands._report_run import small_run
from tests.probes.commands.test_report_cli import main

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    find_chromium() is None,
    reason=(f"headless Chromium not found (install the distribution's `chromium` package, e.g. "
            f"`apt-get install chromium`, or set ${CHROMIUM_ENV}); the report's HTML structure is "
            "still checked without a browser in test_report_cli.py"),
)]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

VISIBLE_TOKENS = "document.querySelectorAll('.view:not([hidden]) .t').length"
IMAGES = ("Promise.all(Array.from(document.images).map(i => i.decode().then("
          "() => i.naturalWidth, () => 0)))")


def _select(page: Page, element_id: str, value: str) -> None:
    page.evaluate(f"(() => {{ const s = document.getElementById('{element_id}'); s.value = '{value}'; "
                  "s.dispatchEvent(new Event('change')); })()")


def _backgrounds(page: Page) -> list[str]:
    return page.evaluate("Array.from(document.querySelectorAll('.view:not([hidden]) .t'))"
                         ".map(s => s.style.background)")


def test_report_in_headless_chromium(tmp_path):
    run = small_run()
    html = tmp_path / "report.html"
    assert main(["report", str(run.run), "--control", str(run.control), "--out", str(html),
                 "--compare-json", str(run.compare_json), "-q"]) == 0
    with open_cache(run.run) as reader:
        spans = {tr.id: tr.spans["trajectory"] for tr in reader}
    with Page(html, width=1280, height=1400) as page:
        images = page.evaluate(IMAGES)
        assert len(images) == 18 and all(w > 0 for w in images), images
        views = page.evaluate("Array.from(document.querySelectorAll('.view')).map(v => v.dataset.trace)")
        first, second = views[0], views[1]
        (a, b), (a2, b2) = spans[first], spans[second]
        assert page.evaluate(VISIBLE_TOKENS) == b - a  # one trace shown at a time
        before = _backgrounds(page)
        assert sum(bool(x) for x in before) > (b - a) // 2
        # recolour: another key, another legend
        _select(page, "colour-by", "upd_sigma_gate@mean")
        after = _backgrounds(page)
        assert len(after) == b - a and after != before and all(after)
        assert page.evaluate("document.querySelector('.legend:not([hidden])').dataset.key") == \
            "upd_sigma_gate@mean"
        # switch trace
        _select(page, "trace-select", "1")
        assert page.evaluate(VISIBLE_TOKENS) == b2 - a2
        _select(page, "trace-select", "0")
        # hover a token: the card names its text, position and values
        assert page.hover_over(".view:not([hidden]) .t")
        card = page.evaluate("document.getElementById('tip').innerText")
        assert page.evaluate("getComputedStyle(document.getElementById('tip')).display") == "block"
        text = page.evaluate("document.querySelector('.view:not([hidden]) .t').textContent")
        assert text.strip() in card and f"position {a} in the trace" in card
        assert "ΔL̂ (lhat_delta)" in card and "upd_m7 · mean over layers" in card
        shot = page.screenshot(tmp_path / "report.png", max_height=1400)
        assert page.console_errors == [], page.console_errors
        assert page.requests == [], page.requests
    data = shot.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (1280, 1400)
    assert np.frombuffer(data, np.uint8).size > 50_000


def test_page_without_token_views_has_no_console_error(tmp_path):
    html = tmp_path / "empty.html"
    html.write_text(render_html(Report(title="empty", sections=[Section("x", "x", ["text"])])))
    with Page(html) as page:
        assert page.evaluate("document.querySelectorAll('.view').length") == 0
        assert page.console_errors == [] and page.requests == []
