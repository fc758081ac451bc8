"""Small text helpers shared by the commands' printed reports."""

from __future__ import annotations

from typing import Any


def num(x: Any, spec: str = ".3g") -> str:
    """Format a number that may be missing: "n/a" for None or NaN (too few traces, say)."""
    return "n/a" if x is None or x != x else format(x, spec)
