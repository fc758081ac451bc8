"""The hook library: typed hook sites, scoped capture with in-hook reductions, an HF fast path.

Entry points: `HookSite` / `parse_site` / `sites_for` (one canonical site string such as
`"L3.resid_post"`), `capture(model, sites, ...)` (bridge hooks, any site, removed on exit) and
`run_residual_hf` (plain HF forward with sdpa, residual-level sites). `hooks/` never opens files
and keeps no global state. The names below are imported on first use (PEP 562), so that
`hooks.errors` or `hooks.dtypes` can be read without loading torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_FACE = {
    "capture": "hooks.capture",
    "run_residual_hf": "hooks.hf_fast",
    "CaptureError": "hooks.reduce",
    "SITE_TABLE": "hooks.sites",
    "HookSite": "hooks.sites",
    "UnknownSiteError": "hooks.sites",
    "all_sites": "hooks.sites",
    "available_components": "hooks.sites",
    "parse_site": "hooks.sites",
    "sites_for": "hooks.sites",
    "Captured": "hooks.store",
    "CaptureStore": "hooks.store",
}
"""Each public name and the module that defines it."""

__all__ = sorted(_FACE)


def __getattr__(name: str) -> Any:
    """Import a public name's module on first use."""
    module = _FACE.get(name)
    if module is None:
        raise AttributeError(f"module 'hooks' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The public names."""
    return sorted(__all__)
