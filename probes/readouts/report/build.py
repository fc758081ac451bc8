"""`python -m probes.run report run.h5 [--control random_init.h5]`: one self-contained HTML report
of a cache (or its tables as Markdown), from the cache alone (no model).

The report shows the run's identity (model, architecture, dtype, versions, lexicon, traces and
tokens per category), the headline findings, token heat maps of a few traces (each trajectory
token coloured by a chosen per-token array: ΔL̂, ρ, σ, M7, ...; hover for the token, its position
and values), and a section per analysis the cache holds (L̂ curves, implicit updates, the
behaviour fit, activation sites) with `compare`'s tables and every plot it draws, embedded.

Every number comes from `probes.readouts.compare.compare_cache` and `report_json` (the same code
path as `compare --json`); `--compare-json` reads a saved `compare --json` output of the same
cache instead of recomputing. The rendering is `analyses.report` (plain data in, HTML out).
`report_demo` is the demo's last step.

Reading the cache and the token heat maps are in `probes.readouts.report.scan`; the comparison
and the page's sections in `probes.readouts.report.sections`.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from analyses.report import render_html, render_markdown
from analyses.report_data import Plot, Report
from cache import store_bytes
from probes.errors import ProbesError
from probes.pipeline.loop import human_size
from probes.pipeline.outputs import check_output_file
from probes.pipeline.progress import Stages
from probes.readouts.configs import (
    ReportConfig,
)
from probes.readouts.report.analysis_sections import HOW_TO_COMPUTE, extra_sections, not_computed
from probes.readouts.report.browser import Page
from probes.readouts.report.scan import _decoder, _default_key, _pick_views, _scan, _token_views
from probes.readouts.report.sections import (
    _compare,
    _footer,
    _identity,
    _read_compare_json,
    _sections,
    headline_lines,
)
from probes.readouts.report.stores import Found, Store, find_stores
from probes.safe_output import write_text

NAME = "report"


DEMO_N_BOOT = 1000
"""Bootstrap resamples of the demo's comparison (`probes.commands.demo`)."""


@dataclass
class ReportResult:
    """What `write_report` wrote.

    Attributes:
        out: The report file.
        format: "html" or "md".
        bytes: Its size.
        n_traces: Complete traces in the cache.
        n_views: Token heat maps.
        n_view_tokens: Trajectory tokens in them.
        n_plots: Plots embedded.
        seconds: Wall time.
        headline: The report's summary lines.
        notes: Caveats (e.g. token ids shown because the tokenizer could not be loaded).
    """

    out: Path
    format: str
    bytes: int = 0
    n_traces: int = 0
    n_views: int = 0
    n_view_tokens: int = 0
    n_plots: int = 0
    seconds: float = 0.0
    headline: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """The one line the command ends with: what was written where."""
        what = f"{self.n_views} token heat maps ({self.n_view_tokens} tokens), {self.n_plots} plots"
        if self.format == "md":
            what = "tables"
        return (f"report: {self.n_traces} traces, {what} -> {self.out} "
                f"({human_size(self.bytes)}, {self.seconds:.1f}s)")


def build_report(path: Path, cfg: ReportConfig, *,
                 stages: Stages | None = None) -> tuple[Report, dict[str, Any]]:
    """The report of a cache or of a folder of caches (the demo's or `study`'s output), and facts
    for the summary line (`n_traces`, `n_plots`, ...).

    In a folder, the store holding L̂ / updates / activations of the trained model is the one the
    token views and `compare` read; a random-init store holding updates beside it is its control
    (unless `cfg.control` names one), and its saved `compare.json` is used when it matches.

    Raises:
        ProbesError: Unknown `trace_ids` or `colour_by`, a control that does not match, a bad
            `compare_json`, a folder without a store.
        CacheError: The cache cannot be read.
    """
    stages = stages or Stages(total=0, desc=NAME, enabled=False)
    stages.step("reading the stores")
    found = find_stores(Path(path))
    primary = found.primary()
    if primary is None:  # only controls: read the first as the run
        primary = found.stores[0]
    cfg = _folder_config(found, primary, cfg)
    scan = _scan(primary.path)
    stages.advance()
    view_ids = _pick_views(scan, cfg)
    stages.set_total(3 + len(view_ids))
    views, keys, note = _token_views(scan, view_ids, stages)
    default = _default_key(keys, cfg.colour_by)  # a bad --colour-by fails before the long step
    compare, plots = _compare(scan, cfg, stages)
    stages.advance()
    counts = {"n_traces": len(scan.ids), "model": scan.meta.get("model"),
              "tokens": sum(scan.tokens.values()), "reflection": scan.tokens.get("reflection", 0),
              "delimiter": scan.tokens.get("delimiter", 0),
              "with_reflection": scan.traces_with.get("reflection", 0)}
    headline = headline_lines(counts, compare)
    decode, _ = _decoder(scan.meta)
    with stages.working("the other analyses (landscape, anchors, effects, ...)"):
        sections = _sections(compare, plots, scan)
        have = {s.id for s in sections}
        sections[:0] = [not_computed(a) for a in ("lhat", "updates") if a not in have]
        sections += extra_sections(found, decode, n_boot=cfg.n_boot, seed=cfg.seed)
    absent = [s.id for s in sections if not s.computed]
    if absent:
        headline.append("not computed: " + "; ".join(f"{a} (`{HOW_TO_COMPUTE[a]}`)" for a in absent))
    n_plots = sum(isinstance(b, Plot) for s in sections for b in s.blocks)
    report = Report(
        title=f"trajectory-probes report: {found.root.name}",
        subtitle=f"{scan.meta.get('model')} · {len(scan.ids)} traces · {found.root}",
        identity=_identity(scan, cfg.control, found), headline=headline, views=views, keys=keys,
        default_key=default, sections=sections, footer=_footer(scan, cfg))
    facts = {"n_traces": len(scan.ids), "n_views": len(views), "n_plots": n_plots,
             "n_view_tokens": sum(v.n_trajectory for v in views), "headline": headline,
             "notes": [note] if note else [], "absent": absent}
    return report, facts


