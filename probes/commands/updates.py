"""`trajectory-probes updates`: its flags, its run and its printed summary.

The work itself is done by `probes.pipeline.updates`, which a notebook can call directly."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

from probes.commands import SUMMARIES, flags, name_of
from probes.pipeline.configs import UpdatesConfig
from probes.pipeline.progress import progress_on

if TYPE_CHECKING:
    from probes.pipeline.updates import UpdatesRunResult

NAME = name_of(__name__)



def format_updates_run(r: UpdatesRunResult) -> str:
    """The write loop's summary line (with the control named)."""
    line = r.summary()
    return line if r.control == "none" else f"{line} [control: {r.control}]"


def add_parser(sub: Any) -> None:
    """Register `updates` and its flags."""

    p = sub.add_parser(
        NAME, formatter_class=flags.HelpFormatter,
        help=SUMMARIES[NAME],
        description=(
            "For every trace, at the position that predicts the first answer token (or averaged "
            "over every answer-predicting row with --answer-rows mean), compute per "
            "layer and per trajectory token the attention mass (mean over heads), the summed-head "
            "contribution and leave-one-out norms, the Dai outer-product norm (summed over KV "
            "heads), the Dherin MLP step sizes and consecutive cosine, the descent cosine and "
            "first-order loss change of each MLP step (M6) and each token's first-order effect on "
            "the answer loss through each layer's attention (M7; one forward and one backward per "
            "trace); store them as upd_* float32 [n_layers, T] in each trace group of --out (with "
            "--resume an existing cache gains them). --control random-init uses random weights of "
            "the same architecture (write to another --out)."
        ),
    )
    flags.model_flags(p)
    flags.traces_flags(p)
    flags.out_flags(p, what="the .h5 cache")
    flags.dataclass_flags(p, UpdatesConfig)
    flags.report_flags(p, json_help="end with one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """`updates`: compute, then print the summary (and JSON)."""
    from probes.pipeline.updates import updates_traces  # here, not at the top: keeps --help fast

    flags.silence_hf()
    result = updates_traces(flags.model_from_args(args), flags.source_from_args(args), args.out,
                            flags.config_from_args(UpdatesConfig, args), resume=args.resume,
                            progress=progress_on(args.quiet),
                            log=lambda line: print(line, file=sys.stderr, flush=True))
    print(format_updates_run(result), file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(result.to_dict(), sort_keys=True))
    return 0
