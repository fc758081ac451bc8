"""`trajectory-probes compare`: its flags, its run and its printed summary.

The work itself is done by `probes.readouts.compare`, which a notebook can call directly."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from probes.commands import SUMMARIES, flags, name_of
from probes.pipeline.outputs import check_plot_folder
from probes.pipeline.progress import Stages, progress_on
from probes.readouts.configs import (
    COMPARE_METRICS,
    LAYER_VIEWS,
    STATISTICS,
    UNITS,
    UPDATE_UNITS,
    CompareConfig,
)

if TYPE_CHECKING:
    pass

NAME = name_of(__name__)



def format_report(report: dict[str, Any]) -> str:
    """Human form: the L̂ table, trend and RePro summary; the update table; the behaviour fit."""
    lines = [f"{report['n_traces']} traces from {report['cache']}"]
    if "table_text" in report:
        lines += _format_lhat(report)
        lines.append(report["matching"]["text"])
    if "updates" in report:
        u = report["updates"]
        ctrl = f", random-init control {u['control']}" if u["control"] else ""
        lines.append(f"\nper-token implicit updates ({u['n_traces']} traces, {u['n_layers']} layers{ctrl}):")
        lines.append(u["table_text"])
        sig = [r for r in u["significant"] if r["layer"] != "pooled"]
        lines.append(u["matching"]["text"])
        if sig:
            lines.append(f"significant per-layer effects ({len(sig)}; all rows in --json):")
            for r in sig[:40]:
                rep = {True: ", reproduced by random-init", False: ", not in random-init",
                       None: ""}[r["reproduced_by_random_init"]]
                lines.append(f"  {r['metric']} L{r['layer']}: {r['a']} {r['effect']} than {r['b']} "
                             f"(n = {r['n_traces']}), "
                             f"diff {r['median_diff']:.3g} [{r['ci'][0]:.3g}, {r['ci'][1]:.3g}], "
                             f"Cliff's delta {r['cliffs_delta']:.2f}{rep}")
    if "fit" in report:
        f = report["fit"]
        lines.append("")
        lines += f["text"] if "text" in f else [f"behaviour fit skipped: {f.get('skipped')}"]
    for p in report["plots"]:
        lines.append(f"plot: {p}")
    return "\n".join(lines)


def _format_lhat(report: dict[str, Any]) -> list[str]:
    from probes.readouts.compare import _trend_line  # here, not at the top: keeps --help fast

    t = report["trend"]
    lines = [report["table_text"], _trend_line(t)]
    rp = report["repro"]
    if rp["median_final_score"] is not None:
        lines.append(f"RePro final score (median over {rp['n_traces']} traces): "
                     f"{rp['median_final_score']:.3f}  [{rp['formula']}]")
    if "versus" in report:
        vs = report["versus"]
        lines.append(f"versus {vs['versus']} ({vs['n_pairs']} paired traces):")
        for name, m in vs["metrics"].items():
            if not m.get("testable", True):
                lines.append(f"  {name:<10} median {m['median_a']:.3g} vs {m['median_b']:.3g}, "
                             f"diff {m['median_diff']:.3g} ({m['note']})")
                continue
            lines.append(f"  {name:<10} median {m['median_a']:.3g} vs {m['median_b']:.3g}, "
                         f"diff {m['median_diff']:.3g}, Cliff's delta {m['cliffs_delta']:.2f}, "
                         f"p_holm {m['p_holm']:.2g}")
    return lines


def add_parser(sub: Any) -> None:
    """Register `compare` and its flags."""
    p = sub.add_parser(
        NAME, formatter_class=flags.HelpFormatter,
        help=SUMMARIES[NAME],
        description=(
            "From the cache alone (no model): per-trace aggregates of the chosen per-token metric "
            "for reflection, delimiter and ordinary tokens, each lexicon phrase, and the controls "
            "(matched and paragraph-initial ordinary tokens, shuffled labels), "
            "compared across traces with bootstrap 95% CIs, sign-flip permutation tests, Cliff's "
            "delta and Holm's correction; whether L-hat falls along the trajectory; RePro scores. "
            "For caches with update arrays (from `updates`): the same statistics per layer and "
            "pooled for every upd_* metric, with the shuffled-label null and (--control) a "
            "random-init model; with both, dL-hat regressed on the mechanistic features "
            "(held-out R2, partial R2 of the categories)."
        ),
    )
    p.add_argument("path", type=Path,
                   help="the .h5 cache with L-hat curves (from `lhat`) and/or update arrays "
                        "(from `updates`)")
    p.add_argument("--metric", default=COMPARE_METRICS[0], choices=COMPARE_METRICS,
                   help="per-token quantity: |dL|, dL, RaML's rho, log-ratio, |log-ratio|")
    p.add_argument("--unit", default=UNITS[0], choices=UNITS,
                   help="a phrase counts as a whole, by its first token, or per token")
    p.add_argument("--statistic", default=STATISTICS[0], choices=STATISTICS,
                   help="per-trace aggregate")
    p.add_argument("--raml-notebook", action="store_true",
                   help="RaML notebook's window for phrase changes (one token past the word)")
    p.add_argument("--n-boot", type=flags.positive_int, default=2000, help="bootstrap resamples")
    p.add_argument("--seed", type=flags.seed, default=0, help="seed of controls and bootstrap")
    p.add_argument("--plots", type=Path, default=None, help="folder for PNG plots")
    p.add_argument("--versus", type=Path, default=None,
                   help="a second cache of the same traces (e.g. from `lhat --no-thinking`): "
                        "compare the curves, paired by trace id")
    p.add_argument("--control", type=Path, default=None,
                   help="a cache of the same traces from `updates --control random-init`: repeat "
                        "the update comparisons on it and flag effects it reproduces")
    p.add_argument("--update-metrics", nargs="+", default=None, metavar="NAME",
                   help="upd_* arrays to compare (default: all in the cache)")
    p.add_argument("--update-unit", default=UPDATE_UNITS[0], choices=UPDATE_UNITS,
                   help="update comparison: every token of a phrase or its first token")
    p.add_argument("--layers", default=LAYER_VIEWS[0], choices=LAYER_VIEWS,
                   help="update rows printed: pooled over layers or every layer "
                        "(--json always has all)")
    p.add_argument("--unmatched", action="store_true",
                   help="compare reflection / delimiter tokens with ALL ordinary tokens instead of "
                        "ordinary windows matched on position, frequency and paragraph status")
    p.add_argument("--no-fit", action="store_true",
                   help="skip the regression of dL-hat on the mechanistic features")
    flags.report_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """`compare` from parsed flags."""
    from probes.readouts.compare import (
        compare_cache,  # here, not at the top: keeps --help fast
        report_json,
    )

    if args.plots is not None:
        check_plot_folder(args.plots)
    cfg = CompareConfig(metric=args.metric, unit=args.unit, statistic=args.statistic,
                        raml_notebook=args.raml_notebook, n_boot=args.n_boot, seed=args.seed,
                        plots=args.plots, versus=args.versus, control=args.control,
                        update_metrics=(tuple(args.update_metrics) if args.update_metrics
                                        else None),
                        update_unit=args.update_unit, layers=args.layers, fit=not args.no_fit,
                        matched=not args.unmatched)
    with Stages(total=1, desc=NAME, enabled=progress_on(args.quiet)) as stages, \
            stages.working("statistics from the cache"):
        report = compare_cache(args.path, cfg)
    if args.json:
        print(json.dumps(report_json(report), ensure_ascii=False, sort_keys=True))
    else:
        print(format_report(report))
    return 0
