"""`trajectory-probes report`: its flags, its run and its printed summary.

The work itself is done by `probes.readouts.report.build`, which a notebook can call directly."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from probes.commands import SUMMARIES, flags, name_of
from probes.errors import ProbesError
from probes.pipeline.outputs import check_output_file
from probes.pipeline.progress import progress_on, quiet_flag
from probes.readouts.configs import DEFAULT_VIEWS, FORMATS, ReportConfig

if TYPE_CHECKING:
    pass

NAME = name_of(__name__)



def add_parser(sub: Any) -> None:
    """Register `report` and its flags."""

    p = sub.add_parser(
        NAME, formatter_class=flags.HelpFormatter,
        help=SUMMARIES[NAME],
        description=(
            "From the cache alone (no model): one HTML file that opens offline (plots embedded, no "
            "external scripts) with the run's identity (model, architecture, dtype, versions, "
            "lexicon, traces and tokens per category), the headline findings, token heat maps of a "
            "few traces (each trajectory token coloured by a per-token array such as dL-hat, rho, "
            "sigma or M7; hover for the token, its position and its values), and a section per "
            "analysis in the cache with the tables of `compare` (95% CIs, controls, random-init) "
            "and every plot it draws. --format md writes the same tables as Markdown."
        ),
    )
    p.add_argument("path", type=Path,
                   help="the .h5 cache (from `cache`, `lhat`, `updates`), or a folder of them (a "
                        "`study` or `demo` output: every store, JSON and graded JSONL in it is "
                        "read by what it holds)")
    p.add_argument("--control", type=Path, default=None,
                   help="a cache of the same traces from `updates --control random-init`")
    p.add_argument("--out", type=Path, default=None,
                   help="the report file (default: report.html or report.md next to the cache)")
    p.add_argument("--format", choices=FORMATS, default=FORMATS[0],
                   help="html: one self-contained page; md: its tables as Markdown")
    p.add_argument("--traces", type=flags.nonnegative_int, default=DEFAULT_VIEWS, metavar="N",
                   help="traces shown as token heat maps (those with a reflection first)")
    p.add_argument("--trace-id", action="append", default=[], metavar="ID",
                   help="show this trace as a heat map (repeatable; replaces --traces)")
    p.add_argument("--colour-by", "--color-by", dest="colour_by", default=None, metavar="ARRAY",
                   help="per-token array coloured when the page opens, e.g. lhat_delta, lhat_rho, "
                        "upd_m7 (mean over layers), upd_m7@2 (layer 2); default: lhat_delta")
    p.add_argument("--n-boot", type=flags.positive_int, default=2000, help="bootstrap resamples")
    p.add_argument("--seed", type=flags.seed, default=0, help="seed of controls and bootstrap")
    p.add_argument("--compare-json", type=Path, default=None, metavar="FILE",
                   help="a saved `compare --json` output of this cache (and --control): use its "
                        "numbers and plots instead of running the comparison again")
    p.add_argument("--screenshot", type=Path, default=None, metavar="PNG",
                   help="also save a PNG of the top of the page, rendered by headless Chromium")
    quiet_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """`report` from parsed flags."""
    from probes.readouts.report.build import (
        screenshot,  # here, not at the top: keeps --help fast
        write_report,
    )

    if args.screenshot is not None and args.format != "html":
        raise ProbesError("--screenshot renders the HTML report; drop --format md")
    if args.screenshot is not None:
        check_output_file(args.screenshot, "--screenshot", make_parents=True)
    cfg = ReportConfig(control=args.control, n_views=args.traces, trace_ids=tuple(args.trace_id),
                       colour_by=args.colour_by, n_boot=args.n_boot, seed=args.seed,
                       format=args.format, compare_json=args.compare_json)
    result = write_report(args.path, args.out, cfg, progress=progress_on(args.quiet))
    for note in result.notes:
        print(f"note: {note}")
    if args.screenshot is not None:
        shot = screenshot(result.out, args.screenshot)
        print(f"screenshot: {shot}")
    print(result.summary())
    return 0
