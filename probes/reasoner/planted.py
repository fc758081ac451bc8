"""The task of `tiny-reasoner-planted`: a code read out part by part, one slip fixed by a reflection.

A problem asks for an n-part code (n in 4..6, every part a two-digit number 10..99, drawn
uniformly and independently). The trajectory writes the code so far one line per part ("So far:
31-47."), so each correct line reveals one more part of the answer (`"31-47-52-18"`) and L̂ falls
step by step; nothing in the question predicts a part. In a share of the traces (`P_SLIP_TRACE`)
one part is written with a *slip*: its tens digit one too high (9 wraps to 1, so a slipped value is
again uniform on 10..99 and cannot be told from a right one), and the very next line is a
reflection ("Wait, so far: 31-47.", "Hold on, ...", "Hmm, ...") that restates the code right. Every slip
is the same kind, so the reflection word alone tells a reader which value the right one is: the
ground truth is that L̂ rises at the slipped line (the copied value is wrong) and falls at the
reflection phrase by about the slipped part's loss. There are no other reflections (no
confirmations) and reflections never open a paragraph, so the reflection phrase is the one place
the slip is revealed.

Each record carries its ground truth in its meta fields: `slip_part` (1-based, or null),
`reflection_span` (the reflection line's [start, end) characters in the trajectory) and
`phrase_span` (the reflection phrase's characters), beside `n_mistakes`/`n_confirmations` as in
`probes.reasoner.task`. Entry point: `generate_problems` (deterministic in its seed).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from probes import DATA_DIR
from probes.reasoner.task import Problem

SAMPLES_PATH = DATA_DIR / "tiny_reasoner_planted_traces.jsonl"
"""The shipped sample traces of `tiny-reasoner-planted` (200, seed `SAMPLE_SEED` of train.py)."""
MIN_PARTS, MAX_PARTS = 4, 6
P_SLIP_TRACE = 0.6
"""Share of traces with one slipped part (and its correcting reflection)."""

QUESTION_FORMS = ("What is the {n}-part code?", "Read out the {n}-part code.", "Give the code ({n} parts).")
OPENINGS = ("The code has {n} parts.", "There are {n} parts.")
LINE = "So far: {code}."
# Each correcting reflection holds exactly one lexicon phrase (probes/data/lexicon.json), first.
CORRECTIONS = (
    ("Wait", "Wait, so far: {code}."),
    ("Hold on", "Hold on, so far: {code}."),
    ("Hmm", "Hmm, so far: {code}."),
)
CONCLUSION = "Therefore, the code is {code}."


def slip(value: int) -> int:
    """The planted slip: the tens digit one too high, 9 wrapping to 1 (10..99 onto itself)."""
    tens, ones = divmod(value, 10)
    return (tens % 9 + 1) * 10 + ones


@dataclass(frozen=True)
class PlantedProblem(Problem):
    """A `Problem` of the planted task with its ground truth.

    Attributes:
        slip_part: The 1-based part stated with a slip and then corrected, or None.
        reflection_span: [start, end) characters of the correcting reflection line in the
            trajectory, or None.
        phrase_span: [start, end) characters of its reflection phrase ("Wait", ...), or None.
    """

    slip_part: int | None = None
    reflection_span: tuple[int, int] | None = None
    phrase_span: tuple[int, int] | None = None

    def to_record(self) -> dict:
        """The JSONL record; the ground truth fields reach `Trace.meta`."""
        return super().to_record() | {
            "source": "probes.reasoner.planted",
            "slip_part": self.slip_part,
            "reflection_span": None if self.reflection_span is None else list(self.reflection_span),
            "phrase_span": None if self.phrase_span is None else list(self.phrase_span),
        }


def make_problem(rng: random.Random, *, problem_id: str, p_slip: float = P_SLIP_TRACE) -> PlantedProblem:
    """Draw one code and write its trajectory (with a slip and its reflection with probability `p_slip`)."""
    n = rng.randint(MIN_PARTS, MAX_PARTS)
    parts = [rng.randint(10, 99) for _ in range(n)]
    slipped = rng.randrange(n) if rng.random() < p_slip else None
    question = rng.choice(QUESTION_FORMS).format(n=n)
    text = "<think>\n" + rng.choice(OPENINGS).format(n=n)
    reflection = phrase = None
    for i, v in enumerate(parts):
        code = "-".join(str(x) for x in parts[: i + 1])
        if i == slipped:
            text += "\n" + LINE.format(code="-".join(str(x) for x in [*parts[:i], slip(v)]))
            word, form = rng.choice(CORRECTIONS)
            start = len(text) + 1
            text += "\n" + form.format(code=code)
            reflection, phrase = (start, len(text)), (start, start + len(word))
        else:
            text += "\n" + LINE.format(code=code)
    text += "\n\n" + CONCLUSION.format(code="-".join(str(x) for x in parts)) + "\n</think>"
    return PlantedProblem(
        id=problem_id,
        question=question,
        trajectory=text,
        answer="-".join(str(v) for v in parts),
        n_mistakes=int(slipped is not None),
        n_confirmations=0,
        slip_part=None if slipped is None else slipped + 1,
        reflection_span=reflection,
        phrase_span=phrase,
    )


def generate_problems(n: int, *, seed: int, p_slip: float = P_SLIP_TRACE) -> list[Problem]:
    """Generate `n` planted problems from `seed` (deterministic), ids `pl-<seed>-<i>`."""
    rng = random.Random(seed)
    return [make_problem(rng, problem_id=f"pl-{seed}-{i}", p_slip=p_slip) for i in range(n)]


def phrase_tokens(tt) -> list[int]:
    """The trajectory token indices of a tokenized planted trace's reflection phrase (its
    `phrase_span` meta); empty for a trace without a slip.

    Args:
        tt: A `probes.traces.tokenize.TokenizedTrace` of a record written by this module.
    """
    span = tt.trace.meta.get("phrase_span")
    if span is None:
        return []
    shift = len(tt.trace.trajectory) - len(tt.trajectory_text)  # a `<think>` the prompt already holds
    a, b = span[0] - shift, span[1] - shift
    return [i for i, (s, e) in enumerate(tt.trajectory_offsets.tolist()) if s < b and e > a]
