"""L̂ (M8): the answer loss after every trajectory prefix, fast and reference."""


from __future__ import annotations

DEFAULT_CHUNK_SIZE = 512
"""Prefill chunk length (tokens per forward while filling the prefix KV cache)."""


DEFAULT_MAX_PACK_TOKENS = 512
"""Longest packed-suffix sequence (k copies × copy length) per forward."""
