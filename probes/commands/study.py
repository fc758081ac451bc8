"""`trajectory-probes study`: its flags, its run and its printed summary.

The work itself is done by `probes.pipeline.study` (the stages) and `probes.readouts.study` (the
comparisons and the report), which a notebook can call directly."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from probes.commands import SUMMARIES, flags, name_of
from probes.models.choices import CONTROLS
from probes.pipeline.configs import DEFAULT_STUDY_ANALYSES, STUDY_ANALYSES, StudyConfig
from probes.pipeline.progress import progress_on

NAME = name_of(__name__)


def add_parser(sub: Any) -> None:
    """Register `study` and its flags."""

    p = sub.add_parser(
        NAME, formatter_class=flags.HelpFormatter,
        help=SUMMARIES[NAME],
        description=(
            "Run every analysis of your model on your traces into one folder: activations.h5 "
            "with --analyses activations, run.h5 (L-hat and updates), anchors.h5, effects.h5, "
            "and with --control random-init lhat-control.h5, random_init.h5 (updates), "
            "effects-control.h5; the comparisons (compare.json, compare-control.json), the "
            "report of the whole folder (report.html) and the "
            "manifest study.json (settings; per stage done or skipped, why, seconds). A stage the "
            "model's family does not support is skipped with the reason. Run the same command "
            "again after an interruption: finished stages are skipped, an interrupted one is "
            "resumed, and the stores equal those of one uninterrupted run."
        ),
    )
    flags.model_flags(p)
    flags.traces_flags(p)
    p.add_argument("--out", type=Path, required=True,
                   help="the study folder (created; a folder of an interrupted study with the "
                        "same settings is finished)")
    p.add_argument("--analyses", type=flags.comma_choices(STUDY_ANALYSES), default=DEFAULT_STUDY_ANALYSES,
                   metavar="A,B,...",
                   help=f"comma-separated, from {', '.join(STUDY_ANALYSES)} (receiver, "
                        "suppression and resampling are the anchors stage; resampling "
                        "generates from the model)")
    p.add_argument("--control", choices=CONTROLS, default=CONTROLS[0],
                   help="random-init: also L-hat, updates and effects of a seeded random "
                        "initialisation of the same architecture, compared beside the model's")
    p.add_argument("--seed", type=flags.seed, default=0, help="seed of --control random-init")
    p.add_argument("--pairs-per-category", type=flags.positive_int,
                   default=StudyConfig.pairs_per_category,
                   help="effects: sampled (layer, token) pairs per category and trace (its cost "
                        "grows with it)")
    flags.report_flags(p, json_help="end with the manifest as one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """`study`: the stages, the comparisons and the report, then the summary (and JSON)."""
    # here, not at the top: keeps --help fast
    from probes.pipeline.study import study_traces
    from probes.readouts.study import READOUT_STEPS

    flags.silence_hf()
    cfg = StudyConfig(analyses=args.analyses, control=args.control, seed=args.seed,
                      pairs_per_category=args.pairs_per_category,
                      limit=args.limit, strict=args.strict,
                      lexicon=tuple(str(p) for p in args.lexicon),
                      prompt_format=args.prompt_format, scaffold=args.scaffold)
    result = study_traces(flags.model_from_args(args), args.traces, args.out, cfg,
                          after=READOUT_STEPS,
                          progress=progress_on(args.quiet),
                          log=lambda line: print(line, file=sys.stderr, flush=True))
    print("\n".join(result.summary()), file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(result.manifest, sort_keys=True, default=str))
    return 0
