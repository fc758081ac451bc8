"""`trajectory-probes fit`: its flags, its run and its printed summary.

The work itself is done by `probes.pipeline.fit`, which a notebook can call directly."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from probes.commands import SUMMARIES, flags, name_of
from probes.jsonable import jsonable
from probes.pipeline.configs import FitConfig
from probes.pipeline.outputs import check_output_file
from probes.pipeline.progress import Stages, progress_on
from probes.safe_output import write_text

if TYPE_CHECKING:
    pass

NAME = name_of(__name__)



def _fmt(x: Any, spec: str = ".3f") -> str:
    return "nan" if x is None or (isinstance(x, float) and x != x) else format(x, spec)


def format_fit_report(r: dict[str, Any]) -> str:
    """Human form of `fit_traces`'s report."""
    from probes.pipeline.fit import MIN_MASKING_LOSS  # here, not at the top: keeps --help fast

    models = [("trained", r["trained"])] + ([("random-init", r["random_init"])]
                                            if "random_init" in r else [])
    lines = [f"fits on {r['n_traces']} traces of {r['traces']} ({r['model']}, {r['seconds']:.1f}s)"]
    lines.append("(a) leave-one-out change of the answer row (M4) regressed on the pseudo-gradient "
                 "term (M3), held-out R² by trace (GroupKFold):")
    lines.append("  model        layer  eta        R2 scalar  R2 map  R2 value-map  R2 value-scalar")
    for name, m in models:
        pg = m["pseudo_gradient"]
        for i, layer in enumerate(pg["layers"]):
            lines.append(
                f"  {name:<12} {layer:>5}  {_fmt(pg['eta'][i], '.3g'):<9}  "
                f"{_fmt(pg['r2_scalar'][i]):>9}  {_fmt(pg['r2_map'][i]):>6}  "
                f"{_fmt(pg['r2_value_map'][i]):>12}  {_fmt(pg['r2_value_scalar'][i]):>15}"
            )
    lines.append("(b) static thought patch: median over traces of the held-out R² over queries "
                 "[95% CI]:")
    for name, m in models:
        for which, tp in m["thought_patch"].items():
            cells = ", ".join(f"L{row['layer']} {_fmt(row['median_r2_heldout'])} "
                              f"[{_fmt(row['ci'][0])}, {_fmt(row['ci'][1])}]" for row in tp["layers"])
            lines.append(f"  {name:<12} W_{which:<4} {cells}")
    for name, m in models:
        nll = m.get("thought_patch_nll")
        if nll:
            sr = nll["share_recovered"]
            lines.append(
                f"(b') {name}: answer NLL (median over {nll['n_traces']} traces) clean "
                f"{_fmt(nll['nll_clean']['median'], '.3g')}, trajectory masked "
                f"{_fmt(nll['nll_masked']['median'], '.3g')}, exact patches "
                f"{_fmt(nll['nll_exact']['median'], '.3g')}, static patch fitted on the scaffold "
                f"rows {_fmt(nll['nll_static']['median'], '.3g')}; share of the masking loss it "
                f"recovers {_fmt(sr['median'], '.2f')} [{_fmt(sr['ci'][0], '.2f')}, "
                f"{_fmt(sr['ci'][1], '.2f')}] ({nll['n_share_recovered']} traces where masking "
                f"costs > {MIN_MASKING_LOSS} nats)"
            )
    return "\n".join(lines)


def add_parser(sub: Any) -> None:
    """Register `fit` and its flags."""

    p = sub.add_parser(
        NAME, formatter_class=flags.HelpFormatter,
        help=SUMMARIES[NAME],
        description=(
            "Needs the model. (a) Per layer: the exact leave-one-out change of the answer row's "
            "attention output caused by each trajectory token, regressed on the token's "
            "pseudo-gradient term (Dai dual form acting on the answer query): scalar implicit "
            "learning rate and a d x d map, against a value-only baseline; held-out R2 with "
            "GroupKFold by trace. (b) Per trace and layer: one static Ridge patch of W_gate / W_up "
            "replacing the exact per-query rank-1 patches of the scaffold + answer rows; held-out "
            "R2 over queries; and the answer NLL when it replaces the trajectory on the answer "
            "rows. dL-hat explained by the stored features runs in `compare`."
        ),
    )
    flags.model_flags(p)
    flags.traces_flags(p, limit_help="use only the first N traces (>= 2)", lexicon=False)
    p.add_argument("--out", type=Path, default=None, help="also write the JSON report here")
    flags.dataclass_flags(p, FitConfig)
    flags.report_flags(p, json_help="print one JSON object instead of tables")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """`fit` from parsed flags."""
    from probes.pipeline.fit import fit_traces  # here, not at the top: keeps --help fast

    flags.silence_hf()
    if args.out is not None:
        check_output_file(args.out, "--out")
    with Stages(total=1, desc=NAME, enabled=progress_on(args.quiet)) as stages, \
            stages.working("model passes and fits"):
        report = jsonable(fit_traces(flags.model_from_args(args), flags.source_from_args(args),
                                     flags.config_from_args(FitConfig, args)))
    if args.out is not None:
        write_text(args.out, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        print(f"fit: report written to {args.out}", file=sys.stderr)
    if args.json:
        print(json.dumps(report, ensure_ascii=False, sort_keys=True))
    else:
        print(format_fit_report(report))
    return 0
