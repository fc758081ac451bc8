"""Activation capture into per-trace outputs, and short-trace batching."""
