"""`trajectory-probes landscape`: its flags, its run and its printed summary.

The work itself is done by `probes.pipeline.landscape`, which a notebook can call directly."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from probes.commands import SUMMARIES, flags, name_of
from probes.pipeline.configs import LandscapeConfig
from probes.pipeline.outputs import check_plot_folder
from probes.pipeline.progress import progress_on

if TYPE_CHECKING:
    from probes.pipeline.landscape import LandscapeRunResult

NAME = name_of(__name__)



def format_landscape_run(r: LandscapeRunResult) -> str:
    """The write loop's summary line plus the landscape figures."""
    lines = [r.summary()]
    if r.captured_path_plane_median is not None:
        lines.append(
            f"median answer NLL: no trajectory {r.nll_no_trajectory_median:.3g}, full context "
            f"{r.nll_full_median:.3g}; endpoint identity max |patched - full| = "
            f"{r.endpoint_max_abs_diff:.1e} nats")
        lines.append(
            f"path variance captured (median): path plane {r.captured_path_plane_median:.3f}, "
            f"random plane {r.captured_random_plane_median:.1e}; shared-weight fraction of the "
            f"per-row path {r.shared_fraction_median:.3f}; {r.seconds_per_grid_median:.1f}s per "
            f"random-plane grid")
    if r.plots:
        lines.append(f"{len(r.plots)} plots in {Path(r.plots[0]).parent}")
    return "\n".join(lines)


def add_parser(sub: Any) -> None:
    """Register `landscape` and its flags."""

    p = sub.add_parser(
        NAME, formatter_class=flags.HelpFormatter,
        help=SUMMARIES[NAME],
        description=(
            "For every trace: the mean answer NLL with the trajectory removed (prompt + scaffold + "
            "answer) at weights theta + x*d1 + y*d2 on an n x n grid, for two seeded random "
            "directions (--style raml: each tensor scaled to its weight's norm, 1-D tensors kept; "
            "--style filter: Li et al. 2018 filter-wise, 1-D tensors zeroed; embeddings and "
            "unembedding never moved), evaluated in batches of grid points (every weight is "
            "affine in x, y: one matmul per layer against [W; d1; d2]). Then the exact "
            "implicit-update path: for every trajectory prefix t the Dherin rank-1 patches of each "
            "layer's MLP weights (M5), which at the end reproduce the full-context answer NLL "
            "without the trajectory (checked per trace); its projection onto the random plane, and "
            "the plane of its top-2 principal directions with the fraction of the path it holds "
            "and a grid over it. Writes land_* arrays into each trace group of --out."
        ),
    )
    flags.model_flags(p)
    flags.traces_flags(p)
    flags.out_flags(p, what="the .h5 cache")
    flags.dataclass_flags(p, LandscapeConfig)
    flags.report_flags(p, json_help="end with one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """`landscape`: compute, then print the summary (and JSON)."""
    from probes.pipeline.landscape import landscape_traces  # here, not at the top: keeps --help fast

    flags.silence_hf()
    if args.plot_dir is not None:
        check_plot_folder(args.plot_dir, "--plot-dir")
    result = landscape_traces(flags.model_from_args(args), flags.source_from_args(args), args.out,
                              flags.config_from_args(LandscapeConfig, args), resume=args.resume,
                              progress=progress_on(args.quiet),
                              log=lambda line: print(line, file=sys.stderr, flush=True))
    print(format_landscape_run(result), file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(result.to_dict(), sort_keys=True))
    return 0
