"""The study's steps after its stages (`probes.pipeline.study`), from its stores alone: the
comparisons (`compare` of each store, `compare --control` of the updates with the random-init
control, the effects summary with the control beside it) and the report.

Files written into the study folder: `compare-lhat.json`, `compare-updates.json`,
`compare-lhat-control.json` (each `compare --json` of that store), `effects.h5.effects.json`
(what `effects` writes) and `report.html`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from probes.errors import ProbesError
from probes.pipeline.effects import summary_path
from probes.pipeline.study import STORES, Step
from probes.readouts.compare import compare_cache, report_json
from probes.readouts.configs import CompareConfig, ReportConfig
from probes.readouts.effects import summarize
from probes.readouts.report.build import write_report
from probes.safe_output import write_text

REPORT = "report.html"
"""The study's report in its folder."""


COMPARISONS: tuple[tuple[str, str, str | None], ...] = (
    ("compare-lhat.json", "lhat", None),
    ("compare-updates.json", "updates", "updates-control"),
    ("compare-lhat-control.json", "lhat-control", None),
)
"""(file, stage compared, stage passed as its --control when done) of each comparison."""


def _done(stages: dict[str, dict[str, Any]], stage: str | None) -> bool:
    return stage is not None and stages.get(stage, {}).get("status") == "done"


def compare_step(folder: Path, stages: dict[str, dict[str, Any]]) -> dict[str, Any] | str:
    """`compare --json` of every L̂ / updates store (the updates with the random-init control when
    it was run) and the effects summary (with the control's as `--versus`). A comparison that
    refuses its stores (e.g. too few traces) is listed under "refused" with its one-line reason and
    the others still run; when none runs the step is skipped with the reasons."""

    files, refused = [], []
    for name, stage, control in COMPARISONS:
        if not _done(stages, stage):
            continue
        ctrl = folder / STORES[control] if control is not None and _done(stages, control) else None
        try:
            report = report_json(compare_cache(folder / STORES[stage], CompareConfig(control=ctrl)))
        except ProbesError as exc:  # e.g. too few traces for the control: the others still run
            refused.append(f"{name}: {exc}")
            continue
        write_text(folder / name, json.dumps(report, ensure_ascii=False) + "\n")
        files.append(name)
    if _done(stages, "effects"):
        effects = folder / STORES["effects"]
        versus = folder / STORES["effects-control"] if _done(stages, "effects-control") else None
        summary = summarize(effects, versus)
        write_text(summary_path(effects), json.dumps(summary, indent=1, default=str))
        files.append(summary_path(effects).name)
    if not files:
        return "; ".join(refused) or "no L̂, updates or effects store to compare"
    return {"files": files, **({"refused": refused} if refused else {})}


def report_source(folder: Path, stages: dict[str, dict[str, Any]]) -> tuple[Path | None, Path | None]:
    """The store the report is built from and its random-init control: the L̂ store, else the
    updates store (with its control), else the activations (None: no store the report reads)."""
    if _done(stages, "lhat"):
        return folder / STORES["lhat"], None
    if _done(stages, "updates"):
        control = folder / STORES["updates-control"] if _done(stages, "updates-control") else None
        return folder / STORES["updates"], control
    if _done(stages, "activations"):
        return folder / STORES["activations"], None
    return None, None


def report_step(folder: Path, stages: dict[str, dict[str, Any]]) -> dict[str, Any] | str:
    """`folder/report.html`."""

    source, control = report_source(folder, stages)
    if source is None:
        return "no L̂, updates or activations store to report"
    try:
        result = write_report(source, folder / REPORT, ReportConfig(control=control))
    except ProbesError as exc:  # a comparison the report holds refused these stores
        return f"{source.name}: {exc}"
    return {"files": [REPORT], "summary": result.summary()}


READOUT_STEPS: tuple[Step, ...] = (Step("compare", compare_step), Step("report", report_step))
"""The study's steps after its stages, in order."""