def _folder_config(found: Found, primary: Store, cfg: ReportConfig) -> ReportConfig:
    """`cfg` with the folder's control and saved comparison when the user named none."""
    if not found.root.is_dir():
        return cfg
    control = cfg.control
    if control is None and "updates" in primary.analyses:
        ctrl = found.control_of(primary, "updates")
        control = ctrl.path if ctrl is not None else None
    compare_json = cfg.compare_json
    saved = primary.path.parent / "compare.json"
    if compare_json is None and saved.is_file():
        try:
            _read_compare_json(saved, primary.path, control)
            compare_json = saved
        except ProbesError:  # made for other caches, or older than them: compare again
            compare_json = None
    return replace(cfg, control=control, compare_json=compare_json)


def write_report(path: Path, out: Path | None, cfg: ReportConfig, *, progress: bool = False) -> ReportResult:
    """Build the report of `path` and write it to `out` (default: `report.html` / `report.md`
    next to the cache; replaced if present, written atomically).

    Returns:
        What was written.
    """
    t0 = time.perf_counter()
    path = Path(path)
    out = Path(out) if out is not None else (path if path.is_dir() else path.parent) / f"report.{cfg.format}"
    check_output_file(out, "--out", make_parents=True)
    with Stages(total=3 + (len(cfg.trace_ids) or cfg.n_views), desc=NAME, enabled=progress) as stages:
        report, facts = build_report(path, cfg, stages=stages)
        stages.step(f"writing {out.name}")
        text = render_html(report) if cfg.format == "html" else render_markdown(report)
        write_text(out, text, make_parents=True)
        stages.advance()
    return ReportResult(out=out, format=cfg.format, bytes=out.stat().st_size,
                        n_traces=facts["n_traces"], n_views=facts["n_views"],
                        n_view_tokens=facts["n_view_tokens"], n_plots=facts["n_plots"],
                        seconds=time.perf_counter() - t0, headline=facts["headline"],
                        notes=facts["notes"])


HOVER_FOR_SCREENSHOT = ".view:not([hidden]) .t.c1"
"""The token the screenshot hovers (the first reflection token shown), so its card is in the picture."""


def screenshot(html_file: Path, png: Path, *, max_height: int = 1800, width: int = 1280) -> Path:
    """A PNG of the top `max_height` pixels of an HTML report in headless Chromium, with the mouse
    on the first reflection token shown (its hover card open).

    Raises:
        BrowserError: No Chromium, or it failed.
    """

    with Page(html_file, width=width, height=max_height) as page:
        page.hover_over(HOVER_FOR_SCREENSHOT)
        return page.screenshot(png, max_height=max_height)


def report_demo(out_dir: str | os.PathLike[str], *, progress: bool = False) -> tuple[Path, list[str]]:
    """Write `out_dir/report.html` for the demo's folder and return it with a short summary.

    The report of the whole folder (`build_report`): `run.h5` with its random-init control and,
    when it matches them, the saved `compare.json` (else `compare` runs again, with the demo's
    `DEMO_N_BOOT`), and every other store and output the demo wrote. The summary (at most 15
    lines) takes the answer accuracy and timing from `out_dir/summary.json` when present.

    Returns:
        (the report path, the summary lines).
    """
    folder = Path(out_dir)
    cfg = ReportConfig(n_boot=DEMO_N_BOOT)
    result = write_report(folder, folder / "report.html", cfg, progress=progress)
    return result.out, demo_summary_lines(folder, result)


def demo_summary_lines(folder: Path, result: ReportResult) -> list[str]:
    """The demo's short summary: answer accuracy, the report's headline, files, where the report is."""
    summary: dict[str, Any] = {}
    if (folder / "summary.json").is_file():
        summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    lines = list(result.headline[:8])
    if "answer_accuracy" in summary:
        lines.insert(1, f"greedy answer accuracy {summary['answer_accuracy']:.3f} with the trajectory, "
                        f"{summary['answer_accuracy_no_trajectory']:.3f} without")
    files = [f"{p} ({human_size(store_bytes(p))})" for p in
             (folder / "run.h5", folder / "random_init.h5") if p.is_file()]
    n_png = len(list((folder / "plots").glob("*.png"))) if (folder / "plots").is_dir() else 0
    extra = "".join(f", {name}" for name in ("summary.json", "compare.json") if (folder / name).is_file())
    extra += f", plots/ ({n_png} PNG)" if n_png else ""
    lines.append(f"wrote {', '.join(files)}{extra}")
    lines.append(f"report: {result.out} ({human_size(result.bytes)}) - open it in a browser")
    took = summary.get("seconds", 0.0) + result.seconds
    lines.append(f"took {took:.0f}s; every number: `python -m probes.run demo --out {folder} --verbose`")
    return lines[:15]
