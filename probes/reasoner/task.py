"""The synthetic reasoning task of `tiny-reasoner`: running sums with planted mistakes and reflections.

A problem is a chain `s op1 d1 op2 d2 ...` (s in 10..89, digits 2..9, every partial result in
0..99). The trajectory works it out one line per step, so the answer exists only at the end of the
computation; some traces plant a wrong step that a reflection ("Wait", "Alternatively", "Let me
recheck", ...) catches and fixes, some reflect on a correct step and confirm it, and every trace ends
with delimiters ("Therefore", "So the answer is", `</think>`). Entry point: `generate_problems`.
Everything is driven by an explicit `random.Random(seed)`: the same seed gives the same traces.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from probes.safe_output import write_file

MIN_START, MAX_START = 10, 89
MIN_VALUE, MAX_VALUE = 0, 99
DIGITS = tuple(range(2, 10))

QUESTION_FORMS = ("Compute {expr}.", "What is {expr}?", "Evaluate {expr}.")
OPENINGS = ("We start from {s}.", "Start with {s}.", "First, take {s}.")
CONCLUSIONS = (
    "Therefore, the result is {v}.",
    "So the answer is {v}.",
    "Thus the total is {v}.",
    "Therefore, after all this, I believe the answer is {v}.",
)
# Reflections that catch a wrong step: {a} {op} {d} = {r} is the corrected line, {w} the wrong value.
CORRECTIONS = (
    "Wait, {a} {op} {d} = {r}, not {w}.",
    "Wait, let me recheck: {a} {op} {d} = {r}.",
    "Hold on, {a} {op} {d} is {r}, not {w}.",
    "Hmm, actually {a} {op} {d} = {r}.",
    "Let me check that again: {a} {op} {d} = {r}.",
    "Alternatively, counting again: {a} {op} {d} = {r}.",
)
# Reflections on a correct step: they re-derive it and confirm.
CONFIRMATIONS = (
    "Let me verify: {a} {op} {d} = {r}. Yes.",
    "Wait, let me double-check: {a} {op} {d} = {r}. Correct.",
)


@dataclass(frozen=True)
class Problem:
    """One generated problem with its reference trajectory.

    Attributes:
        id: Stable identifier (`"tr-<seed>-<index>"`).
        question: The question text, e.g. ``"Compute 37 + 8 + 5 - 6."``.
        trajectory: ``"<think>\\n" ... "</think>"``: the worked computation.
        answer: The final value as a string.
        n_mistakes: How many wrong steps were planted (each is fixed by a reflection).
        n_confirmations: How many correct steps were re-checked.
    """

    id: str
    question: str
    trajectory: str
    answer: str
    n_mistakes: int
    n_confirmations: int

    def to_record(self) -> dict:
        """The JSONL record (`{id, question, trajectory, answer, ...}`) read by `probes.traces`."""
        return {
            "id": self.id,
            "question": self.question,
            "trajectory": self.trajectory,
            "answer": self.answer,
            "n_mistakes": self.n_mistakes,
            "n_confirmations": self.n_confirmations,
            "source": "probes.reasoner.task",
        }


def _apply(a: int, op: str, d: int) -> int:
    return a + d if op == "+" else a - d


def _wrong_value(rng: random.Random, right: int) -> int:
    """A plausible slip: off by one or two, or a carry error of ten."""
    choices = [right + k for k in (-10, -2, -1, 1, 2, 10) if MIN_VALUE <= right + k <= MAX_VALUE]
    return rng.choice(choices)


def _steps(rng: random.Random, n_steps: int) -> tuple[int, list[tuple[str, int]]]:
    """Start value and (op, digit) steps with all partial sums in range and no repeated step."""
    while True:
        start = rng.randint(MIN_START, MAX_START)
        value, steps, used = start, [], set()
        for _ in range(n_steps):
            options = [
                (op, d)
                for op in "+-"
                for d in DIGITS
                if (op, d) not in used and MIN_VALUE <= _apply(value, op, d) <= MAX_VALUE
            ]
            if not options:
                break
            op, d = rng.choice(options)
            used.add((op, d))
            steps.append((op, d))
            value = _apply(value, op, d)
        if len(steps) == n_steps:
            return start, steps


def make_problem(
    rng: random.Random,
    *,
    problem_id: str,
    p_mistake_trace: float = 0.4,
    p_confirm: float = 0.06,
) -> Problem:
    """Draw one problem and write its trajectory.

    Args:
        rng: The source of randomness (the only one).
        problem_id: The id to give the problem.
        p_mistake_trace: Probability that the trace contains planted mistakes (one, sometimes two).
        p_confirm: Probability, per correct step, of a confirming reflection.

    Returns:
        The problem with its trajectory.
    """
    n_steps = rng.randint(4, 7)
    start, steps = _steps(rng, n_steps)
    expr = " ".join([str(start)] + [f"{op} {d}" for op, d in steps])
    question = rng.choice(QUESTION_FORMS).format(expr=expr)
    trajectory, value, n_mistakes, n_conf = write_trajectory(
        rng, start, steps, p_mistake_trace=p_mistake_trace, p_confirm=p_confirm
    )
    return Problem(
        id=problem_id,
        question=question,
        trajectory=trajectory,
        answer=str(value),
        n_mistakes=n_mistakes,
        n_confirmations=n_conf,
    )


def write_trajectory(
    rng: random.Random,
    start: int,
    steps: list[tuple[str, int]],
    *,
    p_mistake_trace: float = 0.4,
    p_confirm: float = 0.06,
) -> tuple[str, int, int, int]:
    """Write one trajectory for the chain `start op1 d1 ...` (`make_problem`'s second half).

    Called again with the same chain and a different `rng`, it gives another trajectory for the same
    question (other opening, planted mistakes, reflections, conclusion): the support-set sweep's
    several trajectories per question.

    Returns:
        (trajectory text, final value, planted mistakes, confirming reflections).
    """
    n_steps = len(steps)
    mistakes: set[int] = set()
    if rng.random() < p_mistake_trace:
        n_wrong = 1 if rng.random() < 0.75 else 2
        mistakes = set(rng.sample(range(n_steps), n_wrong))

    lines = [rng.choice(OPENINGS).format(s=start)]
    value, n_conf = start, 0
    for i, (op, d) in enumerate(steps):
        right = _apply(value, op, d)
        if i in mistakes:
            wrong = _wrong_value(rng, right)
            lines.append(f"{value} {op} {d} = {wrong}.")
            fix = rng.choice(CORRECTIONS).format(a=value, op=op, d=d, r=right, w=wrong)
            lines.append("\n" + fix)  # a reflection opens a paragraph, as in real traces
        else:
            lines.append(f"{value} {op} {d} = {right}.")
            if rng.random() < p_confirm:
                n_conf += 1
                lines.append("\n" + rng.choice(CONFIRMATIONS).format(a=value, op=op, d=d, r=right))
        value = right
    lines.append("\n" + rng.choice(CONCLUSIONS).format(v=value))
    return "<think>\n" + "\n".join(lines) + "\n</think>", value, len(mistakes), n_conf


def generate_problems(n: int, *, seed: int, **kwargs) -> list[Problem]:
    """Generate `n` problems from `seed` (deterministic).

    Args:
        n: How many problems.
        seed: Seed of the private `random.Random`; different seeds give disjoint-looking sets
            (training, evaluation and the shipped samples use different seeds).
        **kwargs: Passed to `make_problem` (`p_mistake_trace`, `p_confirm`).

    Returns:
        The problems, ids `tr-<seed>-<i>`.
    """
    rng = random.Random(seed)
    return [make_problem(rng, problem_id=f"tr-{seed}-{i}", **kwargs) for i in range(n)]


def write_jsonl(problems: list[Problem], path: Path) -> None:
    """Write problems as JSONL trace records."""
    write_file(path, [(json.dumps(p.to_record(), ensure_ascii=False) + "\n").encode("utf-8")
                      for p in problems])
