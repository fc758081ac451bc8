"""Traces file → cache: the one resumable write loop, its checks, shards, progress and outputs,
the per-dataset runners and generation."""
