"""trajectory-probes: how each token of a chain of thought moves a model toward its answer.

The notebook face (lazy: `import probes` loads neither torch nor a model until a function that
runs one is called):

    import probes
    model = probes.load_model("tiny-reasoner", device="cpu")
    traces = probes.read_traces(probes.DATA_DIR / "tiny_reasoner_traces.jsonl")
    curve = probes.lhat(model, traces[0])               # typed: .to_pandas(), .to_dict()
    probes.run_lhat(model, traces[:20], "run.h5")        # a resumable cache
    with probes.open_cache("run.h5") as store: ...      # every array addressed by token position

The rooms, whose imports flow one way (`run → commands → demo → readouts → pipeline → reasoner →
measures → models → traces`; every room may use `hooks`, `cache` and `analyses`; import-linter
contracts in pyproject.toml enforce it):

- `probes.traces`: JSONL / dicts → `Trace`; tokenization into named spans; lexicon, categories.
- `probes.models`: offline loading, KV-cache parity, random-init controls, models built in code.
- `probes.measures`: (model, tokenized trace) → typed result, grouped by family: `lhat/`,
  `updates/`, `fits/`, `landscape/`, `anchors/`, `effects/`, `capture/`; no files, no printing.
- `probes.reasoner`: the built-in `tiny-reasoner`: task, training, evaluation, checkpoints.
- `probes.pipeline`: traces file → cache: the one resumable write loop, shards, progress,
  outputs, generation.
- `probes.readouts`: cache → numbers without a model: the typed loader, comparisons, the report.
- `probes.demo`: the demo on tiny-reasoner.
- `probes.commands`: the command line (`trajectory-probes SUBCOMMAND`, `python -m probes.run`).
- `probes.arrays`: the registry of every stored per-trace array (name, axes, dtype, meaning).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

__version__ = "0.1.0"

DATA_DIR = Path(__file__).resolve().parent / "data"
"""Packaged data: the lexicon (`lexicon.json`), tiny-reasoner's sample traces
(`tiny_reasoner_traces.jsonl`) and paired variants of 12 of them (`tiny_reasoner_variants.jsonl`:
original / direct / summary, `probes.reasoner.variants`)."""

_FACE = {
    "load_model": "probes.notebook",
    "read_traces": "probes.notebook",
    "lhat": "probes.notebook",
    "updates": "probes.notebook",
    "run_lhat": "probes.notebook",
    "run_updates": "probes.notebook",
    "open_cache": "probes.readouts.loader",
    "load_traces": "probes.readouts.loader",
    "TraceArrays": "probes.readouts.loader",
    "Trace": "probes.traces.read",
}
"""The public names and the module that defines each (imported on first use)."""

__all__ = ["DATA_DIR", "__version__", *_FACE]


def __getattr__(name: str) -> Any:
    """Import a public name's module on first use (PEP 562)."""
    module = _FACE.get(name)
    if module is None:
        raise AttributeError(f"module 'probes' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The public names."""
    return sorted(__all__)
