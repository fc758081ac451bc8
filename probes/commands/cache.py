"""`trajectory-probes cache`: its flags, its run and its printed summary.

The work itself is done by `probes.pipeline.capture`, which a notebook can call directly."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

from probes.commands import SUMMARIES, flags, name_of
from probes.pipeline.progress import progress_on

if TYPE_CHECKING:
    pass
from probes.pipeline.configs import CacheConfig

if TYPE_CHECKING:
    from probes.pipeline.capture import CacheRunResult

NAME = name_of(__name__)



def format_run(r: CacheRunResult) -> str:
    """The write loop's summary line plus the capture's figures."""
    lines = [
        r.summary(),
        f"backend {r.backend}: {r.n_tokens:,} tokens run, {r.bytes_sites / 1e6:.1f} MB of sites "
        f"at {r.write_mb_per_s:,.0f} MB/s",
    ]
    if r.nonfinite:
        lines.append(f"warning: {len(r.nonfinite)} trace(s) hold inf/NaN values (float16 "
                     f"overflow?), e.g. {next(iter(r.nonfinite))!r}; use --dtype float32")
    return "\n".join(lines)


def add_parser(sub: Any) -> None:
    """Register `cache` and its flags."""

    p = sub.add_parser(
        NAME, formatter_class=flags.HelpFormatter,
        help=SUMMARIES[NAME],
        description=(
            "Read JSONL traces, tokenize them into prompt/trajectory/scaffold/answer spans, label "
            "every token, run the model over each trace in chunks through its KV cache and write "
            "the chosen sites, stacked over layers as [tokens, layers, d], into one HDF5 file "
            "(schema: cache/SCHEMA.md). Every trace is committed on its own: a killed run keeps "
            "the complete traces and --resume finishes the rest."
        ),
    )
    flags.model_flags(p)
    flags.traces_flags(p)
    flags.out_flags(p, what="the .h5 file (its folder must exist)")
    flags.dataclass_flags(p, CacheConfig)
    flags.report_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """`cache`: capture, then print the summary (or JSON)."""
    from probes.pipeline.capture import cache_traces  # here, not at the top: keeps --help fast

    flags.silence_hf()
    result = cache_traces(flags.model_from_args(args), flags.source_from_args(args), args.out,
                          flags.config_from_args(CacheConfig, args), resume=args.resume,
                          progress=progress_on(args.quiet),
                          log=lambda line: print(line, file=sys.stderr, flush=True))
    if args.json:
        print(json.dumps(result.to_dict(), ensure_ascii=False, sort_keys=True))
    else:
        print(format_run(result))
    return 0
