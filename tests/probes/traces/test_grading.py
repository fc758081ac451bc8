"""Answer extraction and grading: a table of (non-)equivalent pairs and the real MATH traces."""

from __future__ import annotations

import json

import pytest

from probes.errors import ProbesError
from probes.traces.grading import answers_match, extract_answer, grade, normalize

pytest.importorskip("math_verify")


@pytest.mark.parametrize(("text", "expected"), [
    (r"so \boxed{1} or rather \boxed{\frac{1}{2}}", r"\frac{1}{2}"),               # the last one
    (r"\boxed{\left\{ x \mid x^{2} > 1 \right\}}", r"\left\{ x \mid x^{2} > 1 \right\}"),  # nested
    (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),                                              # escaped braces
    ("<think>\nwork\n</think>\n\nThe answer is 7.", "The answer is 7."),             # after </think>
    ("<think>a</think> b </think>\n 12 \n", "12"),                                   # the last </think>
    ("<think>\nstill thinking", None),                                               # truncated
    ("<think>x</think>\n  \n", None),                                                # empty answer
    (r"\boxed{unclosed", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


EQUIVALENT = [
    (r"\frac{1}{2}", "0.5"),
    (r"\dfrac{3}{4}", r"\frac34"),
    ("1/2", r"\frac{1}{2}"),
    (r"x = 3", "3"),
    (r"[1, 2)", r"\left[1, 2\right)"),
    (r"(-\infty, 0] \cup [1, \infty)", r"(-\infty,0]\cup[1,\infty)"),
    (r"3\sqrt{2}", r"\sqrt{18}"),
    (r"\{1, 2\}", r"\{2, 1\}"),
    (r"\$30", "30"),
    (r"135,\!000", "135000"),
    (r"\dfrac{2469}{20000}", r"\dfrac{2469}{20,\!000}"),
    (r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}"),
    ("  42. ", "42"),
]
NOT_EQUIVALENT = [
    ("5", "6"),
    (r"(1, 2]", "[1, 2]"),
    (r"\frac{1}{3}", "0.33"),
    (r"-\frac{\sqrt{3}}{2}", r"\frac{\sqrt{3}}{2}"),
    (r"(-1, 1) \cup (3, \infty)", r"(-1, 1) \cup [3, \infty)"),
    ("B", r"\frac{\pi r}{h+r}"),
]


@pytest.mark.parametrize(("answer", "gold"), EQUIVALENT)
def test_equivalent_pairs_match(answer, gold):
    assert answers_match(answer, gold)
    assert answers_match(gold, answer)


@pytest.mark.parametrize(("answer", "gold"), NOT_EQUIVALENT)
def test_different_pairs_do_not_match(answer, gold):
    assert not answers_match(answer, gold)


def test_exact_method_is_the_fallback_and_an_option():
    assert answers_match(r"135,\!000", "135000", method="exact")      # normalised strings
    assert not answers_match(r"\frac{1}{2}", "0.5", method="exact")    # no equivalence
    assert answers_match(r"\text{Saturday}", r"\text{Saturday}")     # no maths: exact strings
    assert not answers_match(None, "1")
    with pytest.raises(ProbesError, match="unknown grading method"):
        answers_match("1", "1", method="fuzzy")
    assert normalize(" $ 1,\\!234 $. ") == "1234"


def test_grade_prose_after_think():
    g = grade("<think>\n...\n</think>\n\nWe get 5 - 3 = 2.\n\n**Answer:** There are 9 slips.", "9")
    assert g.correct and g.model_answer.endswith("There are 9 slips.")


def test_real_traces_extraction_agrees_with_recorded_answers(real_traces_path):
    """On the real R1-Distill traces: our extraction reproduces every recorded `model_answer`."""
    records = [json.loads(line) for line in real_traces_path.read_text().splitlines() if line.strip()]
    recorded = [r for r in records if r.get("model_answer") is not None]
    agree = sum(extract_answer(r["trajectory"]) == r["model_answer"].strip() for r in recorded)
    assert len(recorded) == 332
    assert agree / len(recorded) == 1.0
    # grading the recorded answers against the gold ones: math-verify finds the equivalent forms
    graded = [grade(r["trajectory"], r["answer"]) for r in recorded]
    exact = sum(answers_match(r["model_answer"], r["answer"], method="exact") for r in recorded)
    n_correct = sum(g.correct for g in graded)
    assert exact < n_correct
    assert 0.8 < n_correct / len(recorded) < 1.0
