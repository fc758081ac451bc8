"""M1–M7: per-token implicit updates (attention dual form, rank-1 MLP steps, alignment)."""


from __future__ import annotations

ANSWER_ROWS = ("first", "mean")
"""`--answer-rows`: the per-row quantities at the first answer row only, or averaged over 𝒬."""


ATTENTION_PATHS = ("sdpa", "eager")
"""`attention=` of the passes: "sdpa" (linear memory, the default) or "eager" (the reference)."""


PRECISIONS = ("float32", "float64")
"""`precision=` of the measurement algebra after the shared pass: "float32" (the default of
`updates`: the products whose error bound allows it in float32, docs/methods.md#precision) or
"float64" (the reference: everything downstream of the captures in float64)."""
