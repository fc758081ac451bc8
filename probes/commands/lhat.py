"""`trajectory-probes lhat`: its flags, its run and its printed summary.

The work itself is done by `probes.pipeline.lhat`, which a notebook can call directly."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

from probes.commands import SUMMARIES, flags, name_of
from probes.measures.lhat import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_MAX_PACK_TOKENS,
)
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
    flags.traces_flags(p, tokenize=True)
    flags.out_flags(p, what="the .h5 cache")
    p.add_argument("--check-naive", type=flags.nonnegative_int, default=0, metavar="K",
                   help="re-run K random prefixes per trace one forward each and report the "
                        "largest |fast - naive|")
    p.add_argument("--no-thinking", action="store_true",
                   help="replace each trajectory by the NoThinking delimiter (write to another --out)")
    p.add_argument("--chunk-size", type=flags.positive_int, default=DEFAULT_CHUNK_SIZE,
                   help="prefill chunk")
    p.add_argument("--max-pack-tokens", type=flags.positive_int, default=DEFAULT_MAX_PACK_TOKENS,
                   help="tokens per packed forward of scaffold+answer copies")
    p.add_argument("--seed", type=flags.seed, default=0, help="seed of the --check-naive prefixes")
    flags.report_flags(p, json_help="end with one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """`lhat`: compute, then print the summary (and JSON)."""
    from probes.pipeline.lhat import lhat_traces  # here, not at the top: keeps --help fast

    flags.silence_hf()
    cfg = LhatConfig(prompt_format=args.prompt_format, scaffold=args.scaffold,
                      check_naive=args.check_naive, seed=args.seed, chunk_size=args.chunk_size,
                     max_pack_tokens=args.max_pack_tokens, limit=args.limit, strict=args.strict,
                     lexicon=tuple(str(p) for p in args.lexicon), no_thinking=args.no_thinking)
    result = lhat_traces(args.model, args.traces, args.out, cfg, resume=args.resume,
                         device=args.device, dtype=args.model_dtype,
                         progress=progress_on(args.quiet),
                         log=lambda line: print(line, file=sys.stderr, flush=True))
    print(format_lhat_run(result), file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(result.to_dict(), sort_keys=True))
    return 0
