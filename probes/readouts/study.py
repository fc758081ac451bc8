"""The study's steps after its stages (`probes.pipeline.study`), from its stores alone: the
comparisons (`compare` of each store, `compare --control` of the updates with the random-init
control, the effects summary with the control beside it) and the report.

Files written into the study folder: `compare.json` (`compare --json` of `run.h5`, with
`random_init.h5` as `--control` when the updates control ran), `compare-control.json` (of the
control's L̂ store alone), `effects.h5.effects.json` (what `effects` writes) and `report.html` (the
report of the whole folder, which reuses `compare.json`).
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


COMPARISONS: tuple[tuple[str, tuple[str, ...], str | None], ...] = (
    ("compare.json", ("lhat", "updates"), "updates-control"),
    ("compare-control.json", ("lhat-control",), None),
)
"""(file, stages whose store is compared (one store), stage passed as its --control when done)."""


def _done(stages: dict[str, dict[str, Any]], stage: str | None) -> bool:
    return stage is not None and stages.get(stage, {}).get("status") == "done"


def compare_step(folder: Path, stages: dict[str, dict[str, Any]]) -> dict[str, Any] | str:
    """`compare --json` of every L̂ / updates store (the updates with the random-init control when
    it was run) and the effects summary (with the control's as `--versus`). A comparison that
    refuses its stores (e.g. too few traces) is listed under "refused" with its one-line reason and
    the others still run; when none runs the step is skipped with the reasons."""

    files, refused = [], []
    for name, compared, control in COMPARISONS:
        if not any(_done(stages, s) for s in compared):
            continue
        stage = compared[0]
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


def report_step(folder: Path, stages: dict[str, dict[str, Any]]) -> dict[str, Any] | str:
    """`folder/report.html`: the report of the whole folder (every store, `compare.json`)."""
    if not any(_done(stages, s) for s in ("lhat", "updates", "activations")):
        return "no L̂, updates or activations store to report"
    try:
        result = write_report(folder, folder / REPORT, ReportConfig())
    except ProbesError as exc:  # a comparison the report holds refused these stores
        return str(exc)
    return {"files": [REPORT], "summary": result.summary()}


READOUT_STEPS: tuple[Step, ...] = (Step("compare", compare_step), Step("report", report_step))
"""The study's steps after its stages, in order."""
