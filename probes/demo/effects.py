"""The demo's effects section: causal edits of single tokens' updates on a few sample traces,
tiny-reasoner against its random-init control (`probes.pipeline.effects` runs them,
`probes.readouts.effects.summarize` reads them back).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cache import remove_cache
from hooks.model import LoadedModel
from probes import DATA_DIR
from probes.pipeline.effects import EffectsConfig, effects_traces
from probes.readouts.effects import summarize

DEMO_TRACES = 6


DEMO_PAIRS = 4


def demo_section(loaded: LoadedModel, folder: Path, *, limit: int | None = None) -> dict[str, Any]:
    """The demo's effects section: a few traces of the sample file, trained vs random-init.

    Writes `folder/effects.h5` and `folder/effects_random_init.h5` (replacing earlier ones).

    Returns:
        One JSON-able dict: pairs, V7 pooled per edit, the headline rows of both models, seconds.
    """
    import time


    t0 = time.perf_counter()
    n = DEMO_TRACES if limit is None else min(limit, DEMO_TRACES)
    paths = {"trained": folder / "effects.h5", "random_init": folder / "effects_random_init.h5"}
    for control, path in zip(("none", "random-init"), paths.values()):
        remove_cache(path)
        cfg = EffectsConfig(pairs_per_category=DEMO_PAIRS, limit=n, control=control)
        effects_traces(loaded, DATA_DIR / "tiny_reasoner_traces.jsonl", path, cfg, progress=False)
    s = summarize(paths["trained"], paths["random_init"])
    keep = ("n", "pearson", "spearman", "median_rel_err")
    return {
        "n_traces": s["n_traces"], "n_pairs": s["n_pairs"],
        "v7": {e: {k: s["v7"][e]["all"][k] for k in keep} for e in s["v7"]},
        "v7_random_init": {e: {k: s["v7_versus"][e]["all"][k] for k in keep} for e in s["v7_versus"]},
        "headline": {"trained": s["headline"]["this"], "random_init": s["headline"]["versus"]},
        "files": {k: str(v) for k, v in paths.items()},
        "seconds": round(time.perf_counter() - t0, 2),
    }


def format_demo_line(d: dict[str, Any]) -> str:
    """The demo's lines for its effects section."""
    v, vr = d["v7"], d["v7_random_init"]
    lines = [f"causal edits of single tokens' updates ({d['n_pairs']} (layer, token) pairs in "
             f"{d['n_traces']} traces, V7 real ΔL vs first-order): attention knockout vs M7 "
             f"Spearman {v['attn']['spearman']:.2f} (random-init {vr['attn']['spearman']:.2f}), "
             f"MLP-step removal vs M6 {v['mlp']['spearman']:.2f} ({vr['mlp']['spearman']:.2f})"]
    h, hr = d["headline"]["trained"]["attn"], d["headline"]["random_init"]["attn"]
    lines.append("  mean real ΔL of knocking one token out of one layer's attention, nats: " + "; ".join(
        f"{c} {h[c]['mean']:+.2g} [{h[c]['ci_low']:+.2g}, {h[c]['ci_high']:+.2g}] "
        f"(random-init {hr[c]['mean']:+.2g})" for c in ("reflection", "delimiter", "ordinary")))
    return "\n".join(lines)
