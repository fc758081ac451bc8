"""The hook library: typed hook sites, scoped capture with in-hook reductions, an HF fast path.

Entry points: `HookSite` / `parse_site` / `sites_for` (one canonical site string such as
`"L3.resid_post"`), `capture(model, sites, ...)` (bridge hooks, any site, removed on exit) and
`run_residual_hf` (plain HF forward with sdpa, residual-level sites). `hooks/` never opens files
and keeps no global state.
"""

from hooks.capture import capture
from hooks.hf_fast import run_residual_hf
from hooks.reduce import CaptureError
from hooks.sites import (
    SITE_TABLE,
    HookSite,
    UnknownSiteError,
    all_sites,
    available_components,
    parse_site,
    sites_for,
)
from hooks.store import Captured, CaptureStore

__all__ = [
    "SITE_TABLE",
    "CaptureError",
    "CaptureStore",
    "Captured",
    "HookSite",
    "UnknownSiteError",
    "all_sites",
    "available_components",
    "capture",
    "parse_site",
    "run_residual_hf",
    "sites_for",
]
