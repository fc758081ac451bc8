"""trajectory-probes: how each token of a chain of thought moves a model toward its answer.

The package reads as a table of contents, and its imports flow one way
(`run → commands → reasoner → measures → models → traces`; every layer may use `hooks`, `cache`
and `analyses`; an import-linter contract in pyproject.toml enforces it):

- `probes.traces`: JSONL traces → `Trace`; tokenization into named spans; lexicon, token
  categories and the label arrays.
- `probes.models`: offline loading (`load_model`, `boot_model`), KV-cache parity, random-init
  controls, models built in code.
- `probes.measures`: one module per quantity family, (model, tokenized trace) → typed result;
  no files, no printing.
- `probes.reasoner`: the built-in reasoner `tiny-reasoner`: its task, training and evaluation
  scripts and the shipped checkpoint (it trains and measures a model, so it sits above both).
- `probes.commands`: one module per subcommand, and the one resumable per-trace write loop.
- `probes.arrays`: the registry of every stored per-trace array.
- `probes.run`: the command line, `python -m probes.run SUBCOMMAND ...`.
"""

from pathlib import Path

__version__ = "0.1.0"

DATA_DIR = Path(__file__).resolve().parent / "data"
"""Packaged data: the lexicon (`lexicon.json`), tiny-reasoner's sample traces
(`tiny_reasoner_traces.jsonl`) and paired variants of 12 of them (`tiny_reasoner_variants.jsonl`:
original / direct / summary, `probes.reasoner.variants`)."""
