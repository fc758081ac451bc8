"""Causal edits of single tokens' updates (V7) and behaviour directions."""
