"""trajectory-probes: how each token of a chain of thought moves a model toward its answer.

Entry points: `probes.models.load_model` (a TransformerLens bridge around any HF causal LM),
`probes.traces.read_traces` / `probes.traces.tokenize_trace` (JSONL traces to token ids with named
spans), `probes.categories` (reflection / delimiter / ordinary tokens), and the CLI
`python -m probes.run`.
"""

__version__ = "0.1.0"
