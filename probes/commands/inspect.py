"""`trajectory-probes inspect`: its flags, its run and its printed summary.

The work itself is done by `probes.readouts.inspect`, which a notebook can call directly."""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from probes.commands import SUMMARIES, flags, name_of

if TYPE_CHECKING:
    pass

NAME = name_of(__name__)



def format_inspect(s: Mapping[str, Any]) -> str:
    """A human-readable table of an `inspect_cache` summary."""
    from probes import arrays  # here, not at the top: keeps --help fast
    from probes.pipeline.loop import human_size

    arch = s.get("architecture", {})
    cfg = s.get("config", {})
    lines = [
        f"file:     {s['path']} ({human_size(s['file_bytes'])})",
        f"schema:   v{s['schema_version']} (toolkit {s['toolkit_version']}, created {s['created']})",
        f"model:    {s['model']} ({arch.get('family')}, {arch.get('n_layers')} layers, d_model "
        f"{arch.get('d_model')}, {s['model_dtype']})",
        f"config:   positions {cfg.get('positions')}, storage {cfg.get('storage_dtype')}, "
        f"backend {s.get('info', {}).get('backend', '?')}, chunk "
        f"{s.get('info', {}).get('chunk_size', '?')}",
        f"traces:   {s['n_traces_complete']} complete, {s['n_tokens']:,} tokens",
    ]
    if s.get("segmented"):
        lines.append(f"store:    index + {s['n_segments']} segment files in {s['path']}.segments/ "
                     f"(one file: `pack {s['path']} --out FILE`)")
    elif s.get("segments_beside") == "move":
        lines.append(f"store:    one file, being moved into segments ({s['n_segments']} traces "
                     f"so far in {s['path']}.segments/; a writer with --resume finishes it)")
    elif s.get("segments_beside") == "other":
        lines.append(f"store:    one file; the folder {s['path']}.segments/ beside it is another "
                     f"store's and is ignored (remove it or move it away to add to this file)")
    if s["complete"]:
        lines.append("complete: yes (no interrupted trace)")
    else:
        shown = ", ".join(repr(i) for i in s["incomplete_ids"][:5])
        lines.append(f"complete: no, {s['n_traces_incomplete']} interrupted trace(s) ({shown}); "
                     f"finish with `cache ... --resume`")
    if s["sites"]:
        lines.append("sites:")
        header = f"  {'name':<14} {'dtype':<9} {'shape':<22} {'layers':<14} {'on disk':>10}"
        lines.append(header)
        for name, info in s["sites"].items():
            shape = "[" + ", ".join(str(x) for x in [info["n_rows"], *info["row_shape"]]) + "]"
            layers = info["layers"]
            layer_text = (f"{layers[0]}..{layers[-1]}" if layers and
                          layers == list(range(layers[0], layers[-1] + 1)) else str(layers))
            lines.append(f"  {name:<14} {info['dtype']:<9} {shape:<22} {layer_text:<14} "
                         f"{human_size(info['bytes_on_disk']):>10}")
    for name, info in s.get("arrays", {}).items():
        decl = arrays.BY_NAME.get(name)
        what = f"{decl.axes} {decl.meaning}" if decl else "not declared in probes/arrays.py"
        lines.append(f"array:    {name} ({info['dtype']}, {info['n_traces']} traces, "
                     f"{human_size(info['bytes_on_disk'])}): {what}")
    return "\n".join(lines)


def add_parser(sub: Any) -> None:
    """Register `inspect` and its flags."""

    p = sub.add_parser(
        NAME, formatter_class=flags.HelpFormatter,
        help=SUMMARIES[NAME],
        description=(
            "Open a cache read-only (no model needed) and print its model, schema version, run "
            "config, number of complete and interrupted traces, and every site's dtype, shape "
            "[rows, layers, d], layers and size on disk."
        ),
    )
    p.add_argument("path", type=Path, help="the .h5 cache")
    flags.report_flags(p, progress=False)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """`inspect` from parsed flags."""
    from probes.readouts.inspect import inspect_cache  # here, not at the top: keeps --help fast


    summary = inspect_cache(args.path)
    if args.json:
        print(json.dumps(summary, ensure_ascii=False, sort_keys=True))
    else:
        print(format_inspect(summary))
    return 0
