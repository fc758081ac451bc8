"""Paired trajectory variants of the reasoner's problems: original, direct and summary.

For each problem the same question and answer get three trajectories, written as JSONL records
with `group` (the problem id) and `variant`:

* `original`: the problem's own trajectory (with its planted mistakes, reflections and
  confirmations: the detours);
* `direct`: the minimal trajectory: the same opening, one line per step with the right value, the
  same conclusion; no detours;
* `summary`: fewer, merged steps: the same opening, two steps per line (`a + 3 - 5 = r.`), the same
  conclusion.

The variants are rebuilt from the question's expression and the original trajectory's first and
last lines, so the sample problems (`probes/data/tiny_reasoner_traces.jsonl`) stay exactly as they
are. The shipped file `probes/data/tiny_reasoner_variants.jsonl` (`VARIANTS_PATH`) holds the first
`N_VARIANT_GROUPS` sample problems that have a detour; regenerate it with
`python -m probes.reasoner.variants`.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from probes import DATA_DIR
from probes.reasoner.task import Problem, generate_problems
from probes.safe_output import write_file

VARIANTS_PATH = DATA_DIR / "tiny_reasoner_variants.jsonl"
N_VARIANT_GROUPS = 12
"""Problems (groups) in the shipped variants file; three traces each."""
VARIANTS = ("original", "direct", "summary")
"""The variant names, in the order written."""
MERGE = 2
"""Steps merged into one line of the summary."""

_EXPR = re.compile(r"(\d+)((?:\s*[+-]\s*\d+)+)")
_STEP = re.compile(r"([+-])\s*(\d+)")


def parse_steps(question: str) -> tuple[int, list[tuple[str, int]]]:
    """The start value and (op, digit) steps of a task question such as "Compute 37 + 8 - 5.".

    Raises:
        ValueError: The question holds no `s op d ...` expression.
    """
    match = _EXPR.search(question)
    if match is None:
        raise ValueError(f"no running-sum expression in question {question!r}")
    return int(match.group(1)), [(op, int(d)) for op, d in _STEP.findall(match.group(2))]


def _value_after(start: int, steps: list[tuple[str, int]]) -> list[int]:
    out, v = [], start
    for op, d in steps:
        v = v + d if op == "+" else v - d
        out.append(v)
    return out


def variant_trajectories(p: Problem) -> dict[str, str]:
    """The three trajectories of one problem, keyed by variant name (`VARIANTS`).

    The direct and summary trajectories keep the original's opening line (the first line after
    `<think>`) and conclusion (the last line before `</think>`) and end on the same value.
    """
    body = p.trajectory.removeprefix("<think>\n").removesuffix("\n</think>")
    lines = body.split("\n")
    opening, conclusion = lines[0], lines[-1]
    start, steps = parse_steps(p.question)
    values = _value_after(start, steps)
    if str(values[-1]) != p.answer:
        raise ValueError(f"problem {p.id}: the expression gives {values[-1]}, the answer is {p.answer}")
    direct, prev = [], start
    for (op, d), v in zip(steps, values, strict=True):
        direct.append(f"{prev} {op} {d} = {v}.")
        prev = v
    summary, prev = [], start
    for i in range(0, len(steps), MERGE):
        chunk = steps[i:i + MERGE]
        v = values[i + len(chunk) - 1]
        summary.append(f"{prev} " + " ".join(f"{op} {d}" for op, d in chunk) + f" = {v}.")
        prev = v

    def wrap(step_lines: list[str]) -> str:
        return "<think>\n" + "\n".join([opening, *step_lines, "", conclusion]) + "\n</think>"

    return {"original": p.trajectory, "direct": wrap(direct), "summary": wrap(summary)}


def variant_records(p: Problem) -> list[dict]:
    """The JSONL records of one problem's variants: id `"<problem id>/<variant>"`, `group` = the
    problem id, `variant`, and the question and answer of the problem."""
    return [
        {"id": f"{p.id}/{name}", "group": p.id, "variant": name, "question": p.question,
         "trajectory": traj, "answer": p.answer, "source": "probes.reasoner.variants"}
        for name, traj in variant_trajectories(p).items()
    ]


def variant_problems(n_groups: int = N_VARIANT_GROUPS, *, seed: int = 2, pool: int = 200) -> list[Problem]:
    """The first `n_groups` of the `pool` problems of `seed` that have a detour (a planted mistake
    or a confirmation), so the original and direct trajectories differ. Seed 2 and pool 200 are
    the shipped sample traces."""
    picked = [p for p in generate_problems(pool, seed=seed) if p.n_mistakes + p.n_confirmations > 0]
    if len(picked) < n_groups:
        raise ValueError(f"only {len(picked)} of {pool} problems have a detour; need {n_groups}")
    return picked[:n_groups]


def write_variants(path: Path, n_groups: int = N_VARIANT_GROUPS) -> int:
    """Write the variants file; returns the number of records."""
    records = [r for p in variant_problems(n_groups) for r in variant_records(p)]
    write_file(path, [(json.dumps(r, ensure_ascii=False) + "\n").encode("utf-8") for r in records])
    return len(records)


def main(argv: list[str] | None = None) -> int:
    """CLI: regenerate the shipped variants file."""
    parser = argparse.ArgumentParser(prog="python -m probes.reasoner.variants", description=__doc__)
    parser.add_argument("--out", type=Path, default=VARIANTS_PATH, help="output JSONL")
    parser.add_argument("--groups", type=int, default=N_VARIANT_GROUPS, help="problems (groups)")
    args = parser.parse_args(argv)
    n = write_variants(args.out, args.groups)
    print(f"wrote {n} traces to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
