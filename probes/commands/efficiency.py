"""`trajectory-probes efficiency`: its flags, its run and its printed summary.

The work itself is done by `probes.readouts.efficiency`, which a notebook can call directly."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from probes.commands import SUMMARIES, flags, name_of
from probes.errors import ProbesError
from probes.pipeline.outputs import check_plot_folder
from probes.pipeline.progress import Stages, progress_on
from probes.readouts.text import num as _num

if TYPE_CHECKING:
    pass

NAME = name_of(__name__)



def format_report(report: dict[str, Any]) -> str:
    """Human form: the measures' medians, their relation to length, the variant comparison."""
    from analyses.efficiency import verdict  # here, not at the top: keeps --help fast

    lines = [f"{report['n_traces']} traces from {report['cache']}",
             "per-trace measures (median [95% CI], n):"]
    for m, s in report["summary"].items():
        lines.append(f"  {m:<14} {_num(s['median'], '.4g'):>9} [{_num(s['ci'][0], '.4g')}, "
                     f"{_num(s['ci'][1], '.4g')}]  n={s['n']}")
    lines.append("Spearman correlation with trajectory length [95% CI], Holm p:")
    for r in report["length_relation"]:
        lines.append(f"  {r['measure']:<14} {_num(r['spearman'], '.3f'):>7} [{_num(r['ci'][0], '.3f')}, "
                     f"{_num(r['ci'][1], '.3f')}]  p_holm {_num(r['p_holm'], '.2g')}  n={r['n']}")
    if "variants" in report:
        v = report["variants"]
        lines.append("variants (median final L̂, tokens to 90%, tokens until it stays within 90%, "
                     "length): " + "; ".join(
                         f"{k} {_num(x['final'], '.3g')}, {_num(x['tokens_to_90'], '.3g')}, "
                         f"{_num(x['stay_to_90'], '.3g')}, {_num(x['length'], '.3g')} (n={x['n']})"
                         for k, x in v["per_variant"].items()))
        lines.append("paired by group (A − B: median difference [95% CI], Cliff's delta, Holm p):")
        for r in v["rows"]:
            lo, hi = r["ci_median_diff"]
            lines.append(f"  {r['a']} vs {r['b']} {r['metric']:<13} {_num(r['median_diff'], '.3g')} "
                         f"[{_num(lo, '.3g')}, {_num(hi, '.3g')}], delta {_num(r['cliffs_delta'], '.2f')}, "
                         f"p_holm {_num(r['p_holm'], '.2g')} ({r['n_pairs']} pairs): {r['a']} "
                         f"{verdict(r)}")
    for p in report["plots"]:
        lines.append(f"plot: {p}")
    return "\n".join(lines)


def add_parser(sub: Any) -> None:
    """Register `efficiency` and its flags."""

    p = sub.add_parser(
        NAME, formatter_class=flags.HelpFormatter,
        help=SUMMARIES[NAME],
        description=(
            "From a cache with L-hat curves (from `lhat`), no model: per trace the final drop of "
            "L-hat, the tokens needed to reach 50% and 90% of it, the area under the normalised "
            "remaining-drop curve and the drop per 100 tokens, with medians (bootstrap 95% CIs) "
            "and their Spearman correlation with trajectory length (bootstrap CIs, Holm). With "
            "--traces (the JSONL the cache was made from, records with `group` and `variant`), "
            "variants of the same question (e.g. summary or direct against original) compared "
            "pair by pair on final L-hat and tokens-to-90%: Wilcoxon signed-rank, bootstrap CI of "
            "the median within-group difference, Cliff's delta, Holm. See docs/methods.md#efficiency."
        ),
    )
    p.add_argument("path", type=Path, help="the .h5 cache with L-hat curves (from `lhat`)")
    p.add_argument("--traces", type=Path, default=None,
                   help="the JSONL the cache was made from; its `group` / `variant` fields pair "
                        "the variants")
    p.add_argument("--pairs", nargs="+", default=None, metavar="A:B",
                   help="variant pairs compared as A - B (default: every variant against "
                        "`original`, else against the first variant seen)")
    p.add_argument("--n-boot", type=flags.positive_int, default=2000, help="bootstrap resamples")
    p.add_argument("--seed", type=flags.seed, default=0, help="bootstrap seed")
    p.add_argument("--plots", type=Path, default=None, help="folder for a PNG of the variants' curves")
    flags.report_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """`efficiency` from parsed flags."""
    from probes.readouts.efficiency import (
        efficiency_report,  # here, not at the top: keeps --help fast
        parse_pairs,
        report_json,
    )

    if args.plots is not None:
        check_plot_folder(args.plots)
    pairs = parse_pairs(args.pairs)
    if pairs is not None and args.traces is None:
        raise ProbesError("--pairs compares variants, which come from the traces' `group` / "
                          "`variant` fields: add --traces F.jsonl")
    with Stages(total=1, desc=NAME, enabled=progress_on(args.quiet)) as stages, \
            stages.working("statistics from the cache"):
        report = efficiency_report(args.path, args.traces, pairs=pairs, n_boot=args.n_boot,
                                   seed=args.seed, plots=args.plots)
    if args.json:
        print(json.dumps(report_json(report), ensure_ascii=False, sort_keys=True))
    else:
        print(format_report(report))
    return 0
