"""The synthetic task: arithmetic is right, mistakes are planted and fixed, generation is seeded."""

from __future__ import annotations

import re

import pytest

from probes.reasoner.task import generate_problems
from probes.reasoner.tokenizer import build_tokenizer

STEP = re.compile(r"^(\d+) ([+-]) (\d) = (\d+)\.$")
REFLECTION = re.compile(r"(?i)\b(wait|alternatively|let me recheck|let me check|hold on|hmm)\b")


@pytest.fixture(scope="module")
def problems():
    return generate_problems(400, seed=11)


def _walk(problem):
    """Replay a trajectory: yields (line, expected value) and checks the chain of values."""
    body = problem.trajectory.removeprefix("<think>\n").removesuffix("\n</think>")
    lines = [ln for ln in body.split("\n") if ln]
    start = int(re.search(r"\d+", lines[0]).group())
    return start, lines[1:]


def test_same_seed_same_problems_other_seed_other_problems():
    a = generate_problems(50, seed=5)
    assert a == generate_problems(50, seed=5)
    assert [p.question for p in a] != [p.question for p in generate_problems(50, seed=6)]


def test_trajectory_computes_the_answer_and_every_mistake_is_fixed(problems):
    for p in problems:
        value, lines = _walk(p)
        expr = re.search(r"(\d+(?: [+-] \d)+)", p.question).group(1).split()
        steps = list(zip(expr[1::2], map(int, expr[2::2]), strict=True))
        assert int(expr[0]) == value
        i, n_wrong = 0, 0
        for line in lines:
            m = STEP.match(line)
            if m:  # an ordinary step: it uses the current value and the next operand
                a, op, d, r = int(m[1]), m[2], int(m[3]), int(m[4])
                assert (a, (op, d)) == (value, steps[i])
                right = a + d if op == "+" else a - d
                if r != right:
                    n_wrong += 1
                i += 1
                value = right  # a wrong line is followed by a reflection with the right value
            else:  # a reflection or a conclusion: it states the current (right) value
                nums = [int(x) for x in re.findall(r"\d+", line)]
                assert value in nums, (p.id, line)
        assert i == len(steps)
        assert n_wrong == p.n_mistakes
        assert p.answer == str(value)
        assert re.search(rf"\b{value}\.$", lines[-1])


def test_reflections_in_enough_traces_and_answers_spread(problems):
    with_reflection = sum(bool(REFLECTION.search(p.trajectory)) for p in problems)
    assert with_reflection / len(problems) >= 0.2
    assert sum(p.n_mistakes > 0 for p in problems) / len(problems) >= 0.2
    answers = {p.answer for p in problems}
    assert len(answers) >= 60  # answers are spread over 0..99, not guessable from a few values
    for p in problems:
        assert "Therefore" in p.trajectory or "So the answer is" in p.trajectory or "Thus" in p.trajectory
        assert p.trajectory.startswith("<think>\n") and p.trajectory.endswith("\n</think>")


def test_tokenizer_round_trips_and_splits_digits(problems):
    texts = [p.question for p in problems] + [p.trajectory for p in problems]
    tok = build_tokenizer(texts, vocab_size=300)
    assert len(tok) == 300
    for p in problems[:50]:
        ids = tok(p.trajectory, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == p.trajectory
        assert ids[0] == tok.convert_tokens_to_ids("<think>")
        assert ids[-1] == tok.convert_tokens_to_ids("</think>")
    pieces = tok.convert_ids_to_tokens(tok("Wait, 45 + 7 = 52.", add_special_tokens=False)["input_ids"])
    assert "4" in pieces and "5" in pieces and "45" not in pieces
    # deterministic: the same corpus gives the same vocabulary
    assert build_tokenizer(texts, vocab_size=300).get_vocab() == tok.get_vocab()
