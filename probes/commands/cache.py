"""`trajectory-probes cache`: its flags, its run and its printed summary.

The work itself is done by `probes.pipeline.capture`, which a notebook can call directly."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

from probes.commands import SUMMARIES, flags, name_of
from probes.measures.capture import (
    BACKENDS,
    DEFAULT_COMPONENTS,
    POSITIONS,
    STORAGE_DTYPES,
)
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
    flags.traces_flags(p, tokenize=True)
    flags.out_flags(p, what="the .h5 file (its folder must exist)")
    p.add_argument(
        "--sites", nargs="+", default=list(DEFAULT_COMPONENTS), metavar="SITE",
        help="components for every layer (resid_post, delta, attn_out, mlp_out, resid_pre, "
             "resid_mid, ...), explicit sites such as L3.resid_post, or global ones (embed, "
             "ln_final); space- or comma-separated",
    )
    p.add_argument("--positions", choices=POSITIONS, default=CacheConfig.positions,
                   help="tokens that get rows: the trajectory or every token")
    p.add_argument("--dtype", choices=STORAGE_DTYPES, default=CacheConfig.dtype,
                   help="storage dtype of the sites")
    p.add_argument("--chunk-size", type=flags.positive_int, default=CacheConfig.chunk_size,
                   help="tokens per forward through the KV cache")
    p.add_argument("--batch-tokens", type=flags.nonnegative_int,
                   default=CacheConfig.batch_tokens,
                   help="traces up to --chunk-size tokens run several per forward (right-padded) "
                        "up to this many padded tokens, committed together; 0: one per forward")
    p.add_argument("--backend", choices=BACKENDS, default=CacheConfig.backend,
                   help="hf: plain HF forward (residual-level sites); bridge: TransformerLens "
                        "hooks (any site); auto: hf when the sites allow it")
    p.add_argument("--max-ram-mib", type=flags.nonnegative_float, default=CacheConfig.max_ram_mib,
                   help="per-trace output above this size is spooled to a temporary file beside "
                        "--out instead of RAM")
    flags.report_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """`cache`: capture, then print the summary (or JSON)."""
    from probes.pipeline.capture import cache_traces  # here, not at the top: keeps --help fast

    flags.silence_hf()
    sites = tuple(s for item in args.sites for s in item.split(",") if s)
    cfg = CacheConfig(prompt_format=args.prompt_format, scaffold=args.scaffold,
                      sites=sites, positions=args.positions, dtype=args.dtype,
                      chunk_size=args.chunk_size, batch_tokens=args.batch_tokens,
                      limit=args.limit,
                      lexicon=tuple(str(p) for p in args.lexicon), backend=args.backend,
                      max_ram_mib=args.max_ram_mib, strict=args.strict)
    result = cache_traces(args.model, args.traces, args.out, cfg, resume=args.resume,
                          progress=progress_on(args.quiet), device=args.device,
                          model_dtype=args.model_dtype,
                          log=lambda line: print(line, file=sys.stderr, flush=True))
    if args.json:
        print(json.dumps(result.to_dict(), ensure_ascii=False, sort_keys=True))
    else:
        print(format_run(result))
    return 0
