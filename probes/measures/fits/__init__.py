"""Linear maps fitted to per-token effects (pseudo-gradient steps, thought patches)."""
