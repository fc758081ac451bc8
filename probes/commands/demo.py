"""`trajectory-probes demo`: its flags, its run and its printed summary.

The work itself is done by `probes.demo.run`, which a notebook can call directly."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from probes.commands import SUMMARIES, flags, name_of
from probes.errors import ProbesError

if TYPE_CHECKING:
    pass

NAME = name_of(__name__)



def add_parser(sub: Any) -> None:
    """Register `demo` and its flags."""

    p = sub.add_parser(
        NAME, formatter_class=flags.HelpFormatter,
        help=SUMMARIES[NAME],
        description=(
            "Load the built-in `tiny-reasoner` (no download), read its 200 sample traces, tokenize "
            "them into prompt/trajectory/scaffold/answer spans, label every token (reflection, "
            "delimiter, ordinary, ...), score the answers with and without the trajectory, write an "
            "HDF5 cache of the activations, add the L-hat curves and the per-token implicit "
            "updates (and those of a random-init control), compare reflection / delimiter / "
            "ordinary tokens with controls, fit dL-hat on the mechanism, draw plots, sample and "
            "grade trajectories of its own, run small sentence-anchor, causal-edit (V7), "
            "landscape and trajectory-variant analyses, and print a summary. Takes about 100 s "
            "on 2 CPU cores."
        ),
    )
    p.add_argument("--out", type=Path, default=None,
                   help="folder (created) for summary.json, the caches run.h5 and random_init.h5 "
                        "(replaced) and plots/")
    p.add_argument("--limit", type=flags.positive_int, default=None, metavar="N",
                   help="use only the first N sample traces")
    p.add_argument("--device", default="auto", help=flags.DEVICE_HELP)
    p.add_argument("--verbose", action="store_true",
                   help="print every number (the long summary) instead of the short one")
    flags.report_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """`demo` from parsed flags: the pipeline, then (with --out) the HTML report."""
    from probes.demo.run import (
        _later_sections,  # here, not at the top: keeps --help fast
        _with_own_samples,
        format_summary,
        run_demo,
    )
    from probes.pipeline.progress import Stages, progress_on
    from probes.readouts.report.build import report_demo  # here, not at the top: keeps --help fast

    flags.silence_hf()
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        raise ProbesError(f"--out {args.out} is a file; the demo writes a folder: choose another "
                          f"--out")
    progress = progress_on(args.quiet)
    with Stages(total=1, desc=NAME, enabled=progress) as stages, \
            stages.working("scores, cache, L-hat, updates, control, comparison, own samples"):
        summary = run_demo(out=args.out, limit=args.limit, device=args.device)
    report_path, short = (report_demo(args.out, progress=progress)
                          if args.out is not None else (None, []))
    if args.json:
        print(json.dumps(summary, indent=None, sort_keys=True))
    elif args.verbose or report_path is None:
        print(format_summary(summary))
        if report_path is not None:
            print(f"report: {report_path}")
    else:
        short = _with_own_samples(short, summary.get("own_samples"))
        print("\n".join([*short[:-2], *_later_sections(summary), *short[-2:]]))
    return 0
