"""`trajectory-probes anchors`: its flags, its run and its printed summary.

The work itself is done by `probes.pipeline.anchors`, which a notebook can call directly."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from probes.commands import SUMMARIES, flags, name_of
from probes.measures.anchors import (
    DEFAULT_THRESHOLD,
    PROXIMITY_IGNORE,
    SIMILARITY,
    TOP_K_HEADS,
    ResampleSettings,
)
from probes.pipeline.configs import ANALYSES, DEFAULT_ANALYSES, AnchorsConfig
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


def _analyses(text: str) -> tuple[str, ...]:
    items = tuple(a.strip() for a in text.split(",") if a.strip())
    bad = [a for a in items if a not in ANALYSES]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"choose from {', '.join(ANALYSES)} (comma-separated), "
                                         f"got {text!r}")
    return items


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
    flags.traces_flags(p, tokenize=True)
    flags.out_flags(p, what="the .h5 cache")
    p.add_argument("--analyses", type=_analyses, default=DEFAULT_ANALYSES,
                   help=f"comma-separated subset of {', '.join(ANALYSES)}")
    p.add_argument("--top-heads", type=flags.positive_int, default=TOP_K_HEADS,
                   help="receiver heads: top-k by mean kurtosis")
    p.add_argument("--proximity-ignore", type=flags.nonnegative_int, default=PROXIMITY_IGNORE,
                   help="vertical scores ignore query chunks closer than this")
    p.add_argument("--supp-batch", type=flags.positive_int, default=None,
                   help="masked variants per suppression forward (default: from a 1 GiB budget)")
    p.add_argument("--supp-temperature", type=flags.positive_float, default=1.0,
                   help="temperature of the suppression KL")
    p.add_argument("--k", type=flags.positive_int, default=16, help="resamples per chunk prefix")
    p.add_argument("--temperature", type=flags.nonnegative_float, default=0.6,
                   help="resampling temperature")
    p.add_argument("--top-p", type=flags.unit_interval, default=0.95, help="resampling nucleus mass")
    p.add_argument("--seed", type=flags.seed, default=0, help="resampling seed")
    p.add_argument("--max-new-tokens", type=flags.positive_int, default=None,
                   help="tokens per continuation (default 2 x trajectory length + 64)")
    p.add_argument("--similarity", choices=SIMILARITY, default="exact",
                   help="how a resampled first chunk is judged the same as the original")
    p.add_argument("--embedding-model", default=None,
                   help="local folder of a sentence-embedding model (--similarity embedding)")
    p.add_argument("--threshold", type=flags.probability, default=DEFAULT_THRESHOLD,
                   help="embedding cosine below which a resample is dissimilar")
    p.add_argument("--prob-true", action="store_true",
                   help="counterfactual KL as the binary KL of P(correct)")
    p.add_argument("--plots", type=Path, default=None, metavar="DIR",
                   help="write PNG plots (receiver-head kurtosis, suppression matrix, chunk "
                        "importance of the first trace) into DIR")
    flags.report_flags(p, json_help="end with one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """`anchors`: compute, then print the summary (and JSON)."""
    from probes.pipeline.anchors import anchors_traces  # here, not at the top: keeps --help fast

    flags.silence_hf()
    if args.plots is not None:
        check_plot_folder(args.plots)
    cfg = AnchorsConfig(prompt_format=args.prompt_format, scaffold=args.scaffold,

        analyses=args.analyses, proximity_ignore=args.proximity_ignore, top_heads=args.top_heads,
        supp_batch=args.supp_batch, supp_temperature=args.supp_temperature,
        resample=ResampleSettings(k=args.k, temperature=args.temperature, top_p=args.top_p,
                                     seed=args.seed, max_new_tokens=args.max_new_tokens),
        similarity=args.similarity, embedding_model=args.embedding_model,
        threshold=args.threshold, prob_true=args.prob_true,
        plots=str(args.plots) if args.plots else None, limit=args.limit, strict=args.strict,
        lexicon=tuple(str(p) for p in args.lexicon))
    result = anchors_traces(args.model, args.traces, args.out, cfg, resume=args.resume,
                            device=args.device, dtype=args.model_dtype,
                            progress=progress_on(args.quiet),
                            log=lambda line: print(line, file=sys.stderr, flush=True))
    print(format_anchors_run(result), file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(result.to_dict(), sort_keys=True))
    return 0
