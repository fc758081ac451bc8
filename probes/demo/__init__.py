"""The demo: every analysis on the built-in tiny-reasoner, with its summary lines."""

from probes import DATA_DIR

SAMPLE_TRACES = DATA_DIR / "tiny_reasoner_traces.jsonl"
