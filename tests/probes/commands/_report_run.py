"""A small run for the report tests, built once per test session through the demo's own steps:
`cache_traces`, `lhat_traces`, `updates_traces` (trained and random-init) on the first 4 sample
traces of tiny-reasoner, a cache with activations only, and the saved `compare --json` with its
plots (n_boot 200), so that most tests render without comparing again."""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace

from probes import DATA_DIR

N_TRACES = 4
N_BOOT = 200


@functools.lru_cache(maxsize=1)
def small_run() -> SimpleNamespace:
    """Paths: `root`, `traces`, `run` (sites + L̂ + updates), `control` (random-init updates),
    `sites_only` (activations of 2 traces), `compare_json` and `plots` (its PNGs)."""
    from probes.models.load import load_model
    from probes.pipeline.capture import CacheConfig, cache_traces
    from probes.pipeline.lhat import LhatConfig, lhat_traces
    from probes.pipeline.updates import UpdatesConfig, updates_traces
    from probes.readouts.compare import compare_cache, report_json
    from probes.readouts.configs import CompareConfig

    root = Path(tempfile.mkdtemp(prefix="probes-report-tests-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    traces = root / "traces.jsonl"
    lines = (DATA_DIR / "tiny_reasoner_traces.jsonl").read_text().splitlines(keepends=True)
    traces.write_text("".join(lines[:N_TRACES]))
    loaded = load_model("tiny-reasoner", device="cpu")
    run, control, sites_only = root / "run.h5", root / "random_init.h5", root / "sites_only.h5"
    cache_traces(loaded, traces, run, CacheConfig())
    lhat_traces(loaded, traces, run, LhatConfig(), resume=True, progress=False)
    updates_traces(loaded, traces, run, UpdatesConfig(), resume=True, progress=False)
    updates_traces(loaded, traces, control, UpdatesConfig(control="random-init"), progress=False)
    cache_traces(loaded, traces, sites_only, CacheConfig(limit=2))
    plots = root / "plots"
    report = compare_cache(run, CompareConfig(n_boot=N_BOOT, plots=plots, control=control))
    compare_json = root / "compare.json"
    compare_json.write_text(json.dumps(report_json(report)))
    return SimpleNamespace(root=root, traces=traces, run=run, control=control,
                           sites_only=sites_only, compare_json=compare_json, plots=plots)
