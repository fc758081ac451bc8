"""`trajectory-probes effects`: its flags, its run and its printed summary.

The work itself is done by `probes.pipeline.effects` (the run) and `probes.readouts.effects` (the
summary read back from the cache), which a notebook can call directly."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from probes.commands import SUMMARIES, flags, name_of
from probes.errors import ProbesError
from probes.pipeline.configs import EffectsConfig
from probes.pipeline.outputs import check_output_file, check_plot_folder
from probes.pipeline.progress import progress_on
from probes.safe_output import write_text

NAME = name_of(__name__)



def add_parser(sub: Any) -> None:
    """Register `effects` and its flags."""

    p = sub.add_parser(
        NAME, formatter_class=flags.HelpFormatter,
        help=SUMMARIES[NAME],
        description=(
            "For every trace, sample (layer, token) pairs per category (reflection, delimiter, "
            "ordinary) and remove exactly that token's update: (a) mask its key for the answer "
            "rows in that layer's attention only, (b) subtract its rank-1 MLP step from that "
            "layer's W_gate/W_up; run each edited model to the answer loss (batched) and store the "
            "real ΔL next to the first-order predictions of M7 and M6 (eff_* arrays). Also the "
            "difference-of-means behaviour directions per layer (Venhoff et al.: window = the "
            "token before an occurrence and up to 10 tokens; written to <out>.directions.npz), "
            "each token's projection on them and the cosine of its M4 residual patch with them "
            "(dir_proj, dir_cos), and a logistic-regression probe's held-out accuracy with a "
            "shuffled-label control. Prints V7 (Pearson, Spearman, median relative error, by "
            "category) and the headline table (mean real ΔL per category with 95% CIs), next to "
            "--versus (e.g. a --control random-init cache)."
        ),
    )
    flags.model_flags(p)
    flags.traces_flags(p)
    flags.out_flags(p, what="the .h5 cache")
    flags.dataclass_flags(p, EffectsConfig)
    p.add_argument("--versus", type=Path, default=None,
                   help="another effects cache (e.g. the random-init control) shown side by side")
    p.add_argument("--plots", type=Path, default=None, help="folder for the predicted-vs-real plot")
    flags.report_flags(p, json_help="end with one JSON object (the summary)")
    p.set_defaults(func=run)


def _check_versus(path: Path) -> None:
    """Refuse a `--versus` that is not a cache holding effects arrays (one line).

    Raises:
        ProbesError, CacheError: Missing, not a cache, or no effects arrays.
    """
    from cache import open_cache  # here, not at the top: keeps --help fast
    from probes.pipeline.effects import DONE_KEY  # here, not at the top: keeps --help fast

    if not path.is_file():
        raise ProbesError(f"--versus {path} does not exist; give an effects cache")
    with open_cache(path) as reader:
        if not any(DONE_KEY in tr.names() for tr in reader):
            raise ProbesError(f"--versus {path} holds no effects arrays; give a cache written by "
                              f"`effects` (e.g. with --control random-init)")


def run(args: argparse.Namespace) -> int:
    """`effects`: compute, store, then print V7 and the headline table."""
    # here, not at the top: keeps --help fast
    from probes.pipeline.effects import directions_path, effects_traces, summary_path
    from probes.readouts.effects import format_summary, summarize

    flags.silence_hf()
    if args.versus is not None:  # before the work, not after it
        _check_versus(Path(args.versus))
    if Path(args.out).parent.is_dir():  # (a missing folder: the store's own check names it)
        for path in (directions_path(args.out), summary_path(args.out)):
            check_output_file(path, "--out")
    if args.plots is not None:
        check_plot_folder(args.plots)
    result = effects_traces(flags.model_from_args(args), flags.source_from_args(args), args.out,
                            flags.config_from_args(EffectsConfig, args), resume=args.resume,
                            progress=progress_on(args.quiet),
                            log=lambda line: print(line, file=sys.stderr, flush=True))
    summary = summarize(args.out, args.versus, args.plots)
    summary["directions"] = result.directions
    summary["run"] = result.to_dict()
    write_text(summary_path(args.out), json.dumps(summary, indent=1, default=str))
    out = sys.stderr if args.json else sys.stdout
    print(result.summary(), file=out)
    print(format_summary(summary, result.directions), file=out)
    if args.json:
        print(json.dumps(summary, default=str))
    return 0
