"""`trajectory-probes lhat`: its flags, its run and its printed summary.

The work itself is done by `probes.pipeline.lhat`, which a notebook can call directly."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

from probes.commands import SUMMARIES, flags, name_of
from probes.pipeline.configs import LhatConfig
from probes.pipeline.progress import progress_on

if TYPE_CHECKING:
    from probes.pipeline.lhat import LhatRunResult

NAME = name_of(__name__)



def format_lhat_run(r: LhatRunResult) -> str:
    """The write loop's summary line plus the curve figures."""
    lines = [r.summary()]
    if r.lhat_first_median is not None:
        lines.append(
            f"median L̂ with no trajectory {r.lhat_first_median:.3g}, after the full trajectory "
            f"{r.lhat_last_median:.3g} (nats / answer token)"
        )
    if r.naive_max_abs_diff is not None:
        lines.append(
            f"per-prefix re-run check: {r.n_naive_prefixes} prefixes, max |fast - naive| = "
            f"{r.naive_max_abs_diff:.2e} nats"
        )
    return "\n".join(lines)


def add_parser(sub: Any) -> None:
    """Register `lhat` and its flags."""

    p = sub.add_parser(
        NAME, formatter_class=flags.HelpFormatter,
        help=SUMMARIES[NAME],
        description=(
            "For every trace compute L-hat_t, the mean NLL of the gold answer when the scaffold "
            "'\\n\\n**Final Answer**\\n\\\\boxed{' and the answer follow the first t trajectory "
            "tokens, for t = 0..T: one chunked prefill plus packed scaffold+answer copies with their "
            "own attention-mask blocks and position ids (equal to re-running every prefix). Writes "
            "lhat [T+1], lhat_delta, lhat_rho, lhat_log_ratio [T] and the label arrays into each "
            "trace group of --out (with --resume an existing cache, e.g. from `cache`, gains them)."
        ),
    )
    flags.model_flags(p)
    flags.traces_flags(p)
    flags.out_flags(p, what="the .h5 cache")
    flags.dataclass_flags(p, LhatConfig)
    flags.report_flags(p, json_help="end with one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """`lhat`: compute, then print the summary (and JSON)."""
    from probes.pipeline.lhat import lhat_traces  # here, not at the top: keeps --help fast

    flags.silence_hf()
    result = lhat_traces(flags.model_from_args(args), flags.source_from_args(args), args.out,
                         flags.config_from_args(LhatConfig, args), resume=args.resume,
                         progress=progress_on(args.quiet),
                         log=lambda line: print(line, file=sys.stderr, flush=True))
    print(format_lhat_run(result), file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(result.to_dict(), sort_keys=True))
    return 0
