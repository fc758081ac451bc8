"""Activation capture into per-trace outputs, and short-trace batching."""


from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from probes.errors import ProbesError

DEFAULT_COMPONENTS: tuple[str, ...] = ("resid_post", "delta")
"""Components cached when no sites are given: every layer of each."""


POSITIONS: tuple[str, ...] = ("trajectory", "all")
"""Which tokens get site rows: the trajectory span, or every token."""


STORAGE_DTYPES: tuple[str, ...] = ("float16", "float32", "bfloat16")
"""Storage dtypes of site datasets (bfloat16 is stored as raw bits, `cache/SCHEMA.md`)."""


BACKENDS: tuple[str, ...] = ("auto", "hf", "bridge")
"""Capture backends: "hf" = `hooks.run_residual_hf`, "bridge" = `hooks.capture`."""


def check_choice(name: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ProbesError(f"{name} must be one of {list(allowed)}, got {value!r}")


BATCH_TOKENS = 1024
"""Default padded tokens (batch x longest) per batched forward; 0 turns batching off."""
