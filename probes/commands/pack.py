"""`python -m probes.run pack`: copy a cache into one self-contained HDF5 file.

A cache written by this toolkit is a segmented store (`run.h5` plus `run.h5.segments/`, see
cache/SCHEMA.md#segmented-store). `pack` writes its complete traces, bit-exact, into one file with
no external link (for archiving, copying or sharing); the store itself is left as it is.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from probes.commands import SUMMARIES, flags
from probes.errors import ProbesError

if TYPE_CHECKING:
    pass


NAME = "pack"


def pack(source: Path, out: Path, *, overwrite: bool = False) -> dict[str, Any]:
    """Check the paths, then copy every complete trace of `source` into the single file `out`.

    Returns:
        {source, out, n_traces, bytes}.

    Raises:
        ProbesError: `out` is `source`, exists (without `overwrite`), or is not writable.
        CacheError: `source` is not a readable cache, or the copy failed (one line, with the fix).
    """
    from cache import open_cache, pack_cache, store_exists  # here, not at the top: keeps --help fast

    if out.resolve() == source.resolve():
        raise ProbesError(f"--out {out} is the cache itself; choose another file")
    if out.is_dir():
        raise ProbesError(f"--out {out} is a directory; give a file path such as {out / 'packed.h5'}")
    if not out.parent.is_dir():
        raise ProbesError(f"cannot create {out}: folder {out.parent} does not exist; create it "
                          f"first or choose another --out")
    if store_exists(out) and not overwrite:
        raise ProbesError(f"{out} already exists; pass --overwrite to replace it, or choose "
                          f"another --out")
    if not os.access(out.parent, os.W_OK):
        raise ProbesError(f"cannot write {out}: folder {out.parent} is not writable for this user; "
                          f"choose another --out")
    with open_cache(source) as reader:  # a missing / foreign / unreadable cache: one line
        n_complete = len(reader)
    n = pack_cache(source, out)
    return {"source": str(source), "out": str(out), "n_traces": n, "n_complete": n_complete,
            "bytes": out.stat().st_size}


def add_parser(sub: Any) -> None:
    """Register `pack` and its flags."""
    p = sub.add_parser(
        NAME, formatter_class=flags.HelpFormatter,
        help=SUMMARIES[NAME],
        description=(
            "Copy every complete trace of a cache, bit-exact with the same dtypes, chunks and "
            "compression, into one HDF5 file without external links, e.g. to archive or share it. "
            "The cache itself is not changed. Every command reads the packed file; adding to it "
            "with --resume first moves it back into segments."
        ),
    )
    p.add_argument("path", type=Path, help="the cache (its .h5 index file)")
    p.add_argument("--out", type=Path, required=True, help="the single .h5 file to write")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out (a segmented store: its segments folder too)")
    flags.report_flags(p, progress=False)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """`pack` from parsed flags."""
    from probes.pipeline.loop import human_size  # here, not at the top: keeps --help fast

    result = pack(args.path, args.out, overwrite=args.overwrite)
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        print(f"pack: {result['n_traces']} traces -> {result['out']} "
              f"({human_size(result['bytes'])})")
    return 0
