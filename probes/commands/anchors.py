"""`trajectory-probes anchors`: its flags, its run and its printed summary.

The work itself is done by `probes.pipeline.anchors`, which a notebook can call directly."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

from probes.commands import SUMMARIES, flags, name_of
from probes.measures.anchors import (
    ResampleSettings,
)
from probes.pipeline.configs import ANALYSES, AnchorsConfig
from probes.pipeline.outputs import check_plot_folder
from probes.pipeline.progress import progress_on

if TYPE_CHECKING:
    from probes.pipeline.anchors import AnchorsRunResult

NAME = name_of(__name__)



def format_anchors_run(r: AnchorsRunResult) -> str:
    """The write loop's summary line plus the anchors figures."""
    lines = [r.summary(), f"{r.n_chunks} chunks written ({', '.join(r.analyses)})"]
    if r.supp_cost_ratio is not None:
        lines.append(f"suppression: {r.supp_forwards} forwards for {r.supp_rows} sequences "
                     f"(1 unmasked + 1 per chunk); cost {r.supp_cost_ratio:.2f}x one unmasked "
                     f"forward per chunk (target <= 2), {r.seconds_suppression:.1f}s")
    if r.n_samples:
        lines.append(f"resampling: {r.n_samples} samples ({r.n_forced} with a forced answer) in "
                     f"{r.seconds_resampling:.1f}s")
    s = r.cache_summary
    if s.get("plots"):
        lines.append(f"plots: {', '.join(s['plots'])}")
    if s.get("receiver_heads"):
        top = ", ".join(f"L{layer}H{h} ({k:.1f})" for layer, h, k in s["receiver_heads"][:5])
        lines.append(f"receiver heads (mean kurtosis): {top}")
    for key, row in s.get("by_category", {}).items():
        parts = [f"{name} {v['mean']:.3g} (n={v['n']})" for name, v in row.items()
                 if name != "meaning" and v["mean"] is not None]
        lines.append(f"{key}: " + ", ".join(parts))
    return "\n".join(lines)


RESAMPLE_FLAGS: dict[str, dict[str, Any]] = {
    "k": {"type": flags.positive_int, "help": "resamples per chunk prefix"},
    "temperature": {"type": flags.nonnegative_float, "help": "resampling temperature"},
    "top_p": {"type": flags.unit_interval, "help": "resampling nucleus mass"},
    "seed": {"type": flags.seed, "help": "resampling seed"},
    "max_new_tokens": {"type": flags.positive_int,
                       "help": "tokens per continuation (default 2 x trajectory length + 64)"},
}
"""The flags of `AnchorsConfig.resample` (`ResampleSettings`, a measure's settings, carries no
flag details of its own)."""

RESAMPLE_NOT_FLAGS: tuple[str, ...] = ("max_answer_tokens", "grade_method", "batch_rows")
"""`ResampleSettings` fields the command line leaves at their defaults."""


def add_parser(sub: Any) -> None:
    """Register `anchors` and its flags."""

    p = sub.add_parser(
        NAME, formatter_class=flags.HelpFormatter,
        help=SUMMARIES[NAME],
        description=(
            "Split every trajectory into sentence chunks (paragraphs, lines, sentence ends, "
            "</think>; never inside $...$) and label them by the lexicon phrase they open with; "
            "then, per --analyses: receiver-head vertical scores and kurtosis per layer x head, "
            "the attention-suppression KL matrix and answer-NLL change of masking each chunk, "
            "and resampling importance (K samples from every chunk prefix with the model itself, "
            "graded; counterfactual and forced-answer importance). Writes chunk_spans, "
            "chunk_category and anc_* arrays into each trace group of --out."
        ),
    )
    flags.model_flags(p)
    flags.traces_flags(p)
    flags.out_flags(p, what="the .h5 cache")
    flags.dataclass_flags(p, AnchorsConfig, meta={"analyses": {"type": flags.comma_choices(ANALYSES)}})
    flags.dataclass_flags(p, ResampleSettings, skip=RESAMPLE_NOT_FLAGS, meta=RESAMPLE_FLAGS)
    flags.report_flags(p, json_help="end with one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """`anchors`: compute, then print the summary (and JSON)."""
    from probes.pipeline.anchors import anchors_traces  # here, not at the top: keeps --help fast

    flags.silence_hf()
    if args.plots is not None:
        check_plot_folder(args.plots)
    cfg = flags.config_from_args(AnchorsConfig, args,
                                 resample=flags.config_from_args(ResampleSettings, args))
    result = anchors_traces(flags.model_from_args(args), flags.source_from_args(args), args.out,
                            cfg, resume=args.resume,
                            progress=progress_on(args.quiet),
                            log=lambda line: print(line, file=sys.stderr, flush=True))
    print(format_anchors_run(result), file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(result.to_dict(), sort_keys=True))
    return 0
