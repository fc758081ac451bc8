"""Traces: JSONL records → `Trace` (`read`), token ids with named spans (`tokenize`), the lexicon and
per-token categories (`categories`), and the label arrays stored with every trace (`labels`)."""

from probes.traces.read import Trace, TraceSet, read_traces
from probes.traces.tokenize import DEFAULT_SCAFFOLD, TokenizedTrace, tokenize_trace, tokenize_traces

__all__ = [
    "DEFAULT_SCAFFOLD",
    "TokenizedTrace",
    "Trace",
    "TraceSet",
    "read_traces",
    "tokenize_trace",
    "tokenize_traces",
]
