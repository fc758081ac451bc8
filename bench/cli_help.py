"""Benchmark the command line's start: `--help` of every subcommand as a ratio to `python -c pass`.

Each measurement is a fresh process (`python -m probes.run [SUBCOMMAND] --help`), best of
`--repeats`, interleaved with the baseline `python -c pass` measured in the same run. The goal
(the front-door issue): every `--help` under 1 s, i.e. no subcommand's help imports torch,
transformers or a model. Prints one row per subcommand: seconds, ratio to the baseline, and
whether torch was imported.

Usage:
    python bench/cli_help.py [--repeats 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from probes.commands import SUBCOMMANDS

PROBE = ("import sys, runpy; sys.argv = ['probes.run', *{argv!r}]\n"
         "try:\n    runpy.run_module('probes.run', run_name='__main__')\n"
         "except SystemExit:\n    pass\n"
         "print('TORCH', 'torch' in sys.modules, file=sys.stderr)")


def _time(argv: list[str]) -> tuple[float, bool]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", PROBE.format(argv=argv)] if argv else
                         [sys.executable, "-c", "pass"], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    return seconds, "TORCH True" in out.stderr


def main() -> None:
    """Measure and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    cases = [("(top level)", ["--help"])] + [(name, [name, "--help"]) for name, _, _ in SUBCOMMANDS]
    best: dict[str, float] = {}
    torch_used: dict[str, bool] = {}
    base = float("inf")
    for _ in range(args.repeats):
        base = min(base, _time([])[0])
        for name, argv in cases:
            seconds, used = _time(argv)
            best[name] = min(best.get(name, float("inf")), seconds)
            torch_used[name] = used
    rows = [{"command": name, "seconds": round(best[name], 3),
             "ratio": round(best[name] / base, 1), "imports_torch": torch_used[name]}
            for name, _ in cases]
    if args.json:
        print(json.dumps({"baseline_s": round(base, 4), "rows": rows}, indent=1))
        return
    print(f"baseline `python -c pass`: {base:.3f} s (best of {args.repeats})")
    print(f"{'command':<16} {'seconds':>8} {'× pass':>8}  torch")
    for row in rows:
        print(f"{row['command']:<16} {row['seconds']:>8.3f} {row['ratio']:>8.1f}  "
              f"{'yes' if row['imports_torch'] else 'no'}")


if __name__ == "__main__":
    main()
