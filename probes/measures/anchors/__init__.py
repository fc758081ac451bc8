"""Sentence anchors: receiver heads, attention suppression, resampling importance."""


from __future__ import annotations

from dataclasses import dataclass

from probes.errors import ProbesError
from probes.traces.grading import DEFAULT_GRADE_METHOD

PROXIMITY_IGNORE = 4
"""Vertical scores ignore the query chunks closer than this (`a ≥ b + 4`), as the paper does."""


TOP_K_HEADS = 20
"""Receiver heads: the top-k heads by mean kurtosis (the paper's 20)."""


SIMILARITY = ("exact", "embedding")
"""How a resampled first chunk T_i is judged similar to the original S_i."""


DEFAULT_THRESHOLD = 0.8
"""`embedding` similarity: cos(S_i, T_i) below this counts as dissimilar (the paper's 0.8)."""


@dataclass(frozen=True, kw_only=True)
class ResampleSettings:
    """How continuations are drawn.

    Attributes:
        k: Samples per prefix.
        temperature: Sampling temperature (> 0).
        top_p: Nucleus mass in (0, 1].
        seed: The run's seed.
        max_new_tokens: Tokens per continuation; None = 2 × T + 64 (capped by the context).
        max_answer_tokens: Tokens of a forced answer.
        grade_method: `probes.traces.grading.GRADE_METHODS`.
        batch_rows: Sequences per `generate` call (prefix-major, so one call holds samples of
            nearby prefixes and short continuations do not wait for long ones; 32 was fastest
            on tiny-reasoner on CPU).
    """

    k: int = 16
    temperature: float = 0.6
    top_p: float = 0.95
    seed: int = 0
    max_new_tokens: int | None = None
    max_answer_tokens: int = 16
    grade_method: str = DEFAULT_GRADE_METHOD
    batch_rows: int = 32

    def check(self) -> None:
        """Raise `ProbesError` for settings out of range."""
        if self.k < 1:
            raise ProbesError(f"--k must be at least 1, got {self.k}")
        if not self.temperature > 0:
            raise ProbesError(f"--temperature must be > 0 for sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ProbesError(f"--top-p must be in (0, 1], got {self.top_p}")
