"""`trajectory-probes compare-models`: its flags, its run and its printed summary.

The work itself is done by `probes.readouts.compare_models`, which a notebook can call directly."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from probes.commands import SUMMARIES, flags, name_of
from probes.pipeline.outputs import check_plot_folder
from probes.pipeline.progress import Stages, progress_on
from probes.readouts.configs import PAIRINGS
from probes.readouts.text import num as _num

NAME = name_of(__name__)



def format_report(report: dict[str, Any], *, all_categories: bool = True) -> str:
    """Human form: a models × measures table of medians [95% CI], then the paired differences."""
    models = report["models"]
    lines = [f"{report['n_traces']} paired traces, models: {', '.join(models)}"
             + ("" if report["same_tokenizer_fingerprint"] else
                " (tokenizer fingerprints differ, tokens checked equal)")]
    mine = [r for r in report["rows"] if r["kind"] == "model"]
    model_rows = {(r["model"], r["measure"], r["category"]): r for r in mine}
    keys = list(dict.fromkeys((r["measure"], r["category"]) for r in mine))
    head = f"{'measure':<18}{'tokens':<11}" + "".join(f"  {m[:30]:>30}" for m in models)
    lines += ["per model: median over traces [95% CI]", head]
    for measure, cat in keys:
        cells = []
        for m in models:
            r = model_rows[(m, measure, cat)]
            cells.append(f"{_num(r['median'])} [{_num(r['ci_low'])}, {_num(r['ci_high'])}]")
        lines.append(f"{measure:<18}{cat:<11}" + "".join(f"  {c:>30}" for c in cells))
    lines.append("paired by trace (A - B: median difference [95% CI], Cliff's delta, Holm p, n):")
    for r in report["rows"]:
        if r["kind"] != "paired":
            continue
        flag = " *" if (r["p_holm"] is not None and r["p_holm"] == r["p_holm"] and r["p_holm"] < 0.05) else ""
        lines.append(f"  {r['a']} - {r['b']}  {r['measure']:<17}{r['category']:<11}"
                     f"{_num(r['median_diff'])} [{_num(r['ci_low'])}, {_num(r['ci_high'])}], "
                     f"delta {_num(r['cliffs_delta'], '.2f')}, p_holm {_num(r['p_holm'], '.2g')}, "
                     f"n {r['n']}{flag}")
    lines.append("(* Holm p < 0.05; --json gives every row as a flat record)")
    for p in report["plots"]:
        lines.append(f"plot: {p}")
    return "\n".join(lines)


def add_parser(sub: Any) -> None:
    """Register `compare-models` and its flags."""
    p = sub.add_parser(
        NAME, formatter_class=flags.HelpFormatter,
        help=SUMMARIES[NAME],
        description=(
            "Compare models (e.g. along training: early SFT, SFT, RL) on the same traces, from "
            "their caches alone: one cache per model, each with L-hat curves (from `lhat`) and "
            "optionally update arrays (from `updates`), made from the same JSONL with models that "
            "share a tokenizer; traces are paired by id and must have the same tokens. Per model: "
            "the L-hat curve summary (start, final, drop, tokens to 90% of the drop, area under the "
            "remaining-drop curve), the stability measures (variance of dL-hat along a trace, share "
            "of non-monotone steps, oscillation energy of L-hat after smoothing; "
            "docs/methods.md#stability), mean |dL-hat| and update magnitudes per token category; "
            "medians with bootstrap 95% CIs, and between models paired per-trace differences "
            "(Wilcoxon signed-rank, bootstrap CI, Cliff's delta, Holm)."
        ),
    )
    p.add_argument("paths", type=Path, nargs="+", metavar="CACHE",
                   help="two or more .h5 caches of the same traces, one per model, in training order")
    p.add_argument("--names", nargs="+", default=None, metavar="NAME",
                   help="one name per cache (default: the caches' model labels)")
    p.add_argument("--pairs", default=PAIRINGS[0], choices=PAIRINGS,
                   help="which models are compared: each with the one before it, each with the "
                        "first, or every pair (differences are later - earlier)")
    p.add_argument("--window", type=flags.positive_int, default=9,
                   help="smoothing window (tokens) before the oscillation energy")
    p.add_argument("--update-metrics", nargs="+", default=None, metavar="NAME",
                   help="upd_* arrays compared (default: upd_sigma_gate, upd_loo, upd_contrib where "
                        "every cache has them)")
    p.add_argument("--n-boot", type=flags.positive_int, default=2000, help="bootstrap resamples")
    p.add_argument("--seed", type=flags.seed, default=0, help="bootstrap seed")
    p.add_argument("--plots", type=Path, default=None, help="folder for the PNG")
    flags.report_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """`compare-models` from parsed flags."""
    from probes.readouts.compare_models import (
        compare_models_report,  # here, not at the top: keeps --help fast
        report_json,
    )

    if args.plots is not None:
        check_plot_folder(args.plots)
    with Stages(total=1, desc=NAME, enabled=progress_on(args.quiet)) as stages, \
            stages.working("statistics from the caches"):
        report = compare_models_report(args.paths, names=args.names, pairs=args.pairs, window=args.window,
                                       update_metrics=args.update_metrics, n_boot=args.n_boot,
                                       seed=args.seed, plots=args.plots)
    if args.json:
        print(json.dumps(report_json(report), ensure_ascii=False, sort_keys=True))
    else:
        print(format_report(report))
    return 0
