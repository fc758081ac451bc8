"""`python -m probes.run inspect`: summarise a cache without loading a model."""

from __future__ import annotations

import os
from typing import Any

from cache import open_cache, summarize

NAME = "inspect"


def inspect_cache(path: str | os.PathLike[str]) -> dict[str, Any]:
    """`cache.summarize(path)` plus the run config and info (for `probes.run inspect`).

    Raises:
        CacheError: Missing, locked, truncated, foreign or other-version file (one-line message).
    """

    summary = summarize(path)
    with open_cache(path) as reader:
        summary["config"] = reader.config
        summary["info"] = reader.metadata.get("info", {})
        summary["weight_convention"] = reader.metadata.get("weight_convention")
    return summary
