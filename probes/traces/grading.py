"""Grading: the model's final answer, taken from its text, against the gold answer.

Entry points: `extract_answer(text)` (the last balanced `\\boxed{...}`, else the text after the
last `</think>`), `answers_match(model_answer, gold)` (mathematical equivalence with `math-verify`:
fractions, decimals, LaTeX forms, sets, intervals, matrices; exact strings as the fallback) and
`grade(text, gold)`, both at once. No torch; `math-verify` (and sympy) are imported on first use.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from probes.errors import ProbesError
from probes.traces.read import extract_boxed

THINK_CLOSE = "</think>"

GRADE_METHODS: tuple[str, ...] = ("math-verify", "exact")
"""How an extracted answer is compared to the gold one:

- `math-verify`: equal after the `exact` normalisation, or mathematically equivalent by
  `math_verify.verify` (e.g. `\\dfrac{1}{2}` = `0.5`, `x = 3` = `3`, `[1, 2)` ≠ `(1, 2]`);
- `exact`: equal strings after normalisation only (surrounding whitespace, `$` and a final period
  dropped, runs of spaces collapsed, LaTeX thousands separators `,\\!` removed).
"""

DEFAULT_GRADE_METHOD = GRADE_METHODS[0]

MATH_VERIFY_TIMEOUT_S = 5
"""Per-comparison time limit of math-verify (signal based, so in the main thread only)."""

_THOUSANDS = re.compile(r"(?<=\d),\\!(?=\d{3})")


@dataclass(frozen=True)
class Grade:
    """The graded answer of one text.

    Attributes:
        model_answer: The extracted answer (None: the text has none).
        correct: It matches the gold answer (False when there is none).
    """

    model_answer: str | None
    correct: bool


def extract_answer(text: str) -> str | None:
    """The model's final answer in `text`.

    The content of the last balanced `\\boxed{...}` (nested braces handled,
    `probes.traces.read.extract_boxed`); without one, the text after the last `</think>`
    (stripped); otherwise None.

    Example:
        >>> extract_answer(r"<think>2+2</think> so \\boxed{\\frac{8}{2}}.")
        '\\\\frac{8}{2}'
        >>> extract_answer("<think>2+2</think>\\n4\\n")
        '4'
    """
    return _extract(text)[0]


def _extract(text: str) -> tuple[str | None, bool]:
    """(answer, whether it is the content of a `\\boxed{}`, i.e. LaTeX rather than prose)."""
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed.strip(), True
    _, sep, tail = text.rpartition(THINK_CLOSE)
    if sep and tail.strip():
        return tail.strip(), False
    return None, False


def normalize(answer: str) -> str:
    """The `exact` method's normal form of an answer string (see `GRADE_METHODS`)."""
    text = re.sub(r"\s+", " ", _THOUSANDS.sub("", answer)).strip()
    text = text.removesuffix(".").strip().strip("$").strip()
    return text.removesuffix(".").rstrip()


def answers_match(model_answer: str | None, gold: str, *, method: str = DEFAULT_GRADE_METHOD,
                  latex: bool = True) -> bool:
    """Whether `model_answer` is the gold answer under `method` (one of `GRADE_METHODS`).

    Args:
        model_answer: The answer (None: there is none, never a match).
        gold: The gold answer (LaTeX or plain).
        method: `GRADE_METHODS`.
        latex: `model_answer` is a LaTeX expression (a `\\boxed{}` content); False: prose, from
            which math-verify picks the answer itself ("the answer is ...", the last expression).

    Raises:
        ProbesError: An unknown method, or `math-verify` not installed.
    """
    if method not in GRADE_METHODS:
        raise ProbesError(f"unknown grading method {method!r}; choose one of {', '.join(GRADE_METHODS)}")
    if model_answer is None:
        return False
    if normalize(model_answer) == normalize(gold):
        return True
    if method == "exact":
        return False
    target = f"${normalize(model_answer)}$" if latex else model_answer
    return _equivalent(target, f"${normalize(gold)}$")


def grade(text: str, gold: str, *, method: str = DEFAULT_GRADE_METHOD) -> Grade:
    """Extract the final answer of `text` and compare it to `gold` (`extract_answer`, `answers_match`)."""
    model_answer, latex = _extract(text)
    return Grade(model_answer, answers_match(model_answer, gold, method=method, latex=latex))


def _math_verify() -> Any:
    try:
        import math_verify
    except ImportError:
        raise ProbesError(
            "grading with math-verify needs the math-verify package: pip install 'math-verify>=0.9' "
            "(or grade with --grade-method exact)"
        ) from None
    return math_verify


def _timeout() -> int | None:
    """math-verify's timeouts use SIGALRM, which only the main thread may set."""
    return MATH_VERIFY_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


@lru_cache(maxsize=4096)
def _parsed(text: str) -> tuple:
    mv = _math_verify()
    return tuple(mv.parse(text, parsing_timeout=_timeout()))


def _equivalent(model_answer: str, gold: str) -> bool:
    mv = _math_verify()
    target, reference = _parsed(model_answer), _parsed(gold)
    if not target or not reference:
        return False
    return bool(mv.verify(list(reference), list(target), timeout_seconds=_timeout()))
